"""Evaluation: zero-shot classifier, metrics on cases with known answers, data paths, bad input,
and a 2-process evaluation that must equal the 1-process one."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import webdataset as wds
from conftest import launch
from PIL import Image

from clip_train.config import Config, ConfigError, EvalConfig, ModelConfig, TrainConfig
from clip_train.evaluate import (
    _all_gather_rows,
    alignment,
    build_classifier,
    chunked_topk,
    classification_counts,
    classification_metrics,
    evaluate,
    load_classnames,
    load_templates,
    rank_shards,
    retrieval_metrics,
    run_eval,
    uniformity,
)
from clip_train.model import build_model

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs/models/tiny-vit.json")
CLASSNAMES = ["cat", "dog", "red car"]
TEMPLATES = ["a photo of a {}.", "{} in the wild", "a drawing of the {} (sketch)"]
ZS_SIZES = (5, 4, 4)  # 13 samples over 3 shards: odd, and uneven between ranks
RET_SIZE = 7  # one retrieval shard: with 2 processes, rank 1 reads nothing
PAIR_SIZES = (13, 9)  # validation-loss pairs: 3 batches of 10 across the shard boundary


# ------------------------------------------------------------------------------------------
# Fixtures: a tiny seeded model and tiny data written by the test


@pytest.fixture(scope="module")
def bundle():
    torch.manual_seed(0)
    # Random init: image embeddings are close (cosine ~0.99) but differ by ~1e-3, far above the
    # float noise between batchings (~1e-7), so rankings are stable.
    return build_model(ModelConfig(name=TINY))


def _image(rng: np.random.Generator) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))


def _write_shards(pattern: str, samples: list[dict], sizes: tuple[int, ...]) -> None:
    assert sum(sizes) == len(samples)
    start = 0
    for i, n in enumerate(sizes):
        with wds.TarWriter(pattern % i) as w:
            for s in samples[start : start + n]:
                w.write(s)
        start += n


def _captions(i: int) -> list[str]:
    return [f"picture number {i}", f"another view {i}", f"item {i} again"][: 1 + i % 3]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("evaldata")
    rng = np.random.default_rng(0)
    zs = [{"__key__": f"z{i:04d}", "png": _image(rng), "cls": i % 3} for i in range(sum(ZS_SIZES))]
    _write_shards(str(d / "zs-%06d.tar"), zs, ZS_SIZES)
    folder = d / "folder"
    for i, s in enumerate(zs):
        # Sorted folder names give the class index (ImageFolder's convention).
        (folder / f"{s['cls']}_{CLASSNAMES[s['cls']]}").mkdir(parents=True, exist_ok=True)
        s["png"].save(folder / f"{s['cls']}_{CLASSNAMES[s['cls']]}" / f"{i:04d}.png")
    ret = []
    for i in range(RET_SIZE):
        caps = _captions(i)
        # Both caption formats: newline-separated `txt`, and a `json` `captions` list (which wins).
        sample = {"__key__": f"r{i:04d}", "png": _image(rng)}
        if i % 2:
            sample["json"] = {"captions": caps}
            sample["txt"] = "ignored when json has captions"
        else:
            sample["txt"] = "\n".join(caps)
        ret.append(sample)
    _write_shards(str(d / "ret-%06d.tar"), ret, (RET_SIZE,))
    bad = [{"__key__": f"b{i}", "png": _image(rng), "cls": 3 if i == 3 else 0} for i in range(4)]
    _write_shards(str(d / "bad-%06d.tar"), bad, (2, 2))  # the bad index is in shard 1 only
    pairs = [{"__key__": f"p{i:04d}", "png": _image(rng), "txt": f"a picture of thing {i}"}
             for i in range(sum(PAIR_SIZES))]
    _write_shards(str(d / "pairs-%06d.tar"), pairs, PAIR_SIZES)
    (d / "names.txt").write_text("\n".join(CLASSNAMES) + "\n")
    (d / "templates.json").write_text(json.dumps(TEMPLATES))
    return {
        "dir": d,
        "zs_samples": zs,
        "ret_samples": ret,
        "zeroshot": str(d / "zs-{000000..000002}.tar"),
        "folder": str(folder),
        "retrieval": str(d / "ret-000000.tar"),
        "bad": str(d / "bad-{000000..000001}.tar"),
        "pairs": str(d / "pairs-{000000..000001}.tar"),
        "pair_samples": pairs,
        "names": str(d / "names.txt"),
        "templates": str(d / "templates.json"),
    }


def _eval(bundle, cfg: EvalConfig) -> dict[str, float]:
    return evaluate(
        bundle.model, cfg, transform=bundle.eval_transform, tokenizer=bundle.tokenizer, device="cpu"
    )


def _full_cfg(data, **kw) -> EvalConfig:
    return EvalConfig(
        zeroshot=data["zeroshot"],
        classnames=data["names"],
        templates=data["templates"],
        retrieval=data["retrieval"],
        batch_size=4,
        workers=2,
        retrieval_chunk_size=3,
        **kw,
    )


# ------------------------------------------------------------------------------------------
# Independent float64 references


def _reference_classifier(model, tokenizer, classnames, templates) -> torch.Tensor:
    """[D, C] in float64, one prompt per forward: mean of normalised embeddings, renormalised."""
    cols = []
    with torch.no_grad():
        for name in classnames:
            embs = [
                model.encode_text(tokenizer([t.replace("{}", name)])).double()[0] for t in templates
            ]
            embs = [e / e.norm() for e in embs]
            mean = torch.stack(embs).mean(0)
            cols.append(mean / mean.norm())
    return torch.stack(cols, dim=1)


def _reference_recall(img_ND, txt_TD, owner_T, k: int) -> tuple[float, float]:
    """(image->text, text->image) recall@k from the full float64 similarity matrix."""
    sim_NT = img_ND.double() @ txt_TD.double().T
    i2t = [
        bool(
            set(sim_NT[i].argsort(descending=True)[:k].tolist())
            & set((owner_T == i).nonzero().flatten().tolist())
        )
        for i in range(img_ND.shape[0])
    ]
    t2i = [
        int(owner_T[t]) in sim_NT[:, t].argsort(descending=True)[:k].tolist()
        for t in range(txt_TD.shape[0])
    ]
    return float(np.mean(i2t)), float(np.mean(t2i))


def _reference_uniformity(x_ND, t=2.0) -> float:
    x = x_ND.double()
    sq = torch.cdist(x, x).pow(2)
    off = ~torch.eye(x.shape[0], dtype=torch.bool)
    return float(torch.log(torch.exp(-t * sq[off]).mean()))


def _unit(n: int, d: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=-1)


# ------------------------------------------------------------------------------------------
# Zero-shot classifier


def test_classifier_equals_hand_computed_reference(bundle, data):
    # Three of open_clip's OpenAI templates (lambdas) and three from a JSON file.
    templates = load_templates(None)[:3] + load_templates(data["templates"])
    as_text = [t("{}") for t in templates]
    ref_DC = _reference_classifier(bundle.model, bundle.tokenizer, CLASSNAMES, as_text)
    # 8 prompts per forward with 6 templates: one class per forward; 78: all classes at once.
    for batch_size in (8, 78):
        got_DC = build_classifier(
            bundle.model,
            bundle.tokenizer,
            CLASSNAMES,
            templates,
            device="cpu",
            batch_size=batch_size,
        )
        assert got_DC.shape == (64, len(CLASSNAMES))
        torch.testing.assert_close(got_DC.double(), ref_DC, atol=2e-6, rtol=0)


def test_classnames_and_templates_files(tmp_path):
    (tmp_path / "names.txt").write_text("cat\n\n  dog \n")
    (tmp_path / "names.json").write_text('["a", "b c"]')
    (tmp_path / "t.txt").write_text("a photo of {} (really)\n{}\n")
    assert load_classnames(str(tmp_path / "names.txt")) == ["cat", "dog"]
    assert load_classnames(str(tmp_path / "names.json")) == ["a", "b c"]
    assert len(load_classnames("imagenet")) == 1000
    assert (
        len(load_templates("imagenet")) == 80
        and load_templates(None)[0]("x") == "a bad photo of a x."
    )
    # Other braces in a template are kept literally (str.format would raise on them).
    assert [t("dog") for t in load_templates(str(tmp_path / "t.txt"))] == [
        "a photo of dog (really)",
        "dog",
    ]


# ------------------------------------------------------------------------------------------
# Metrics on constructed cases


def test_classification_counts_with_crafted_ranks():
    num_classes, n = 8, 40
    g = torch.Generator().manual_seed(1)
    labels_N = torch.randint(0, num_classes, (n,), generator=g)
    rank_N = torch.randint(0, num_classes, (n,), generator=g)  # where the true class lands
    logits_NC = torch.empty(n, num_classes)
    for i in range(n):
        others = [c for c in range(num_classes) if c != labels_N[i]]
        order = others[: rank_N[i]] + [int(labels_N[i])] + others[rank_N[i] :]
        logits_NC[i, order] = torch.arange(num_classes, 0, -1, dtype=torch.float)
    m = classification_metrics(classification_counts(logits_NC, labels_N, num_classes))
    assert m["zeroshot/top1"] == pytest.approx(float((rank_N == 0).float().mean()))
    assert m["zeroshot/top5"] == pytest.approx(float((rank_N < 5).float().mean()))
    recalls = [
        float((rank_N[labels_N == c] == 0).float().mean())
        for c in range(num_classes)
        if (labels_N == c).any()
    ]
    assert m["zeroshot/mean_per_class_recall"] == pytest.approx(float(np.mean(recalls)))
    assert m["zeroshot/num_samples"] == n
    # Fewer than 5 classes: top-5 covers every class.
    m3 = classification_metrics(classification_counts(torch.randn(6, 3), torch.arange(6) % 3, 3))
    assert m3["zeroshot/top5"] == 1.0


def test_identical_embeddings_give_perfect_recall():
    img_ND = _unit(50, seed=2)
    for chunk in (1, 7, 100):
        m = retrieval_metrics(img_ND, img_ND.clone(), torch.arange(50), chunk_size=chunk)
        assert all(v == 1.0 for v in m.values()), (chunk, m)
    # Several captions per image, each a slightly perturbed copy of its image: still perfect.
    owner_T = torch.arange(50).repeat_interleave(3)
    txt_TD = F.normalize(img_ND[owner_T] + 0.01 * _unit(150, seed=3), dim=-1)
    m = retrieval_metrics(img_ND, txt_TD, owner_T, chunk_size=16)
    assert m["retrieval/image_to_text_R@1"] == 1.0 and m["retrieval/text_to_image_R@1"] == 1.0


def test_permuted_pairs_give_known_recall():
    n = 10
    perm = torch.tensor([0, 1, 2, 4, 3, 6, 7, 5, 9, 8])  # 3 fixed points
    img_ND = _unit(n, seed=4)
    txt_TD = img_ND[perm]  # text t is exactly image perm[t]; it is labelled as image t's caption
    m = retrieval_metrics(img_ND, txt_TD, torch.arange(n), chunk_size=4)
    assert m["retrieval/image_to_text_R@1"] == pytest.approx(0.3)
    assert m["retrieval/text_to_image_R@1"] == pytest.approx(0.3)
    assert m["retrieval/text_to_image_R@10"] == 1.0


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_recall_matches_full_matrix_reference(chunk):
    g = torch.Generator().manual_seed(5)
    n = 40
    owner_T = torch.arange(n).repeat_interleave(torch.randint(1, 4, (n,), generator=g))
    img_ND = _unit(n, seed=6)
    txt_TD = F.normalize(img_ND[owner_T] + 1.2 * _unit(len(owner_T), seed=7), dim=-1)
    m = retrieval_metrics(img_ND, txt_TD, owner_T, chunk_size=chunk)
    for k in (1, 5, 10):
        i2t, t2i = _reference_recall(img_ND, txt_TD, owner_T, k)
        assert m[f"retrieval/image_to_text_R@{k}"] == pytest.approx(i2t, abs=1e-12)
        assert m[f"retrieval/text_to_image_R@{k}"] == pytest.approx(t2i, abs=1e-12)
    assert 0 < m["retrieval/image_to_text_R@1"] < 1  # the case is not trivial


def test_chunked_topk_equals_full_topk():
    q, keys = _unit(23, seed=8), _unit(57, seed=9)
    ref = (q @ keys.T).topk(10, dim=1).indices
    for chunk in (1, 4, 23, 1000):
        assert torch.equal(chunked_topk(q, keys, 10, chunk), ref)
    assert chunked_topk(q, keys[:3], 10, 2).shape == (23, 3)  # k larger than the keys


def test_alignment_and_uniformity_match_reference():
    img_ND = _unit(30, seed=10)
    owner_T = torch.arange(30).repeat_interleave(2)
    txt_TD = _unit(60, seed=11)
    ref_align = float((img_ND[owner_T].double() - txt_TD.double()).pow(2).sum(1).mean())
    assert alignment(img_ND, txt_TD, owner_T) == pytest.approx(ref_align, rel=1e-12)
    assert alignment(img_ND, img_ND[owner_T], owner_T) == pytest.approx(0.0, abs=1e-12)
    for chunk in (1, 7, 100):
        assert uniformity(txt_TD, chunk_size=chunk) == pytest.approx(
            _reference_uniformity(txt_TD), abs=1e-5
        )
    # All embeddings equal: the worst uniformity, log(exp(0)) = 0.
    assert uniformity(img_ND[:1].expand(5, -1), chunk_size=2) == pytest.approx(0.0, abs=1e-6)


# ------------------------------------------------------------------------------------------
# End to end on shards and an ImageFolder


def _reference_metrics(bundle, data) -> dict[str, float]:
    model, tf, tok = bundle.model, bundle.eval_transform, bundle.tokenizer
    model.eval()
    with torch.no_grad():
        w_DC = _reference_classifier(model, tok, CLASSNAMES, TEMPLATES)
        zs = data["zs_samples"]
        img = F.normalize(
            model.encode_image(torch.stack([tf(s["png"]) for s in zs])).double(), dim=-1
        )
        labels = torch.tensor([s["cls"] for s in zs])
        pred = (img @ w_DC).argmax(1)
        ret = data["ret_samples"]
        r_img = F.normalize(
            model.encode_image(torch.stack([tf(s["png"]) for s in ret])).double(), dim=-1
        )
        caps = [c for i in range(RET_SIZE) for c in _captions(i)]
        owner_T = torch.arange(RET_SIZE).repeat_interleave(
            torch.tensor([len(_captions(i)) for i in range(RET_SIZE)])
        )
        r_txt = F.normalize(model.encode_text(tok(caps)).double(), dim=-1)
    out = {
        "zeroshot/top1": float((pred == labels).double().mean()),
        "zeroshot/top5": 1.0,
        "zeroshot/mean_per_class_recall": float(
            np.mean([float((pred[labels == c] == c).double().mean()) for c in range(3)])
        ),
        "zeroshot/num_samples": float(len(zs)),
        "retrieval/alignment": float((r_img[owner_T] - r_txt).pow(2).sum(1).mean()),
        "retrieval/uniformity_image": _reference_uniformity(r_img),
        "retrieval/uniformity_text": _reference_uniformity(r_txt),
        "retrieval/num_images": float(RET_SIZE),
        "retrieval/num_texts": float(len(caps)),
    }
    out["retrieval/uniformity"] = (
        out["retrieval/uniformity_image"] + out["retrieval/uniformity_text"]
    ) / 2
    for k in (1, 5, 10):
        i2t, t2i = _reference_recall(r_img, r_txt, owner_T, k)
        out[f"retrieval/image_to_text_R@{k}"], out[f"retrieval/text_to_image_R@{k}"] = i2t, t2i
    return out


def test_evaluate_on_shards_matches_reference(bundle, data):
    bundle.model.train()
    got = _eval(bundle, _full_cfg(data))
    assert bundle.model.training  # train mode restored
    ref = _reference_metrics(bundle, data)
    assert set(got) == set(ref)
    for key, value in ref.items():
        assert got[key] == pytest.approx(value, abs=1e-5), key
    # The constructed data is not degenerate: some but not all predictions are right.
    assert 0 < got["zeroshot/top1"] < 1 and 0 < got["retrieval/text_to_image_R@1"] < 1


def test_imagefolder_equals_shards(bundle, data):
    cfg = EvalConfig(
        zeroshot=data["folder"],
        classnames=data["names"],
        templates=data["templates"],
        batch_size=5,
        workers=0,
    )
    got = _eval(bundle, cfg)
    shards = _eval(
        bundle,
        EvalConfig(
            zeroshot=data["zeroshot"],
            classnames=data["names"],
            templates=data["templates"],
            batch_size=5,
            workers=0,
        ),
    )
    assert got == pytest.approx(shards, abs=1e-12)
    assert got["zeroshot/num_samples"] == sum(ZS_SIZES)


def test_nothing_configured_returns_empty(bundle):
    assert _eval(bundle, EvalConfig()) == {}


def test_rank_shards_split_in_order():
    spec = "a-{0..4}.tar"
    assert rank_shards(spec, 0, 2) == [(0, "a-0.tar"), (2, "a-2.tar"), (4, "a-4.tar")]
    assert rank_shards(spec, 1, 2) == [(1, "a-1.tar"), (3, "a-3.tar")]
    assert rank_shards("a-0.tar", 1, 2) == []
    assert _all_gather_rows(torch.ones(2, 3), 1).shape == (2, 3)


# ------------------------------------------------------------------------------------------
# Bad input


def test_bad_input_errors_name_the_key(bundle, data, tmp_path):
    with pytest.raises(ConfigError, match=r"eval\.classnames: no such file"):
        _eval(
            bundle, EvalConfig(zeroshot=data["zeroshot"], classnames=str(tmp_path / "missing.txt"))
        )
    (tmp_path / "t.txt").write_text("a photo of {}\na photo without a slot\n")
    with pytest.raises(ConfigError, match=r"eval\.templates: template 'a photo without a slot'"):
        _eval(
            bundle,
            EvalConfig(
                zeroshot=data["zeroshot"],
                classnames=data["names"],
                templates=str(tmp_path / "t.txt"),
            ),
        )
    with pytest.raises(
        ConfigError, match=r"eval\.zeroshot: class index 3 is out of range for the 3"
    ):
        _eval(
            bundle,
            EvalConfig(
                zeroshot=data["bad"],
                classnames=data["names"],
                templates=data["templates"],
                workers=2,
            ),
        )
    nocls = str(tmp_path / "nocls.tar")
    with wds.TarWriter(nocls) as w:
        w.write({"__key__": "x", "png": data["zs_samples"][0]["png"]})
    with pytest.raises(ConfigError, match=r"eval\.zeroshot: .* no `cls` key"):
        _eval(
            bundle,
            EvalConfig(zeroshot=nocls, classnames=data["names"], templates=data["templates"]),
        )
    (tmp_path / "two.txt").write_text("cat\ndog\n")
    with pytest.raises(
        ConfigError, match=r"eval\.classnames: 2 class names, but .* 3 class folders"
    ):
        _eval(
            bundle,
            EvalConfig(
                zeroshot=data["folder"],
                classnames=str(tmp_path / "two.txt"),
                templates=data["templates"],
                workers=0,
            ),
        )
    with pytest.raises(
        ConfigError, match=r"eval\.retrieval: shard .*missing-000000.tar. and 1 more not found"
    ):
        _eval(bundle, EvalConfig(retrieval=str(tmp_path / "missing-{000000..000001}.tar")))
    with pytest.raises(ConfigError, match=r"eval\.retrieval_chunk_size"):
        EvalConfig(retrieval_chunk_size=0)


# ------------------------------------------------------------------------------------------
# Standalone command and distributed evaluation


def _save_weights(bundle, path: Path) -> str:
    torch.save(bundle.model.state_dict(), path)
    return str(path)


def test_run_eval_from_exported_file_and_checkpoint_dir(bundle, data, tmp_path, capsys):
    weights = _save_weights(bundle, tmp_path / "model.pt")
    cfg = Config(
        model=ModelConfig(name=TINY),
        eval=_full_cfg(data),
        train=TrainConfig(output_dir=str(tmp_path / "run")),
    )
    got = run_eval(cfg, weights, None)
    saved = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert saved["results"] == got and saved["checkpoint"] == weights
    assert "| zeroshot/top1 |" in capsys.readouterr().out
    ref = _eval(bundle, _full_cfg(data))
    assert got == pytest.approx(ref, abs=1e-6)
    # A training checkpoint directory (accelerate's save_state of the DualEncoder wrapper).
    ckpt = tmp_path / "step_00000010"
    ckpt.mkdir()
    torch.save(
        {f"clip.{k}": v for k, v in bundle.model.state_dict().items()}, ckpt / "pytorch_model.bin"
    )
    cfg = Config(
        model=ModelConfig(name=TINY),
        eval=_full_cfg(data),
        train=TrainConfig(output_dir=str(tmp_path / "run")),
    )
    assert run_eval(cfg, str(ckpt), str(tmp_path / "dir.json")) == pytest.approx(ref, abs=1e-6)
    with pytest.raises(ConfigError, match="nothing to evaluate"):
        run_eval(Config(model=ModelConfig(name=TINY)), weights, None)


@pytest.mark.slow
def test_two_process_evaluation_equals_one_process(bundle, data, tmp_path):
    weights = _save_weights(bundle, tmp_path / "model.pt")
    full = _full_cfg(data, validation=data["pairs"], val_batch_size=10)
    spec = {
        "model": TINY,
        "weights": weights,
        "eval": {
            k: getattr(full, k)
            for k in (
                "zeroshot",
                "classnames",
                "templates",
                "retrieval",
                "validation",
                "val_batch_size",
                "batch_size",
                "workers",
                "retrieval_chunk_size",
            )
        },
        "imagefolder_eval": {
            "zeroshot": data["folder"],
            "classnames": data["names"],
            "templates": data["templates"],
            "batch_size": 4,
            "workers": 2,
        },
        "bad_eval": {
            "zeroshot": data["bad"],
            "classnames": data["names"],
            "templates": data["templates"],
            "workers": 2,
        },
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    out = tmp_path / "out"
    out.mkdir()
    proc = launch(["tests/helpers/eval_distributed.py", str(tmp_path / "spec.json"), str(out)], timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0 = json.loads((out / "rank0.json").read_text())
    assert r0["world_size"] == 2 and r0["backend"] == "gloo"
    r1 = json.loads((out / "rank1.json").read_text())

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each launched process (OMP_NUM_THREADS=1): the same kernels
    try:
        one = _eval(bundle, full)
    finally:
        torch.set_num_threads(threads)
    folder_one = _eval(bundle, EvalConfig(**spec["imagefolder_eval"]))
    for key in ("run_eval", "imagefolder"):
        assert r0[key] == r1[key], key  # every rank returns the same dict
    assert r0["run_eval"] == pytest.approx(one, abs=1e-5)
    # The validation loss: the same batches of the same embeddings, each batch computed whole on
    # one process, so the same numbers to the last bit.
    val = {k: v for k, v in one.items() if k.startswith("val/")}
    assert len(val) == 4 and {k: r0["run_eval"][k] for k in val} == val
    assert r0["imagefolder"] == pytest.approx(folder_one, abs=1e-5)
    # No sample lost or read twice, though rank 1 had no retrieval shard.
    assert r0["run_eval"]["zeroshot/num_samples"] == sum(ZS_SIZES)
    assert r0["run_eval"]["retrieval/num_images"] == RET_SIZE
    assert json.loads((out / "eval.json").read_text())["results"] == r0["run_eval"]
    # The bad class index is in rank 1's shard only: rank 1 names it, rank 0 fails too (no hang).
    assert r1["bad"].startswith("ConfigError: eval.zeroshot: class index 3"), r1["bad"]
    assert r0["bad"].startswith("RuntimeError: evaluation failed on another process"), r0["bad"]


# ------------------------------------------------------------------------------------------
# Evaluation during training: encoders in the training precision, maths in float32


def _autocast_bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def test_training_evaluation_under_bf16_equals_standalone(bundle, data, monkeypatch):
    """Issue 13, defect 3: run_evaluation used to wrap the whole evaluation in autocast, so
    similarities, top-k and uniformity were bf16. Now only the encoders are: the in-training
    numbers must equal a standalone evaluation whose encoders (only) run under bf16."""
    from types import SimpleNamespace

    from clip_train.train import run_evaluation

    cfg = Config(model=ModelConfig(name=TINY), eval=_full_cfg(data))
    accelerator = SimpleNamespace(
        autocast=_autocast_bf16, device=torch.device("cpu"), process_index=0, num_processes=1,
        is_main_process=True,
    )
    # The training model is the open_clip model itself here (unsharded: nothing to gather).
    in_training = run_evaluation(accelerator, bundle.model, bundle.model, cfg, bundle)
    fp32 = _eval(bundle, cfg.eval)

    model = bundle.model
    for name in ("encode_image", "encode_text"):
        encoder = getattr(model, name)

        def under_bf16(*args, _encoder=encoder, **kwargs):
            with _autocast_bf16():
                return _encoder(*args, **kwargs)

        monkeypatch.setattr(model, name, under_bf16)  # works with the old evaluate as well
    standalone = _eval(bundle, cfg.eval)
    monkeypatch.undo()
    assert in_training == standalone
    # Not vacuous: bf16 encoders change the numbers (so autocast was on where it mattered).
    assert in_training["retrieval/uniformity"] != fp32["retrieval/uniformity"]


# ------------------------------------------------------------------------------------------
# Several named evaluations, each on its own cadence; shared zero-shot classifiers


class _CountTextForwards:
    """Counts encode_text calls of a model (the prompts of zero-shot classifiers)."""

    def __init__(self, model, monkeypatch):
        self.calls = 0
        encode_text = model.encode_text

        def counted(*args, **kwargs):
            self.calls += 1
            return encode_text(*args, **kwargs)

        monkeypatch.setattr(model, "encode_text", counted)


def test_named_sets_prefix_metrics_and_follow_their_cadence(bundle, data, monkeypatch):
    plain = _eval(bundle, _full_cfg(data))
    counter = _CountTextForwards(bundle.model, monkeypatch)
    only_a = EvalConfig(zeroshot={"a": data["zeroshot"]}, classnames=data["names"],
                        templates=data["templates"], batch_size=4, workers=0)
    _eval(bundle, only_a)
    one_classifier = counter.calls
    assert one_classifier > 0
    cfg = EvalConfig(
        every_steps=4,
        zeroshot={"a": data["zeroshot"], "b": {"data": data["folder"], "every_steps": 2}},
        classnames=data["names"],
        templates=data["templates"],
        retrieval={"r": {"data": data["retrieval"], "every_steps": 3}},
        batch_size=4,
        workers=0,
        retrieval_chunk_size=3,
    )
    everything = _eval(bundle, cfg)
    for key, value in plain.items():
        kind, metric = key.split("/", 1)
        names = ("a", "b") if kind == "zeroshot" else ("r",)
        for name in names:
            assert everything[f"{kind}/{name}/{metric}"] == pytest.approx(value, abs=1e-6), key
    assert len(everything) == 2 * 4 + len([k for k in plain if k.startswith("retrieval/")])

    def at(step):
        out = evaluate(bundle.model, cfg, transform=bundle.eval_transform,
                       tokenizer=bundle.tokenizer, device="cpu", step=step)
        return sorted({k.split("/")[1] for k in out})

    counter.calls = 0
    assert at(4) == ["a", "b"]
    assert counter.calls == one_classifier  # a and b share names and templates: one classifier
    assert at(2) == ["b"] and at(3) == ["r"] and at(5) == []
    assert at(12) == ["a", "b", "r"]
    assert [cfg.due(s) for s in (1, 2, 3, 4, 5)] == [False, True, True, True, False]
    assert not EvalConfig(zeroshot={"a": data["zeroshot"]}, classnames="imagenet").due(4)


def test_frozen_text_tower_classifier_is_computed_once_per_run(bundle, data, monkeypatch):
    import copy

    from clip_train.evaluate import ClassifierCache

    model = copy.deepcopy(bundle.model)
    cfg = EvalConfig(zeroshot=data["zeroshot"], classnames=data["names"],
                     templates=data["templates"], batch_size=4, workers=0)
    counter = _CountTextForwards(model, monkeypatch)

    def run(cache):
        return evaluate(model, cfg, transform=bundle.eval_transform, tokenizer=bundle.tokenizer,
                        device="cpu", cache=cache)

    cache = ClassifierCache()
    first = run(cache)
    per_classifier = counter.calls
    assert run(cache) == first and counter.calls == 2 * per_classifier  # text tower trainable
    for name, p in model.named_parameters():
        if not name.startswith("visual.") and name not in ("logit_scale", "logit_bias"):
            p.requires_grad_(False)  # what model.lock_text does
    counter.calls = 0
    assert run(cache) == first and counter.calls == per_classifier  # computed once ...
    assert run(cache) == first and run(cache) == first and counter.calls == per_classifier
    run(None)  # ... and without a cache, every evaluation computes its own
    assert counter.calls == 2 * per_classifier


@pytest.mark.parametrize("overrides, key", [
    (["eval.zeroshot.a.evry=3", "eval.zeroshot.a.data=x.tar"], "eval.zeroshot.a.evry"),
    (["eval.retrieval.r.data=x.tar", "eval.retrieval.r.every_steps=-1"], "eval.retrieval.r.every_steps"),
    (["eval.zeroshot.a=x.tar"], "eval.zeroshot.a.classnames"),
    (["eval.zeroshot.a.every_steps=2"], "eval.zeroshot.a.data"),
    (["eval.validation.v.data=x.tar", "eval.validation.v.classnames=n.txt"], "eval.validation.v.classnames"),
    (["eval.val_batch_size=1"], "eval.val_batch_size"),
])
def test_eval_set_errors_name_the_key(overrides, key):
    from clip_train.config import load_config

    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert str(err.value).startswith(key), str(err.value)


def test_named_sets_from_yaml_and_overrides(tmp_path):
    from clip_train.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text("eval:\n  classnames: imagenet\n  zeroshot:\n    imagenet: /d/in/val\n"
                    "    v2: {data: /d/v2, every_steps: 500, templates: t.txt}\n")
    cfg = load_config(str(path), ["eval.retrieval=r.tar", "eval.zeroshot.sketch=/d/sk"])
    sets = cfg.eval.zeroshot_sets()
    assert list(sets) == ["eval.zeroshot.imagenet", "eval.zeroshot.v2", "eval.zeroshot.sketch"]
    assert sets["eval.zeroshot.v2"].every_steps == 500 and sets["eval.zeroshot.v2"].templates == "t.txt"
    assert list(cfg.eval.retrieval_sets()) == ["eval.retrieval"]


# ------------------------------------------------------------------------------------------
# Validation contrastive loss


def _reference_batch_loss(img_BD, txt_BD, scale, bias, kind) -> float:
    """float64, from the definitions: CLIP's symmetric cross-entropy, SigLIP's pairwise
    -log sigmoid summed over pairs and divided by the batch."""
    a, b = F.normalize(img_BD.double(), dim=-1), F.normalize(txt_BD.double(), dim=-1)
    logits = scale * a @ b.T
    n = a.shape[0]
    if kind == "clip":
        labels = torch.arange(n)
        return float((F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2)
    sign = 2 * torch.eye(n, dtype=torch.float64) - 1
    return float(-F.logsigmoid(sign * (logits + bias)).sum() / n)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_validation_batches_are_identical_for_any_process_count(kind):
    from clip_train.evaluate import validation_batch_losses, validation_metrics

    n, batch = 23, 5  # 5 batches, the last of 3
    img_ND = _unit(n, seed=12)
    # Well aligned at scale 100, as late in training: small losses, nothing may cancel.
    txt_ND = F.normalize(img_ND + 0.05 * _unit(n, seed=13), dim=-1) * 3.0
    scale, bias = torch.tensor(math.log(100.0)), torch.tensor(-10.0) if kind == "siglip" else None
    kw = dict(batch_size=batch, kind=kind, max_logit_scale=100.0)
    one = validation_batch_losses(img_ND, txt_ND, scale, bias, **kw)
    for world in (2, 3, 7):
        parts = [validation_batch_losses(img_ND, txt_ND, scale, bias, rank=r, world_size=world, **kw)
                 for r in range(world)]
        assert torch.equal(torch.stack(parts).sum(0), one), world
    ref = [_reference_batch_loss(img_ND[j:j + batch], txt_ND[j:j + batch], 100.0,
                                 -10.0 if bias is not None else 0.0, kind) for j in range(0, n, batch)]
    torch.testing.assert_close(one, torch.tensor(ref, dtype=torch.float64), rtol=1e-4, atol=1e-6)
    m = validation_metrics(one, n, batch)
    assert m["val/loss"] == pytest.approx(float(np.mean(ref)), rel=1e-4)
    sizes = [5, 5, 5, 5, 3]
    assert m["val/loss_per_sample"] == pytest.approx(float(np.dot(ref, sizes) / n), rel=1e-4)
    assert m["val/num_samples"] == n and m["val/num_batches"] == 5


def test_validation_loss_end_to_end_matches_float64_reference(bundle, data):
    cfg = EvalConfig(validation={"pairs": data["pairs"]}, val_batch_size=10, batch_size=7,
                     workers=2)
    got = _eval(bundle, cfg)
    samples = data["pair_samples"]  # in shard order: the canonical order of the batches
    model, tf, tok = bundle.model, bundle.eval_transform, bundle.tokenizer
    with torch.no_grad():
        img = model.encode_image(torch.stack([tf(s["png"]) for s in samples]))
        txt = model.encode_text(tok([s["txt"] for s in samples]))
    scale = float(model.logit_scale.detach().exp())
    ref = [_reference_batch_loss(img[j:j + 10], txt[j:j + 10], scale, 0.0, "clip")
           for j in range(0, len(samples), 10)]
    sizes = [len(samples[j:j + 10]) for j in range(0, len(samples), 10)]
    assert got["val/pairs/loss"] == pytest.approx(float(np.mean(ref)), rel=1e-5)
    assert got["val/pairs/loss_per_sample"] == pytest.approx(np.dot(ref, sizes) / sum(sizes), rel=1e-5)
    assert got["val/pairs/num_samples"] == len(samples) and got["val/pairs/num_batches"] == len(ref)


# ------------------------------------------------------------------------------------------
# clip_benchmark's webdataset folders and progress


def test_clip_benchmark_folder_gives_data_names_and_templates(bundle, data, tmp_path):
    from helpers.clip_benchmark_data import write_clip_benchmark_folder

    folder = write_clip_benchmark_folder(
        tmp_path / "wds_things", data["zs_samples"], CLASSNAMES,
        ["a photo of a {c}.", "{c} in the wild", "a drawing of the {c} (sketch)"], shard_sizes=ZS_SIZES,
    )
    got = _eval(bundle, EvalConfig(zeroshot={"things": str(folder)}, batch_size=4, workers=2))
    ref = _eval(bundle, EvalConfig(zeroshot=data["zeroshot"], classnames=data["names"],
                                   templates=data["templates"], batch_size=4, workers=2))
    assert got == {k.replace("zeroshot/", "zeroshot/things/"): v for k, v in ref.items()}
    # The entry's own class names win over the folder's (here: the same names in a JSON file).
    (tmp_path / "names.json").write_text(json.dumps(CLASSNAMES))
    again = _eval(bundle, EvalConfig(zeroshot={"t": {"data": str(folder), "classnames": str(tmp_path / "names.json")}}))
    assert again["zeroshot/t/top1"] == ref["zeroshot/top1"]
    (folder / "test" / "nshards.txt").write_text("4\n")
    with pytest.raises(ConfigError, match=r"eval\.zeroshot\.things: shard .*3\.tar. not found"):
        _eval(bundle, EvalConfig(zeroshot={"things": str(folder)}))


def test_long_evaluation_logs_progress_without_a_terminal(bundle, data, monkeypatch, caplog):
    import logging

    import clip_train.evaluate.data as eval_data

    monkeypatch.setattr(eval_data, "PROGRESS_LOG_EVERY_S", 0.0)
    with caplog.at_level(logging.INFO, logger="clip_train.evaluate"):
        _eval(bundle, EvalConfig(retrieval=data["retrieval"], batch_size=2, workers=0))
        assert not [r for r in caplog.records if "eval.retrieval:" in r.getMessage()]  # not the main process
        evaluate(bundle.model, EvalConfig(retrieval=data["retrieval"], batch_size=2, workers=0),
                 transform=bundle.eval_transform, tokenizer=bundle.tokenizer, device="cpu",
                 show_progress=True)
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("eval.retrieval: 1 batches") for line in lines), lines
    assert any("done, 4 batches" in line for line in lines), lines
