"""Score a model folder the way a user of open_clip would, with nothing of clip_train: load it with
`create_model_and_transforms("local-dir:...")` and classify webdataset shards with open_clip's own
zero-shot classifier builder."""

from __future__ import annotations

import open_clip
import torch
import webdataset as wds


@torch.no_grad()
def open_clip_zeroshot_top1(folder: str, shards: str, classnames: list[str], templates: list[str]) -> float:
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    model.eval()
    classifier = open_clip.build_zero_shot_classifier(model, tokenizer, classnames, templates,
                                                      num_classes_per_batch=None, use_tqdm=False)
    correct = total = 0
    for image, cls in wds.WebDataset(shards, shardshuffle=False).decode("pil").to_tuple("png", "cls"):
        emb = model.encode_image(preprocess(image).unsqueeze(0), normalize=True)
        correct += int((emb @ classifier).argmax(dim=-1).item() == int(cls))
        total += 1
    return correct / total
