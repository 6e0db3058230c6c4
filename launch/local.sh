#!/usr/bin/env bash
# N processes on this machine through `accelerate launch`: one per GPU when GPUs are present,
# else 2 CPU processes with gloo. Arguments go to `clip-train`, e.g.
#   launch/local.sh train --config configs/demo.yaml train.steps=100
# NPROC=N overrides the process count; MAIN_PROCESS_PORT the rendezvous port (0: any free port).
# RESTARTS=N: the launcher restarts all processes up to N times after a process fails or hangs
# (train.hang_timeout_s), each restart resuming from the newest checkpoint: a free port is fixed
# here (a restarted group cannot rendezvous on port 0) and train.resume=latest is passed unless
# the arguments name a train.resume (an explicit checkpoint is then resumed on every attempt).
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
port=${MAIN_PROCESS_PORT:-0}
restarts=${RESTARTS:-0}
restart_args=()
if [ "$restarts" -gt 0 ]; then
  if [ "$port" = 0 ]; then
    port=$(python -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')
  fi
  restart_args=(--max_restarts "$restarts")
  if [ "${1:-}" = train ] && [[ " $* " != *" train.resume="* ]]; then
    set -- "$@" train.resume=latest
  fi
fi
exec python -m accelerate.commands.launch "${multi[@]}" --num_processes "$n" --num_machines 1 \
  --main_process_port "$port" "${restart_args[@]}" -m clip_train "$@"
