"""The loader's caption tokenizer against open_clip's own: the same tensors, caption for caption."""

import pickle
import random
import string

import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer

from clip_train.data import tokens
from clip_train.data.tokens import CaptionTokenizer, caption_tokenizer

CAPTIONS = [
    "a photo of a dog on the beach",
    "A Photo Of A DOG,  on   the beach!!",
    "the dog's ball isn't red -- it's 12.5cm & blue",
    "fish &amp; chips &lt;b&gt;bold&lt;/b&gt; &#39;quoted&#39; &amp;amp;",
    "<b>html</b> without entities",
    "Ã©tÃ© in Paris, sÃ³ mojibake",  # ftfy repairs these
    "café naïve coöperate ﬁsh ＬＯＵＤ “curly” quotes",
    "東京の夜景 🌃 with emoji 🐕‍🦺",
    "tab\tand\nnewline\r\nand carriage\rreturn",
    "\x1b[31mred terminal\x1b[0m text\x07 with control chars\x7f",
    "",
    "   ",
    "\u00a0non-breaking\u2028line separator",
    " ".join(["word"] * 100),  # longer than the context: truncated, last id the end token
    " ".join(f"w{i}" for i in range(40)),
    "<start_of_text> special <end_of_text> tokens in a caption",
]


@pytest.mark.parametrize("clean", ["lower", "whitespace", "canonicalize"])
def test_same_tensors_as_open_clip(clean):
    reference = SimpleTokenizer(clean=clean)
    fast = CaptionTokenizer(SimpleTokenizer(clean=clean))
    for _ in range(2):  # the second time from the word cache
        assert torch.equal(fast(CAPTIONS), reference(CAPTIONS))
    assert torch.equal(fast(CAPTIONS[2]), reference(CAPTIONS[2]))
    assert torch.equal(fast(CAPTIONS, context_length=16), reference(CAPTIONS, context_length=16))
    assert fast(CAPTIONS).dtype == torch.long


def test_printable_ascii_shortcut_matches_ftfy_and_html_unescape():
    """Random printable ASCII with entities, tags and '&' mixed in: the captions the shortcut
    takes (no '&') and the ones it leaves to ftfy give open_clip's tensors."""
    rng = random.Random(0)
    pieces = [*string.printable, "&amp;", "&lt;", "&#x41;", "<p>", "'s", "'LL", "  ", "\t"]
    captions = ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 60))) for _ in range(2000)]
    assert sum("&" not in c and c.isprintable() for c in captions) > 200  # both routes are taken
    reference, fast = SimpleTokenizer(), CaptionTokenizer(SimpleTokenizer())
    for i in range(0, len(captions), 64):
        assert torch.equal(fast(captions[i:i + 64]), reference(captions[i:i + 64]))


def test_random_unicode_captions_match():
    """Captions drawn from Latin, accented, Cyrillic, CJK, emoji, combining marks, punctuation,
    digits and whitespace: ftfy's route, the regex's splits and the word cache give open_clip's ids."""
    rng = random.Random(1)
    alphabet = (string.ascii_letters + string.digits + " .,'!?-&;#" + "éèüßñçøåÉÜ" + "привет" + "東京夜景の"
                + "\U0001F415\U0001F303\u200d" + "\u0301\u0308" + "\t\n\u00a0\u3000" + "ﬁ“”’")
    captions = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 50))) for _ in range(1000)]
    reference, fast = SimpleTokenizer(), CaptionTokenizer(SimpleTokenizer())
    for _ in range(2):
        for i in range(0, len(captions), 64):
            assert torch.equal(fast(captions[i:i + 64]), reference(captions[i:i + 64]))


def test_word_cache_is_bounded_and_not_pickled(monkeypatch):
    monkeypatch.setattr(tokens, "_MAX_WORDS", 8)
    reference, fast = SimpleTokenizer(), CaptionTokenizer(SimpleTokenizer())
    captions = [" ".join(f"word{i}x{j}" for j in range(5)) for i in range(10)]
    assert torch.equal(fast(captions), reference(captions))
    assert 0 < len(fast._ids) <= 8
    copy = pickle.loads(pickle.dumps(fast))
    assert copy._ids == {}
    assert torch.equal(copy(captions), reference(captions))


def test_other_tokenizers_are_used_unchanged():
    plain = SimpleTokenizer()
    assert isinstance(caption_tokenizer(plain), CaptionTokenizer)
    masked = SimpleTokenizer(reduction_mask="simple")
    assert caption_tokenizer(masked) is masked

    def other(texts):
        return texts

    assert caption_tokenizer(other) is other
