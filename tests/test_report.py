"""Reports (`clip-train report`, the end-of-training picture) and the TensorBoard tracker: a
synthetic metrics.jsonl of a resumed run that is still writing, and event files read back."""

import base64
import json
import logging
import re
from pathlib import Path

import pytest
from tensorboard_records import tensorboard_scalars

from clip_train.__main__ import main
from clip_train.config import ClipTrainError, load_config
from clip_train.metrics import STEP_KEY, StepTensorBoard, trackers
from clip_train.report import draw, panels, read_series, write_report, write_report_safely

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def train_row(step: int, loss) -> dict:
    return {"step": step, "time": 1.0e9 + step, "loss": loss, "lr": 1e-3 * min(1, step / 3),
            "logit_scale": 14.3 + step, "temperature": 1 / (14.3 + step), "grad_norm": 5.0 / step,
            "samples_per_s": 800.0 + step, "samples_per_s_per_process": 400.0 + step,
            "data_wait_fraction": 0.01, "samples_seen": 64 * step, "skipped_steps": 0, "peak_rss_gib": 1.1,
            "health/alignment": 1.5 - 0.1 * step, "health/uniformity": -1.0 - 0.1 * step,
            "health/candidates": 64, "health/mi_lower_bound": 0.3 * step, "data/samples_read": 64.0 * step,
            "data/bad_samples": 0.0, "data/bad/bad_image": 0.0}


def eval_row(step: int) -> dict:
    return {"step": step, "time": 1.0e9 + step, "zeroshot/top1": 0.05 * step, "zeroshot/top5": 0.09 * step,
            "zeroshot/mean_per_class_recall": 0.04 * step, "zeroshot/num_samples": 359.0,
            "retrieval/image_to_text_R@1": 0.03 * step, "retrieval/text_to_image_R@1": 0.02 * step,
            "retrieval/alignment": 1.2, "retrieval/uniformity": -2.0 - 0.01 * step,
            "retrieval/uniformity_image": -2.1, "retrieval/uniformity_text": -1.9,
            "retrieval/num_images": 359.0, "val/loss": 2.0 - 0.1 * step}


def true_loss(step: int) -> float:
    return 2.0 - 0.125 * step


def write_resumed_run(run: Path) -> None:
    """Steps 1-7 logged, killed, resumed from the step-5 checkpoint: 6-10 logged again (with
    other losses), a non-finite loss at step 8, and a last line still being written."""
    rows = [train_row(s, true_loss(s) if s <= 5 else 9.0) for s in range(1, 8)] + [eval_row(5)]
    rows += [train_row(s, "nan" if s == 8 else true_loss(s)) for s in range(6, 11)] + [eval_row(10)]
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 11, "loss": 0.7, "lr'
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text(text)
    (run / "config.yaml").write_text("train:\n  steps: 20\n  local_batch_size: 16\n  output_dir: runs/x\n")


EXPECTED_PANELS = [
    "loss", "learning rate", "logit scale = 1 / temperature", "gradient norm",
    "throughput (samples/s, all processes)", "data-wait fraction", "peak memory per process (GiB)",
    "batch alignment (lower: pairs closer)", "batch uniformity (lower: more spread)",
    "InfoNCE MI lower bound (nats)",  # no "bad samples": all zero
    "zeroshot", "retrieval", "retrieval/alignment", "retrieval/uniformity", "val/loss"]


def test_report_of_a_resumed_run_still_writing(tmp_path, caplog):
    run = tmp_path / "run"
    write_resumed_run(run)
    series, skipped = read_series(run / "metrics.jsonl")
    assert skipped == 1  # the partial last line
    # The resumed run's values replace the first attempt's for steps 6 and 7; one value per step.
    assert list(series["loss"]) == list(range(1, 11))
    assert series["loss"][6] == true_loss(6) and series["loss"][7] == true_loss(7)
    assert series["loss"][8] != series["loss"][8]  # "nan" -> NaN, a gap in the curve
    assert sorted(series["zeroshot/top1"]) == [5, 10]

    layout = panels(series)
    assert [p.title for p in layout] == EXPECTED_PANELS
    assert {p.title: p.keys for p in layout}["retrieval/uniformity"] == [
        "retrieval/uniformity", "retrieval/uniformity_image", "retrieval/uniformity_text"]
    assert len(draw(series, "t").axes) == len(EXPECTED_PANELS)

    with caplog.at_level(logging.WARNING, logger="clip_train"):
        png_path, html_path = write_report(run)
    assert "skipped 1 unreadable line" in caplog.text
    png = png_path.read_bytes()
    assert png_path == run / "report.png" and png.startswith(PNG_MAGIC) and len(png) > 10_000
    page = html_path.read_text()
    embedded = re.search(r'src="data:image/png;base64,([^"]+)"', page).group(1)
    assert base64.b64decode(embedded) == png  # self-contained: the picture is in the page
    assert "<td>loss</td><td>0.75</td><td>10</td>" in page  # final numbers: last finite value, step
    assert "<td>zeroshot/top1</td><td>0.5</td><td>10</td>" in page
    assert "<td>val/loss</td><td>1</td><td>10</td>" in page
    assert "local_batch_size: 16" in page and "step 10 of 20" in page
    assert not list(run.glob(".*.tmp"))


def test_panels_group_named_evaluations():
    """Several named evaluations (`zeroshot/<name>/...`) get a panel each; bad samples show once
    there are some; counts are not drawn."""
    series = {"loss": {1: 2.0, 2: 1.0}, "data/bad_samples": {1: 0.0, 2: 3.0},
              "zeroshot/imagenet/top1": {2: 0.3}, "zeroshot/imagenet/top5": {2: 0.6},
              "zeroshot/imagenet/num_samples": {2: 50000.0}, "zeroshot/cifar10/top1": {2: 0.5},
              "val/loss": {1: 3.0, 2: 2.5}, "val/loss_per_sample": {1: 0.3, 2: 0.2}}
    assert [(p.title, p.keys) for p in panels(series)] == [
        ("loss", ["loss"]), ("bad samples (cumulative)", ["data/bad_samples"]),
        ("zeroshot/imagenet", ["zeroshot/imagenet/top1", "zeroshot/imagenet/top5"]),
        ("zeroshot/cifar10", ["zeroshot/cifar10/top1"]), ("val/loss", ["val/loss", "val/loss_per_sample"])]


def test_report_command(tmp_path, capsys):
    run = tmp_path / "run"
    write_resumed_run(run)
    assert main(["report", str(run), "--output-dir", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "report.png").read_bytes().startswith(PNG_MAGIC)
    assert "report.html" in capsys.readouterr().out
    # Not a run directory: one clear line, exit code 2.
    assert main(["report", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("clip-train: error:") and "no metrics.jsonl" in err and "Traceback" not in err
    (tmp_path / "out" / "metrics.jsonl").write_text('{"step": 1, "lo')  # a run's very first line
    assert main(["report", str(tmp_path / "out")]) == 2
    assert "no metrics logged yet" in capsys.readouterr().err


def test_end_of_training_report_only_warns(tmp_path, caplog, monkeypatch):
    with caplog.at_level(logging.WARNING, logger="clip_train"):
        assert write_report_safely(tmp_path) is None  # no metrics.jsonl
    assert "could not write the report" in caplog.text and "clip-train report" in caplog.text
    write_resumed_run(tmp_path)

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("clip_train.report.draw", broken)
    with caplog.at_level(logging.WARNING, logger="clip_train"):
        assert write_report_safely(tmp_path) is None
    assert "disk full" in caplog.text


def test_tracker_selection():
    assert trackers(load_config(None, ["wandb.enabled=true"])) == ["wandb"]  # today's key still works
    assert trackers(load_config(None, [])) == []
    assert trackers(load_config(None, ["tracking.report_to=[wandb]"])) == ["wandb"]
    both = trackers(load_config(None, ["tracking.report_to=[tensorboard,wandb]", "wandb.enabled=true",
                                       "train.output_dir=/tmp/r"]))
    assert isinstance(both[0], StepTensorBoard) and both[1] == "wandb" and len(both) == 2
    assert both[0].logging_dir_param == "/tmp/r" and both[0].run_name == "tensorboard"
    with pytest.raises(ClipTrainError, match="tracking.report_to: got 'mlflow'"):
        load_config(None, ["tracking.report_to=[mlflow]"])


def test_tensorboard_missing_is_one_clear_error(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(ClipTrainError, match=r"pip install 'clip-train\[tensorboard\]'"):
        trackers(load_config(None, ["tracking.report_to=[tensorboard]"]))


def test_tensorboard_resume_continues_the_step_axis(tmp_path):
    """A run logs steps 1-6, dies, resumes from its step-4 checkpoint and logs 5-8: the event
    files show steps 1-8 once each, 5 and 6 from the resumed run."""
    first = StepTensorBoard(str(tmp_path))
    first.start_at(0)
    first.start()
    for step in range(1, 7):
        first.log({"loss": float(step), STEP_KEY: step})
    first.writer.close()  # a killed job's writer never closes: everything was flushed per log
    resumed = StepTensorBoard(str(tmp_path))
    resumed.start_at(4)
    resumed.start()
    for step in range(5, 9):
        resumed.log({"loss": 100.0 + step, STEP_KEY: step})
    resumed.finish()
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one directory
    assert tensorboard_scalars(tmp_path / "tensorboard", "loss") == {
        1: 1.0, 2: 2.0, 3: 3.0, 4: 4.0, 5: 105.0, 6: 106.0, 7: 107.0, 8: 108.0}
