"""Real 2-process runs (gloo on the CPU) of the gradient-cache step under DDP."""

import json

import pytest
from conftest import launch


@pytest.mark.slow
def test_two_process_gradient_cache_equals_single_process():
    proc = launch(["tests/helpers/dist_train_check.py"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    results = json.loads(line.removeprefix("RESULT "))
    for case in ("nochunk", "chunk3", "chunk1", "chunk2_tiled"):
        assert results[case]["max_rel_err"] < 1e-5, results[case]
        assert results[case]["logit_scale_rel_err"] < 1e-5, results[case]
    # One all-reduce per step whatever the number of chunks (no sync per chunk).
    assert len({results[c]["allreduce_calls"] for c in ("nochunk", "chunk3", "chunk1")}) == 1
    assert results["train_3_steps_max_rel_err"] < 1e-5
