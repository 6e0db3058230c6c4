"""Tokenising a batch's captions: open_clip's SimpleTokenizer, the same tensors at a fraction of
its cost (a loader's sample on DataComp-like shards: 0.053 -> 0.009 ms; web-like captions with a
cold word cache: 51 against 113 us).

open_clip's tokenizer cleans every caption with ftfy (~13 us, most of its cost), then maps each
word through byte-level BPE, whose cache still leaves a join, a split and a dictionary lookup per
piece, and copies each row into the batch through its own tensor. Here a caption of printable
ASCII without '&' skips ftfy and `html.unescape`, for which both leave it unchanged (ftfy's fixes
all need a non-ASCII character, a control character or an HTML entity); each word's ids are
cached whole; the batch is filled in numpy. The regex, the BPE, the vocabulary and the clean-up
are open_clip's own, called as it calls them; truncation follows its rule (the last kept id
becomes the end token). Other tokenizers (Hugging Face ones, open_clip's reduction masks) are
used unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from open_clip.tokenizer import SimpleTokenizer, _clean_lower, _clean_whitespace, whitespace_clean

# A bound on the per-worker word cache (open_clip's BPE cache has none): web captions bring
# millions of distinct words (numbers, names, URLs) over an epoch, and a node runs ~100 workers.
# 65,536 words take ~18 MB (with open_clip's BPE cache entries for them); cleared when full (the
# common words are back within a few batches).
_MAX_WORDS = 1 << 16


def _lower(text: str) -> str:
    return whitespace_clean(text).lower()


# open_clip's clean functions, without their ftfy and HTML steps: for text those leave unchanged.
_WITHOUT_FIXES = {_clean_lower: _lower, _clean_whitespace: whitespace_clean}


class CaptionTokenizer:
    """open_clip's `SimpleTokenizer` (without a reduction mask): the same (N, context) int64
    tensor for the same captions."""

    def __init__(self, tokenizer: SimpleTokenizer):
        self.tokenizer = tokenizer
        self._quick_clean = _WITHOUT_FIXES.get(tokenizer.clean_fn)
        self._ids: dict[str, list[int]] = {}

    def __getstate__(self) -> dict:  # to a worker without the parent's cache
        return {"tokenizer": self.tokenizer}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["tokenizer"])

    def _clean(self, text: str) -> str:
        if self._quick_clean is not None and text.isascii() and text.isprintable() and "&" not in text:
            return self._quick_clean(text)
        return self.tokenizer.clean_fn(text)

    def _word(self, word: str) -> list[int]:
        """open_clip's `encode` of one regex match."""
        tok = self.tokenizer
        ids = [tok.encoder[piece] for piece in tok.bpe("".join(tok.byte_encoder[b] for b in word.encode("utf-8"))).split(" ")]
        if len(self._ids) >= _MAX_WORDS:
            self._ids.clear()
        self._ids[word] = ids
        return ids

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> torch.Tensor:
        tok = self.tokenizer
        texts = [texts] if isinstance(texts, str) else texts
        length = context_length or tok.context_length
        assert length, "Please set a valid context length"
        out = np.zeros((len(texts), length), np.int64)
        cached, word_ids = self._ids.get, self._word
        for row, text in enumerate(texts):
            ids = [tok.sot_token_id]
            for word in tok.pat.findall(self._clean(text)):
                ids += cached(word) or word_ids(word)
            ids.append(tok.eot_token_id)
            if len(ids) > length:  # open_clip's truncation: the last kept id becomes the end
                ids = ids[:length]
                ids[-1] = tok.eot_token_id
            out[row, :len(ids)] = ids
        return torch.from_numpy(out)


def caption_tokenizer(tokenizer: Callable) -> Callable:
    """`tokenizer`, faster on a loader's batches where it is open_clip's plain SimpleTokenizer."""
    if type(tokenizer) is SimpleTokenizer and tokenizer.reduction_fn is None:
        return CaptionTokenizer(tokenizer)
    return tokenizer
