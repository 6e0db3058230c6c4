"""Gradient cache: chunked steps give the gradients of one full-batch step (1 process).

Reference: the same loss over the same forward with graphs kept for the whole batch. With dropout
on, the reference encodes the same chunks in the same RNG order (image then text per chunk),
since one big forward would draw different masks; with dropout off it is one full-batch forward.
The 2-process equality lives in test_distributed.py.
"""

import contextlib
import types

import pytest
import torch
from toy import ToyClip, clip_loss, toy_batch

from clip_train.grad_cache import chunk_slices, train_step
from clip_train.model import DualEncoder

B = 8


def plain_accelerator(autocast=contextlib.nullcontext):
    return types.SimpleNamespace(autocast=autocast, backward=lambda loss: loss.backward(),
                                 no_sync=lambda model: contextlib.nullcontext(), scaler=None)


def batch(seed=0):
    return toy_batch(B, seed)


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def reference_grads(model, images, texts, chunk):
    """Same RNG order as the cache's first pass; graphs kept for the whole batch."""
    imgs, txts = [], []
    for sl in chunk_slices(len(images), chunk):
        imgs.append(model.clip.encode_image(images[sl]))
        txts.append(model.clip.encode_text(texts[sl]))
    loss = clip_loss(torch.cat(imgs), torch.cat(txts), model.clip.logit_scale)
    loss.backward()
    return loss.detach(), grads(model)


def assert_grads_close(got, want, rtol=1e-5):
    assert got.keys() == want.keys()
    for name in want:
        err = (got[name] - want[name]).norm() / want[name].norm().clamp_min(1e-12)
        assert err <= rtol, f"{name}: relative error {err:.2e} > {rtol}"


def test_chunk_slices_cover_the_batch():
    assert chunk_slices(8, 3) == [slice(0, 3), slice(3, 6), slice(6, 8)]
    assert chunk_slices(8, 8) == [slice(0, 8)]


@pytest.mark.parametrize("chunk", [1, 3, 4])
def test_chunked_equals_full_batch_with_dropout(chunk):
    torch.manual_seed(0)
    model = DualEncoder(ToyClip(p=0.3))
    images, texts = batch()
    torch.manual_seed(123)
    ref_loss, want = reference_grads(model, images, texts, chunk)
    model.zero_grad()
    torch.manual_seed(123)
    out = train_step(model, images, texts, loss_fn=clip_loss, chunk_size=chunk, accelerator=plain_accelerator())
    assert torch.allclose(out.loss, ref_loss, rtol=1e-6)
    assert_grads_close(grads(model), want)
    assert "clip.logit_scale" in want


def test_dropout_is_really_random_so_the_test_can_fail():
    """Without RNG replay the second pass would draw other masks: the two forwards must differ."""
    model = DualEncoder(ToyClip(p=0.3))
    images, _ = batch()
    assert not torch.allclose(model.clip.encode_image(images), model.clip.encode_image(images))


@pytest.mark.parametrize("chunk", [3, 4, None])
def test_no_dropout_equals_one_full_forward(chunk):
    torch.manual_seed(0)
    model = DualEncoder(ToyClip(p=0.0))
    images, texts = batch(1)
    out = model(images, texts)
    clip_loss(out["image"], out["text"], out["logit_scale"]).backward()
    want = grads(model)
    model.zero_grad()
    train_step(model, images, texts, loss_fn=clip_loss, chunk_size=chunk, accelerator=plain_accelerator())
    assert_grads_close(grads(model), want)


def test_locked_image_tower_gets_no_second_pass():
    torch.manual_seed(0)
    model = DualEncoder(ToyClip(p=0.0))
    model.clip.visual.requires_grad_(False)
    images, texts = batch(2)
    out = model(images, texts)
    clip_loss(out["image"], out["text"], out["logit_scale"]).backward()
    want = grads(model)
    model.zero_grad()
    calls = []
    model.clip.visual.register_forward_hook(lambda *a: calls.append(1))
    train_step(model, images, texts, loss_fn=clip_loss, chunk_size=3, accelerator=plain_accelerator(),
               train_image=False)
    assert len(calls) == 3  # pass 1 only: three chunks, none re-encoded
    assert not any(n.startswith("clip.visual") for n in grads(model))
    assert_grads_close(grads(model), want)


def test_training_steps_with_and_without_chunks_give_same_weights():
    images, texts = batch(3)

    def run(chunk):
        torch.manual_seed(0)
        model = DualEncoder(ToyClip(p=0.0))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for _ in range(4):
            train_step(model, images, texts, loss_fn=clip_loss, chunk_size=chunk, accelerator=plain_accelerator())
            opt.step()
            opt.zero_grad()
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    full, chunked = run(None), run(3)
    for name in full:
        torch.testing.assert_close(chunked[name], full[name], rtol=1e-5, atol=1e-6)


def test_open_clip_tower_with_patch_dropout_replays_masks():
    """A real open_clip ViT (tiny config) with patch dropout: random masks, exact gradients."""
    import open_clip

    from clip_train.model import resolve_model_name

    name = resolve_model_name("configs/models/tiny-vit.json")
    torch.manual_seed(0)
    clip = open_clip.create_model(name, force_patch_dropout=0.5)
    clip.train()
    model = DualEncoder(clip)
    g = torch.Generator().manual_seed(0)
    images, texts = torch.randn(6, 3, 32, 32, generator=g), torch.randint(1, 400, (6, 32), generator=g)
    torch.manual_seed(5)
    _, want = reference_grads(model, images, texts, 4)
    model.zero_grad()
    torch.manual_seed(5)
    train_step(model, images, texts, loss_fn=clip_loss, chunk_size=4, accelerator=plain_accelerator())
    assert_grads_close(grads(model), want, rtol=1e-5)


def test_bf16_autocast_keeps_loss_in_float32():
    """The whole step under autocast: the loss over cached embeddings still runs in float32."""
    torch.manual_seed(0)
    model = DualEncoder(ToyClip(p=0.0))
    images, texts = batch(4)
    out = model(images, texts)
    clip_loss(out["image"], out["text"], out["logit_scale"]).backward()
    want = grads(model)
    model.zero_grad()
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    with autocast():
        res = train_step(model, images, texts, loss_fn=clip_loss, chunk_size=3, accelerator=plain_accelerator(autocast))
    assert res.loss.dtype == torch.float32
    assert_grads_close(grads(model), want, rtol=5e-2)  # bf16 encoders: ~3 significant digits


def test_gradient_checkpointing_composes_with_the_cache(monkeypatch):
    """open_clip's activation checkpointing inside the re-encoding pass: same gradients."""
    import open_clip
    import open_clip.transformer

    calls = []
    real = open_clip.transformer.checkpoint
    monkeypatch.setattr(open_clip.transformer, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))

    from clip_train.model import resolve_model_name

    name = resolve_model_name("configs/models/tiny-vit.json")
    g = torch.Generator().manual_seed(0)
    images, texts = torch.randn(6, 3, 32, 32, generator=g), torch.randint(1, 400, (6, 32), generator=g)
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        clip = open_clip.create_model(name)
        clip.set_grad_checkpointing(checkpointing)
        model = DualEncoder(clip)
        train_step(model, images, texts, loss_fn=clip_loss, chunk_size=4, accelerator=plain_accelerator())
        results.append(grads(model))
        assert bool(calls) == checkpointing  # really recomputed blocks when enabled
    assert_grads_close(results[1], results[0], rtol=1e-5)


def scaler_accelerator(scaler, autocast=contextlib.nullcontext):
    """What accelerate does under fp16: backward(loss) scales the loss through the GradScaler."""
    return types.SimpleNamespace(autocast=autocast, backward=lambda loss: scaler.scale(loss).backward(),
                                 no_sync=lambda model: contextlib.nullcontext(), scaler=scaler)


def fp32_step_grads(images, texts):
    torch.manual_seed(0)
    model = DualEncoder(ToyClip(p=0.0))
    train_step(model, images, texts, loss_fn=clip_loss, chunk_size=None, accelerator=plain_accelerator())
    return grads(model)


@pytest.mark.parametrize("chunk", [None, 3])
@pytest.mark.parametrize("fp16", [False, True])
def test_grad_scaler_step_unscales_to_the_fp32_gradients(chunk, fp16):
    """fp16 (GradScaler) + gradient cache: the old code multiplied by get_scale() without ever
    calling scaler.scale, so unscale_ raised `Attempted unscale_ but _scale is None`."""
    images, texts = batch(5)
    want = fp32_step_grads(images, texts)
    torch.manual_seed(0)
    model = DualEncoder(ToyClip(p=0.0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.float16)) if fp16 else contextlib.nullcontext
    train_step(model, images, texts, loss_fn=clip_loss, chunk_size=chunk,
               accelerator=scaler_accelerator(scaler, autocast))
    scaler.unscale_(opt)  # what accelerator.clip_grad_norm_ does first under fp16
    assert scaler.get_scale() == 2.0**12
    # fp32 compute: the scale is a power of two, so unscaling is exact up to summation order;
    # fp16 encoders keep ~3 significant digits.
    assert_grads_close(grads(model), want, rtol=2e-2 if fp16 else 1e-6)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    scaler.step(opt)
    scaler.update()
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters())  # a real step


def test_grad_scaler_skips_the_step_and_lowers_the_scale_on_inf_gradients():
    images, texts = batch(6)
    torch.manual_seed(0)
    model = DualEncoder(ToyClip(p=0.0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)

    def inf_loss(img, txt, scale, bias=None):
        return clip_loss(img, txt, scale) * float("inf")

    train_step(model, images, texts, loss_fn=inf_loss, chunk_size=3, accelerator=scaler_accelerator(scaler))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    scaler.unscale_(opt)
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert opt.state == {}  # AdamW never stepped: no moments, no step count
    assert scaler.get_scale() == 2.0**11
