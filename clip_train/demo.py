"""The embedded demo dataset: scikit-learn's bundled handwritten digits as image–caption shards.

1,797 real 8x8 scans of handwritten digits, upscaled to RGB images, each with a caption drawn
from several phrasings ("a photo of the digit seven", "handwritten 7", ...). A stratified
held-out split (with `cls` labels) serves zero-shot classification and retrieval.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np
from PIL import Image

from clip_train.data import write_samples

CLASSNAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
# Training captions mix spelled-out names and numerals, so the text tower must learn both.
CAPTION_TEMPLATES = [
    "a photo of the digit {name}", "handwritten {num}", "the number {name}",
    "a handwritten {name}", "an image of a {num}", "digit {name}", "a scan of the handwritten number {name}",
    "a {name} written by hand", "the digit {num}", "{name}",
]
# Zero-shot prompts (the class name fills `{}`), phrased unlike most training captions.
EVAL_TEMPLATES = ["a photo of the digit {}.", "a handwritten {}.", "the number {}."]


def digit_image(pixels_8x8: np.ndarray, size: int) -> Image.Image:
    gray = Image.fromarray((pixels_8x8 * (255.0 / 16.0)).astype(np.uint8), mode="L")
    return gray.resize((size, size), Image.BICUBIC).convert("RGB")


def make_demo(output_dir: str, image_size: int = 32, val_fraction: float = 0.2, seed: int = 0,
              shards: int = 4) -> dict:
    """Write train/ and val/ shards, classnames.txt and templates.txt; return a summary."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = random.Random(seed)
    order = list(range(len(digits.target)))
    rng.shuffle(order)
    val_ids: set[int] = set()
    for label in range(10):  # stratified hold-out
        of_label = [i for i in order if digits.target[i] == label]
        val_ids.update(of_label[: round(len(of_label) * val_fraction)])

    def samples(split_ids: list[int]):
        for i in split_ids:
            label = int(digits.target[i])
            caption = rng.choice(CAPTION_TEMPLATES).format(name=CLASSNAMES[label], num=label)
            yield {"__key__": f"digit{i:05d}", "png": digit_image(digits.images[i], image_size),
                   "txt": caption, "cls": label}

    out = Path(output_dir)
    train_ids = [i for i in order if i not in val_ids]
    val_list = [i for i in order if i in val_ids]
    summary = {
        "train": write_samples(samples(train_ids), str(out / "train"), -(-len(train_ids) // shards), prefix="train"),
        "val": write_samples(samples(val_list), str(out / "val"), -(-len(val_list) // 2), prefix="val"),
    }
    (out / "classnames.txt").write_text("\n".join(CLASSNAMES) + "\n")
    (out / "templates.txt").write_text("\n".join(EVAL_TEMPLATES) + "\n")
    (out / "summary.json").write_text(json.dumps({"train": len(train_ids), "val": len(val_list)}, indent=1))
    return summary


def make_demo_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="clip-train make-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="demo_data", help="directory for the shards")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    make_demo(args.output, image_size=args.image_size, seed=args.seed)
    print(f"wrote demo shards to {args.output}/train and {args.output}/val")
    return 0
