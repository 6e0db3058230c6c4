"""Staying alive on a cluster: hung processes, launcher restarts, restart loops, stragglers.

- `Watchdog`: a process that makes no progress for its phase's allowance (start-up, the first
  step, a step, an evaluation, a checkpoint; `train.hang_*`) writes every thread's Python stack to
  the log and to `<output_dir>/faults/stacks-rank<R>.txt`, then exits with code 1 so that the
  launcher (`accelerate launch --max_restarts N`) restarts the whole group. Two mechanisms, since
  the stuck thread may hold the GIL: a Python thread (dumps to the log and the file) and, a few
  seconds later, faulthandler's C thread, which needs no GIL (dumps to the file; the next
  attempt copies that dump into the log).
- `attempt_rendezvous`: the process group's store keys are scoped by the launcher's attempt
  number. torchelastic (static and c10d rendezvous) keeps one TCP store across restarts, and
  process-group keys are not scoped by attempt: a restarted group read the dead group's gloo
  addresses (`connectFullMesh failed ... Connection refused`) or its barrier counters.
- `set_collective_timeout`: after the first step, collectives time out with the watchdog's
  allowance of the phase (torchtitan shortens its timeout the same way).
- `RestartGuard`: a run restarted again and again without a new step stops with one line.
- `Stragglers`: at logging steps every process's step time and data-wait fraction reach the
  main process; the slowest process is in the metrics, a persistent one in a warning.
"""

from __future__ import annotations

import atexit
import faulthandler
import json
import logging
import os
import signal
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import torch

from clip_train.config import ClipTrainError

log = logging.getLogger("clip_train")

ATTEMPT_SCHEME = "clip-train-attempt"
HEADER = "clip-train watchdog:"  # starts the Python thread's dump (the C thread's has none)


def attempt_number() -> int:
    """The launcher's restart count (0: the first attempt; no launcher: 0)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def faults_dir(output_dir: str) -> str:
    return os.path.join(output_dir, "faults")


# ---------------------------------------------------------------- rendezvous across restarts

def _attempt_rendezvous_handler(url: str, timeout: timedelta = timedelta(minutes=30), **kwargs):
    """env:// rendezvous whose store keys start with this attempt's number."""
    from torch.distributed import PrefixStore
    from torch.distributed.rendezvous import rendezvous

    query = url.split("?", 1)[1] if "?" in url else ""
    store, rank, world_size = next(rendezvous(f"env://?{query}" if query else "env://", timeout=timeout))
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # The launcher's store, kept across its restarts; otherwise rank 0 makes a new one.
        store = PrefixStore(f"clip_train/attempt_{attempt_number()}", store)  # keys: <prefix>/<key>
    yield store, rank, world_size
    raise RuntimeError("clip-train's rendezvous cannot re-rendezvous: the launcher restarts the processes")


def attempt_rendezvous() -> str:
    """The `init_method` for `torch.distributed.init_process_group`: env:// (MASTER_ADDR,
    MASTER_PORT, RANK, WORLD_SIZE, as every launcher sets them) with keys scoped by attempt."""
    from torch.distributed.rendezvous import _rendezvous_handlers, register_rendezvous_handler

    if ATTEMPT_SCHEME not in _rendezvous_handlers:
        register_rendezvous_handler(ATTEMPT_SCHEME, _attempt_rendezvous_handler)
    return f"{ATTEMPT_SCHEME}://"


def set_collective_timeout(seconds: float) -> None:
    """Change the default process group's collective timeout after init (gloo and NCCL read it
    for every new collective). No group or a torch without the hook: nothing."""
    import torch.distributed as dist

    # torch >= 2.10 names it set_timeout; before, the private _set_pg_timeout (as torchtitan uses).
    setter = getattr(dist, "set_timeout", None) or getattr(dist.distributed_c10d, "_set_pg_timeout", None)
    if dist.is_available() and dist.is_initialized() and setter is not None:
        setter(timedelta(seconds=seconds))


def nccl_dump_env(output_dir: str) -> dict[str, str]:
    """PyTorch's NCCL watchdog and flight recorder, set before the process group exists (CUDA):
    a collective that times out dumps the last collectives of every rank to
    <output_dir>/faults/nccl_trace_rank_<R> (read with `python -m torch.distributed.flight_recorder`).
    Variables the user set win."""
    prefix = os.path.join(os.path.abspath(faults_dir(output_dir)), "nccl_trace_rank_")
    wanted = {
        "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",       # dump the flight recorder when a collective times out
        "TORCH_FR_BUFFER_SIZE": "2000",          # record the last 2000 collectives (0: recorder off)
        "TORCH_NCCL_TRACE_BUFFER_SIZE": "2000",  # its name before torch 2.7
        "TORCH_FR_DUMP_TEMP_FILE": prefix,
        "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": prefix,  # its name before torch 2.7
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "3",  # a timed-out collective ends the process
    }
    set_now = {k: v for k, v in wanted.items() if k not in os.environ}
    os.environ.update(set_now)
    return set_now


# ---------------------------------------------------------------- hang detection

@dataclass
class Allowances:
    """Seconds without progress allowed in each phase (0 in `step`: hang detection off)."""

    step: float
    startup: float
    first_step: float
    evaluation: float
    checkpoint: float

    @classmethod
    def from_config(cls, train_cfg) -> Allowances:
        return cls(step=train_cfg.hang_timeout_s, startup=train_cfg.hang_startup_timeout_s,
                   first_step=train_cfg.hang_first_step_timeout_s, evaluation=train_cfg.hang_eval_timeout_s,
                   checkpoint=train_cfg.hang_checkpoint_timeout_s)


class Watchdog:
    """Ends this process, with every thread's stack written down, when a phase outlasts its
    allowance. `phase()` starts a phase (re-arms the timer); the hot loop calls `step()`, which is
    an attribute store except at the first step after a start."""

    def __init__(self, allowances: Allowances, output_dir: str, rank: int):
        self.allowances, self.rank = allowances, rank
        self.enabled = allowances.step > 0
        self.name, self.allowance, self.deadline = "start-up", allowances.startup, time.monotonic() + allowances.startup
        self.collective_s: float | None = None  # the collective timeout this watchdog last set
        self.first_step_done = False
        self.steps_started, self.step_number = 0, 0
        self._stop = threading.Event()
        self._file = None
        self._thread: threading.Thread | None = None
        if not self.enabled:
            return
        os.makedirs(faults_dir(output_dir), exist_ok=True)
        self.path = os.path.join(faults_dir(output_dir), f"stacks-rank{rank}.txt")
        self._report_earlier_dump()
        # Opened now: when the stuck thread holds the GIL nothing can open a file later.
        self._file = open(self.path, "a")  # noqa: SIM115  (kept open for faulthandler's C thread)
        self._thread = threading.Thread(target=self._watch, name="clip-train-watchdog", daemon=True)
        self._arm_backstop()
        self._thread.start()

    def _report_earlier_dump(self) -> None:
        """A dump left by an earlier attempt (perhaps by the C thread, which cannot write to the
        log): into this attempt's log, then kept under a name of its own."""
        if not os.path.isfile(self.path) or os.path.getsize(self.path) == 0:
            return
        with open(self.path) as f:
            text = f.read()
        kept = self.path.removesuffix(".txt") + time.strftime("-%Y%m%d-%H%M%S.txt", time.localtime(os.path.getmtime(self.path)))
        os.replace(self.path, kept)
        if text.startswith(HEADER):  # the Python thread wrote it to the log already
            log.warning("rank %d hung in an earlier attempt; its stacks are kept in %s", self.rank, kept)
        else:
            log.warning("rank %d hung in an earlier attempt (stuck holding the GIL: only the file got its "
                        "stacks); its stacks (kept in %s):\n%s", self.rank, kept, text[-20000:])

    def _check_every_s(self) -> float:
        return min(5.0, max(0.05, self.allowance / 20))

    def _arm_backstop(self) -> None:
        # The C thread fires only if the Python thread could not (it re-arms this every check).
        margin = 2 * self._check_every_s() + 2.0
        left = max(self.deadline - time.monotonic(), 0.0)
        faulthandler.dump_traceback_later(left + margin, repeat=False, file=self._file, exit=True)

    def phase(self, name: str, allowance: float) -> None:
        """A phase that may take up to `allowance` seconds without calling back."""
        if not self.enabled:
            return
        self.name, self.allowance = name, allowance
        self.deadline = time.monotonic() + allowance
        self._set_collectives(allowance)

    def step(self, step: int) -> None:
        """Called as every step starts (`step` is 1-based): re-arms the timer."""
        if not self.enabled:
            return
        self.step_number = step
        if self.steps_started == 0:
            self.phase("the first step after start-up", self.allowances.first_step)
        else:
            self.first_step_done = True
            if self.name != "step":
                self.phase("step", self.allowances.step)  # back from an evaluation or a checkpoint
            else:
                self.deadline = time.monotonic() + self.allowances.step
        self.steps_started += 1

    def _set_collectives(self, allowance: float) -> None:
        # Before the first step has passed, collectives keep train.process_group_timeout_s: the
        # first collectives wait for the slowest process's start-up.
        if not self.first_step_done:
            return
        seconds = allowance + 2 * self._check_every_s() + 1.0  # the watchdog dumps first
        if seconds != self.collective_s:
            set_collective_timeout(seconds)
            self.collective_s = seconds

    def _watch(self) -> None:
        while not self._stop.wait(self._check_every_s()):
            if time.monotonic() > self.deadline:
                self._dump_and_exit()
            self._arm_backstop()

    def _dump_and_exit(self) -> None:
        where = f"step {self.step_number}" if self.name == "step" else self.name
        header = (f"{HEADER} rank {self.rank} made no progress for {self.allowance:.0f} s in {where} "
                  f"(attempt {attempt_number()}, {time.strftime('%Y-%m-%d %H:%M:%S')}); every thread's stack, "
                  f"innermost call first (also in {self.path}); exiting so that the launcher restarts the group\n")
        # Armed first: if the stuck thread takes the GIL back while this one writes (a signal can
        # let it run for a moment, then it blocks holding it again), the C thread still dumps and exits.
        grace = min(15.0, max(3.0, 2 * self._check_every_s() + 1.0))
        faulthandler.dump_traceback_later(grace + 2.0, repeat=False, file=self._file, exit=True)
        for out in (sys.stderr, self._file):
            try:
                out.write(header)
                out.flush()
                faulthandler.dump_traceback(file=out, all_threads=True)
                out.flush()
            except (OSError, ValueError):
                pass
        # The stuck process may be a peer whose own deadline comes a moment later (this one may
        # only be waiting for it in a collective): wait a little so that it dumps its stacks too
        # before the launcher, seeing this exit, stops it (a SIGTERM, or its loader workers'
        # deaths, can end it without a dump). faulthandler's C thread ends this one if need be.
        time.sleep(grace)
        os._exit(1)

    def close(self) -> None:
        """The run ended (or is stopping): no more deadlines. An empty stacks file goes."""
        if not self.enabled or self._stop.is_set():
            return
        self._stop.set()
        faulthandler.cancel_dump_traceback_later()
        self._file.close()
        if os.path.getsize(self.path) == 0:
            os.remove(self.path)


# ---------------------------------------------------------------- restart loops

class RestartLoopError(ClipTrainError):
    """Launcher restarts that complete no new step: another restart would fail the same way."""


class RestartGuard:
    """The furthest step any attempt completed, in <output_dir>/faults/progress.json (main process
    only), and how many launcher restarts in a row got no further."""

    def __init__(self, output_dir: str, max_stalled: int, is_main: bool, record_every: int = 1):
        self.path = os.path.join(faults_dir(output_dir), "progress.json")
        self.max_stalled, self.is_main, self.record_every = max_stalled, is_main, record_every
        self.state = {"furthest_step": 0, "furthest_at_last_start": 0, "stalled_restarts": 0}

    def start(self) -> None:
        """At the start of an attempt (main process): raises RestartLoopError, and asks the
        launcher not to restart, when too many restarts in a row got nowhere. A fresh launch
        (attempt 0: a new job, a SLURM requeue) counts from zero."""
        if not self.is_main:
            return
        if attempt_number() > 0 and os.path.isfile(self.path):  # a fresh launch starts a new count
            with open(self.path) as f:
                self.state.update(json.load(f))
        furthest = self.state["furthest_step"]
        if attempt_number() == 0 or furthest > self.state["furthest_at_last_start"]:
            self.state["stalled_restarts"] = 0
        else:
            self.state["stalled_restarts"] += 1
        self.state["furthest_at_last_start"] = furthest
        self._write()
        stalled = self.state["stalled_restarts"]
        if self.max_stalled and stalled >= self.max_stalled:
            # After the error line is printed: the launcher's stop also stops this process.
            atexit.register(stop_the_launcher)
            at = f"step {furthest + 1}" if self.record_every == 1 else \
                f"a step in {furthest + 1}..{furthest + self.record_every}"
            raise RestartLoopError(
                f"the run keeps failing at {at}: {stalled} restart(s) in a row completed no step "
                f"past step {furthest} (train.max_restarts_without_progress={self.max_stalled}); see the earlier "
                f"attempts' errors in the log and {os.path.dirname(self.path)}; fix the cause, then launch again")

    def reached(self, step: int) -> None:
        """A completed step, recorded at logging and checkpoint steps (main process)."""
        if self.is_main and step > self.state["furthest_step"]:
            self.state["furthest_step"] = step
            self._write()

    def _write(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.state, f)
        os.replace(tmp, self.path)


def stop_the_launcher() -> None:
    """Ask torchelastic's agent (this process's parent) to stop: a restart would only fail again.
    Its SIGTERM handler ends every worker and exits non-zero, without restarting."""
    if "TORCHELASTIC_RUN_ID" in os.environ and os.getppid() > 1:
        try:
            os.kill(os.getppid(), signal.SIGTERM)
        except OSError:
            pass


# ---------------------------------------------------------------- stragglers

class Stragglers:
    """Every process's step time and data-wait fraction, gathered at logging steps only.

    In synchronous data parallelism every process's step ends at the same collective, so step
    times are nearly equal; what is a process's own is the time it waited for its data (its
    peers wait for it inside the collectives). The slowest process is the one that waited for
    data longest per step; a warning names it when it waited `factor` times the other processes'
    median for `windows` logging windows in a row (and at least 5% of its steps). A process slow
    in its compute (a throttled GPU) is not told apart: its peers' waits are inside collectives."""

    def __init__(self, factor: float, windows: int = 3):
        self.factor, self.windows = factor, windows
        self.streak_rank, self.streak = -1, 0

    def gather(self, accelerator, step_time_s: float, data_wait_fraction: float) -> dict[str, float]:
        mine = torch.tensor([[step_time_s, data_wait_fraction]], dtype=torch.float64, device=accelerator.device)
        every = accelerator.gather(mine) if accelerator.num_processes > 1 else mine
        rows = every.cpu().tolist()  # one collective, at a step that logs anyway
        if not accelerator.is_main_process:
            return {}
        step_s = [r[0] for r in rows]
        wait_s = [r[0] * r[1] for r in rows]  # seconds per step waiting for data
        slowest = max(range(len(rows)), key=lambda i: (wait_s[i], step_s[i]))
        # Against the others' median: with 2 processes the median of all would be the mean.
        others = statistics.median(w for i, w in enumerate(wait_s) if i != slowest) if len(rows) > 1 else 0.0
        out = {"straggler/slowest_rank": slowest, "straggler/step_time_s_max": max(step_s),
               "straggler/step_time_s_median": statistics.median(step_s),
               "straggler/data_wait_fraction_max": rows[slowest][1],
               "straggler/data_wait_fraction_median": statistics.median(r[1] for r in rows)}
        slow = len(rows) > 1 and wait_s[slowest] > self.factor * others and rows[slowest][1] >= 0.05
        if slow and slowest == self.streak_rank:
            self.streak += 1
        else:
            self.streak_rank, self.streak = (slowest, 1) if slow else (-1, 0)
        if self.streak == self.windows:
            log.warning("rank %d is a straggler: in %d logging windows in a row it waited %.3f s per step for "
                        "data, the other processes' median %.3f s; every process waits for it (look at that "
                        "node's loader workers, disk, network and CPU)", slowest, self.windows, wait_s[slowest], others)
        return out
