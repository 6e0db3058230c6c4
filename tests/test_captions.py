"""Several captions per image: one drawn per sample per epoch, with configured weights,
reproducibly (the same draw after a resume, and whatever the worker layout)."""

from __future__ import annotations

import json
import pickle
import random
from collections import Counter

import pytest
import torch
from data_shards import image_ids, png_bytes, to_tensor

from clip_train.config import ConfigError, DataConfig, load_config
from clip_train.data import (
    CaptionSpec,
    build_train_loader,
    caption_weights,
    draw_caption,
    write_samples,
)

VARIANTS = {"orig": 0, "syn-a": 1, "syn-b": 2}


def tokenizer(captions: list[str]) -> torch.Tensor:
    """'<id> <variant>' -> [id, variant index]."""
    rows = [[int(c.split()[0]), VARIANTS[c.split()[1]]] for c in captions]
    return torch.tensor(rows, dtype=torch.long)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("captions")

    def samples():
        for i in range(48):
            yield {"__key__": f"k{i:04d}", "png": png_bytes(i), "txt": f"{i} orig",
                   "json": {"captions": [f"{i} syn-a", f"{i} syn-b"]}}

    write_samples(samples(), str(out), 12, prefix="c", progress=False)
    return f"{out}/c-{{000000..000003}}.tar"


def loader(train, state=None, workers=2, **data):
    cfg = DataConfig(train=train, workers=workers, shuffle_buffer=10, resampled=False,
                     caption_list_key="captions", **data)
    return build_train_loader(cfg, transform=to_tensor, tokenizer=tokenizer, local_batch_size=6, seed=0,
                              rank=0, world_size=1, state=state)


def take(train_loader, n):
    out = []
    for _, (images, texts) in zip(range(n), train_loader, strict=False):
        assert image_ids(images) == texts[:, 0].tolist()  # the caption stays with its image
        out.append(texts)
    return out


def draws(batches) -> dict[int, int]:
    return {int(row[0]): int(row[1]) for texts in batches for row in texts}


def test_caption_weights_by_position():
    assert caption_weights([0, 1, 2], (0.3, 0.7)) == pytest.approx([0.3, 0.35, 0.35])
    assert caption_weights([1, 2], (0.3, 0.7)) == pytest.approx([0.35, 0.35])  # no txt: the list only
    assert caption_weights([0], (0.3, 0.7)) == [0.3]
    assert caption_weights([0, 1], None) == [1.0, 1.0]
    assert caption_weights([1, 2], (1.0, 0.0)) == [0.0, 0.0]  # a weight of 0 stays 0, even alone


def test_draws_follow_the_probabilities():
    spec = CaptionSpec("captions", (0.5, 0.5), True)
    sample = {"txt": b"0 orig", "json": json.dumps({"captions": ["0 syn-a", "0 syn-b"]}).encode()}
    got = Counter(draw_caption(sample, "txt", spec, seed, lambda *a: None) for seed in range(4000))
    # Binomial standard deviation at n=4000: 0.008 for 0.5, 0.007 for 0.25.
    assert got["0 orig"] / 4000 == pytest.approx(0.5, abs=0.03)
    assert got["0 syn-a"] / 4000 == pytest.approx(0.25, abs=0.03)
    only_list = CaptionSpec("captions", None, False)
    assert {draw_caption(sample, "txt", only_list, s, lambda *a: None) for s in range(50)} == {"0 syn-a", "0 syn-b"}
    # A sample without the list keeps its txt caption; without either it is counted as missing.
    assert draw_caption({"txt": b"1 orig"}, "txt", only_list, 0, lambda *a: None) == "1 orig"
    bad = []
    assert draw_caption({"json": b"{}"}, "txt", spec, 0, lambda kind, what: bad.append(kind)) is None
    assert bad == ["missing_caption"]


def test_one_caption_per_sample_per_epoch_reproducible_and_resumable(shards):
    full = take(loader(shards), 16)  # 2 epochs of 8 batches
    epoch0, epoch1 = draws(full[:8]), draws(full[8:])
    assert sorted(epoch0) == sorted(epoch1) == list(range(48))
    assert set(epoch0.values()) == {0, 1, 2}  # every kind of caption is drawn
    assert sum(epoch0[i] != epoch1[i] for i in range(48)) > 10  # a new draw each epoch
    # Seeded by (seed, key, epoch): the same draws with another worker layout ...
    assert draws(take(loader(shards, workers=1), 8)) == epoch0
    # ... and after a resume in the middle of an epoch.
    first = loader(shards)
    take(first, 11)
    resumed = take(loader(shards, state=pickle.loads(pickle.dumps(first.state_dict()))), 5)
    assert all(torch.equal(a, b) for a, b in zip(full[11:], resumed, strict=True))
    # Weights: only the original caption when the list gets weight 0.
    only_txt = draws(take(loader(shards, caption_probs=[1.0, 0.0]), 8))
    assert set(only_txt.values()) == {0}


def test_caption_config_errors():
    with pytest.raises(ConfigError, match="data.caption_probs"):
        load_config(None, ["data.caption_probs=[0.5,0.5]"])
    with pytest.raises(ConfigError, match="data.caption_probs"):
        load_config(None, ["data.caption_list_key=captions", "data.caption_probs=[-1,2]"])
    assert load_config(None, ["data.caption_list_key=captions", "data.caption_probs=[0.2,0.8]"]).data.caption_probs \
        == [0.2, 0.8]
    random.seed(0)  # draw_caption never touches the global RNG
    draw_caption({"txt": b"0 orig", "json": b'{"captions": ["0 syn-a"]}'}, "txt",
                 CaptionSpec("captions", None, True), 1, lambda *a: None)
    assert random.random() == random.Random(0).random()


def test_zero_weight_captions_are_never_drawn():
    """data.caption_probs=[1, 0] means "only the txt caption": a sample whose txt is empty or
    missing is skipped and counted (as a missing caption), never given a zero-weight recaption."""
    only_txt = CaptionSpec("captions", (1.0, 0.0), True)
    listed = json.dumps({"captions": ["0 syn-a", "0 syn-b"]}).encode()
    for sample in ({"txt": b"  ", "json": listed}, {"json": listed},
                   {"json": json.dumps({"captions": ["0 syn-a"]}).encode()}):  # one candidate, weight 0
        bad = []
        assert draw_caption(sample, "txt", only_txt, 0, lambda kind, what, out=bad: out.append((kind, what))) is None
        assert bad[0][0] == "missing_caption" and "data.caption_probs" in bad[0][1]
    assert draw_caption({"txt": b"0 orig", "json": listed}, "txt", only_txt, 0, lambda *a: None) == "0 orig"
    # Only the recaptions: [0, 1]; a sample without them is skipped, the others never give txt.
    only_list = CaptionSpec("captions", (0.0, 1.0), True)
    bad = []
    assert draw_caption({"txt": b"0 orig"}, "txt", only_list, 0, lambda kind, what: bad.append(kind)) is None
    assert bad == ["missing_caption"]
    sample = {"txt": b"0 orig", "json": listed}
    assert {draw_caption(sample, "txt", only_list, s, lambda *a: None) for s in range(50)} == {"0 syn-a", "0 syn-b"}
    # caption_list_with_text=false: the txt caption of a sample without a list is its documented
    # fallback, whatever the weights.
    no_text = CaptionSpec("captions", (0.0, 1.0), False)
    assert draw_caption({"txt": b"1 orig"}, "txt", no_text, 0, lambda *a: None) == "1 orig"


def test_an_unreadable_part_loses_only_its_own_captions(tmp_path, caplog):
    """A corrupt json beside a fine txt keeps the sample with its txt; a non-UTF-8 txt beside a fine
    list keeps it with the list; both broken: skipped as undecodable. A kept sample is warned
    about, not counted as bad."""
    # Through the loader (in-process): every sample trains, no bad count, a warning in the log.
    def samples():
        for i in range(6):
            sample = {"__key__": f"u{i}", "png": png_bytes(i), "txt": f"{i} orig".encode(),
                      "json": json.dumps({"captions": [f"{i} syn-a"]}).encode()}
            if i % 3 == 1:
                sample["json"] = b"{not json"
            if i % 3 == 2:
                sample["txt"] = b"\xff\xfe"
            yield sample

    write_samples(samples(), str(tmp_path), 6, prefix="u", progress=False)
    train = loader(f"{tmp_path}/u-000000.tar", workers=0)
    with caplog.at_level("WARNING", logger="clip_train.data.stream"):
        got = draws(take(train, 1))
    assert sorted(got) == list(range(6)) and train.bad_counts() == dict.fromkeys(train.bad_counts(), 0)
    assert got[1] == 0 and got[2] == 1  # corrupt json: its txt; non-UTF-8 txt: its list
    assert sum("kept with its readable captions" in r.getMessage() for r in caplog.records) == 3
    # draw_caption itself: which part is lost, and the note.
    spec = CaptionSpec("captions", None, True)
    notes, bad = [], []
    corrupt_json = {"txt": b"3 orig", "json": b'{"captions": ["3 syn-a"'}
    assert draw_caption(corrupt_json, "txt", spec, 0, lambda *a: bad.append(a), notes.append) == "3 orig"
    bad_txt = {"txt": b"\xff\xfe orig", "json": b'{"captions": ["4 syn-a"]}'}
    assert draw_caption(bad_txt, "txt", spec, 0, lambda *a: bad.append(a), notes.append) == "4 syn-a"
    assert not bad and len(notes) == 2 and "json" in notes[0] and "txt" in notes[1]
    both = {"txt": b"\xff orig", "json": b"{"}
    assert draw_caption(both, "txt", spec, 0, lambda kind, what: bad.append(kind), notes.append) is None
    assert bad == ["undecodable_text"]
