"""Real 2-process runs (gloo on the CPU) of the gradient-cache step under DDP."""


import pytest
from conftest import launch_result


@pytest.mark.slow
def test_two_process_gradient_cache_equals_single_process():
    results = launch_result(["tests/helpers/dist_train_check.py"])
    for case in ("nochunk", "chunk3", "chunk1", "chunk2_tiled"):
        assert results[case]["max_rel_err"] < 1e-5, results[case]
        assert results[case]["logit_scale_rel_err"] < 1e-5, results[case]
    # One all-reduce per step whatever the number of chunks (no sync per chunk).
    assert len({results[c]["allreduce_calls"] for c in ("nochunk", "chunk3", "chunk1")}) == 1
    assert results["train_3_steps_max_rel_err"] < 1e-5
