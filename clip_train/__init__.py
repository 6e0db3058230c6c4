"""clip-train: a distributed CLIP trainer with gradient caching."""

__version__ = "0.1.0"
