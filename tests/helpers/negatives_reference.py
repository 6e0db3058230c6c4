"""Float64 references for the loss options of clip_train.negatives / loss.py, written from the
papers rather than from our implementation: explicit loops over rows and linear-space sums (no
log-sum-exp tricks; float64 holds e^200), and a full-matrix cross entropy for the queue."""

import torch
import torch.nn.functional as F


def queue_infonce(img, txt, logit_scale, queue_img=None, queue_txt=None, max_logit_scale=100.0):
    """Symmetric InfoNCE with the queued keys appended as negative columns (MoCo's l_neg):
    image rows against [texts; queued texts], text rows against [images; queued images]."""
    scale = logit_scale.exp().clamp(max=max_logit_scale)
    img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    txt_cols, img_cols = txt, img
    if queue_img is not None:
        txt_cols = torch.cat([txt, F.normalize(queue_txt, dim=-1)])
        img_cols = torch.cat([img, F.normalize(queue_img, dim=-1)])
    labels = torch.arange(len(img))
    i2t = F.cross_entropy(scale * img @ txt_cols.T, labels)
    t2i = F.cross_entropy(scale * txt @ img_cols.T, labels)
    return (i2t + t2i) / 2


def debiased_hard_loss(img, txt, logit_scale, queue_img=None, queue_txt=None, tau_plus=0.0, beta=0.0,
                       max_logit_scale=100.0):
    """Chuang et al. 2020 (DCL) with Robinson et al. 2021 (HCL) importance weights, per row as in
    the authors' code: neg = e^{x_j}, imp = e^{beta x_j}, reweight = sum(imp * neg) / mean(imp),
    Ng = clamp((reweight - tau+ * N * pos) / (1 - tau+), min=N * e^{-1/t}),
    loss = -log(pos / (pos + Ng)), averaged over rows and the two directions.

    Returns (loss, number of rows where the clamp binds)."""
    s = logit_scale.exp().clamp(max=max_logit_scale)
    img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    extra_img = F.normalize(queue_img, dim=-1) if queue_img is not None else img[:0]
    extra_txt = F.normalize(queue_txt, dim=-1) if queue_txt is not None else txt[:0]
    total, clamped = 0.0, 0
    b = len(img)
    for rows, cols, extra in ((img, txt, extra_txt), (txt, img, extra_img)):
        candidates = torch.cat([cols, extra])
        for i in range(b):
            pos = torch.exp(s * rows[i] @ cols[i])
            negs = torch.stack([torch.exp(s * rows[i] @ candidates[j])
                                for j in range(len(candidates)) if j != i])
            n = len(negs)
            imp = negs**beta
            reweight_neg = (imp * negs).sum() / imp.mean()
            ng = (-tau_plus * n * pos + reweight_neg) / (1 - tau_plus)
            floor = n * torch.exp(-s)
            clamped += int(ng < floor)
            ng = torch.clamp(ng, min=floor)
            total = total - torch.log(pos / (pos + ng)) / b
    return total / 2, clamped
