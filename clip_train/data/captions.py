"""One caption per sample from several candidates (`data.caption_list_key`), drawn
reproducibly from (seed, key, epoch).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CaptionSpec:
    list_key: str  # key of the caption list (or one string) in the sample's json
    probs: tuple[float, ...] | None  # weights by candidate position; the last shared by the rest
    with_text: bool  # the txt caption is candidate 0


def _key_hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")


def caption_weights(positions: list[int], probs: tuple[float, ...] | None) -> list[float]:
    """Weights of the candidates at `positions`: probs[p], the last weight shared equally by the
    candidates from its position on; uniform without probs. A weight of 0 stays 0 (never drawn)."""
    if not probs:
        return [1.0] * len(positions)
    tail = len(probs) - 1
    in_tail = sum(p >= tail for p in positions)
    return [probs[p] if p < tail else probs[tail] / in_tail for p in positions]


def draw_caption(sample: dict, text_key: str, spec: CaptionSpec, seed: int,
                 bad: Callable[[str, str], None], note: Callable[[str], None] | None = None) -> str | None:
    """One caption among the sample's txt caption (candidate 0, with spec.with_text) and the list
    under `spec.list_key` in its json, drawn with `seed`; None (counted by `bad`) if there is none.

    An unreadable part (non-UTF-8 txt, corrupt json) loses only its own captions: the sample is
    kept with the other part's, and `note` is told (a warning, not a bad sample). Candidates whose
    weight in spec.probs is 0 are never drawn; a sample left with none is counted as missing."""
    candidates: list[tuple[int, str]] = []
    unreadable: list[str] = []
    text = None
    if text_key in sample:
        try:
            text = sample[text_key].decode("utf-8")
        except UnicodeDecodeError as exn:
            unreadable.append(f"{text_key}: {exn}")
    offset = 1 if spec.with_text else 0
    if spec.with_text and text is not None and text.strip():
        candidates.append((0, text))
    found = False
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except (ValueError, UnicodeDecodeError) as exn:
            unreadable.append(f"json: {exn}")
            meta = None
        value = meta.get(spec.list_key) if isinstance(meta, dict) else None
        value = [value] if isinstance(value, str) else value
        if isinstance(value, list):
            found = found or bool(value)
            candidates += [(offset + i, c) for i, c in enumerate(value) if isinstance(c, str) and c.strip()]
    fallback = False
    if not candidates and not spec.with_text and text is not None and text.strip():
        candidates.append((0, text))  # no list: fall back on the txt caption, whatever the weights
        fallback = True
    if not candidates:
        if unreadable:
            bad("undecodable_text", "; ".join(unreadable))
        elif text is None and not found:
            bad("missing_caption", f"no {text_key} file and no json {spec.list_key!r} list")
        else:
            bad("empty_caption", "every caption is empty")
        return None
    if unreadable and note is not None:
        note(f"kept with its readable captions, without {'; '.join(unreadable)}")
    weights = [1.0] if fallback else caption_weights([p for p, _ in candidates], spec.probs)
    drawable = [(c, w) for (_, c), w in zip(candidates, weights, strict=True) if w > 0]
    if not drawable:
        bad("missing_caption", f"no caption with a positive weight in data.caption_probs={list(spec.probs or ())} "
                               f"(candidates at positions {[p for p, _ in candidates]})")
        return None
    if len(drawable) == 1:
        return drawable[0][0]
    return random.Random(seed).choices([c for c, _ in drawable], [w for _, w in drawable])[0]


