"""Read TensorBoard event files back in tests."""

from pathlib import Path


def tensorboard_scalars(event_dir: Path, tag: str) -> dict[int, float]:
    """What TensorBoard shows for `tag`: one value per step, after its purge of the steps that
    a resumed run logged again. Fails if a step appears twice."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(event_dir))
    acc.Reload()
    events = acc.Scalars(tag)
    assert len({e.step for e in events}) == len(events), [e.step for e in events]
    return {e.step: e.value for e in events}
