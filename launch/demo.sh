#!/usr/bin/env bash
# The main job: make the digits shards, train on them (2 CPU processes or all GPUs), evaluate
# zero-shot on the held-out split. Extra arguments are config overrides (e.g. train.steps=50).
set -euo pipefail
cd "$(dirname "$0")/.."
export WANDB_MODE=${WANDB_MODE:-offline}
[ -f demo_data/summary.json ] || python -m clip_train make-demo --output demo_data
start=$(date +%s)
bash launch/local.sh train --config configs/demo.yaml "$@"
python - "$(( $(date +%s) - start ))" <<'PY'
import json, sys
r = json.load(open("runs/demo/eval.json"))
print(f"\nDemo finished in {sys.argv[1]} s. Held-out digits ({r.get('zeroshot/num_samples', '?')} images):")
print(f"  zero-shot top-1 accuracy {r['zeroshot/top1']:.3f} (chance 0.100), top-5 {r['zeroshot/top5']:.3f}")
if "retrieval/image_to_text_R@1" in r:
    print(f"  retrieval R@1 image->text {r['retrieval/image_to_text_R@1']:.3f}, text->image {r['retrieval/text_to_image_R@1']:.3f}")
print("Curves: runs/demo/report.png (with the final numbers and the config: runs/demo/report.html)")
print("Model: runs/demo/model (open_clip's hub layout: open_clip.create_model_and_transforms('local-dir:runs/demo/model'))")
PY
