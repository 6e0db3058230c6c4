#!/usr/bin/env bash
# N processes on this machine through `accelerate launch`: one per GPU when GPUs are present,
# else 2 CPU processes with gloo. Arguments go to `clip-train`, e.g.
#   launch/local.sh train --config configs/demo.yaml train.steps=100
# NPROC=N overrides the process count; MAIN_PROCESS_PORT the rendezvous port (0: any free port).
set -euo pipefail
gpus=0
if command -v nvidia-smi >/dev/null 2>&1; then
  gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
fi
if [ "$gpus" -gt 0 ] && [ "${ACCELERATE_USE_CPU:-}" != "true" ]; then
  n=${NPROC:-$gpus}
else
  # Without this accelerate (>= 1.13) runs each CPU process alone, with no gradient sync.
  export ACCELERATE_USE_CPU=true
  n=${NPROC:-2}
fi
multi=()
[ "$n" -gt 1 ] && multi=(--multi_gpu)
# One process per core group: oversubscribed OpenMP threads slow every process down.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( ( $(nproc) + n - 1 ) / n ))}
exec python -m accelerate.commands.launch "${multi[@]}" --num_processes "$n" --num_machines 1 \
  --main_process_port "${MAIN_PROCESS_PORT:-0}" -m clip_train "$@"
