"""The documentation stays true: the configuration reference is what the generator prints from
config.py (every key, each with a comment), and the README's and docs/ pages' commands run."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO
from omegaconf import DictConfig, OmegaConf

from clip_train.config import Config


def _leaf_keys(node: DictConfig, prefix: str = "") -> list[str]:
    """Every settable key of the schema, as OmegaConf sees it (independent of the generator)."""
    out = []
    for key in node:
        value = node._get_node(key)
        name = f"{prefix}{key}"
        if isinstance(value, DictConfig) and OmegaConf.get_type(value) not in (dict, None):
            out.append(name)  # a nested section is documented as a key too (model.aug)
            out.extend(_leaf_keys(value, f"{name}."))
        else:
            out.append(name)
    return out


def test_configuration_reference_is_generated_from_config_py():
    from clip_train.config_reference import REGENERATE, render, undocumented

    page = (REPO / "docs" / "configuration.md").read_text()
    # The command the page names, run as the lead would run it.
    proc = subprocess.run([sys.executable, "-m", "clip_train", "config", "--reference"], cwd=REPO,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == render()
    assert page == proc.stdout, f"docs/configuration.md is out of date: run `{REGENERATE}`"
    keys = _leaf_keys(OmegaConf.structured(Config))
    assert len(keys) >= 100 and "model.aug.scale" in keys and "optim.kwargs" in keys
    missing = [k for k in keys if (f"**`{k}`**" if "." in k else f"\n## {k}\n") not in page]
    assert not missing, f"keys missing from docs/configuration.md: {missing}"
    assert not undocumented(), f"config fields without a comment under them: {undocumented()}"
    # The comment text itself, with Markdown-sensitive characters kept readable.
    assert "Samples per process per optimizer step; the global batch is this times the process count." in page
    assert r"names match \*logit\_scale\*" in page or r"names match \*logit_scale\*" in page


# --------------------------------------------------------------------------------------------
# Command blocks of README.md and docs/*.md

import json  # noqa: E402
import re  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^( *)```(bash|sh|shell)\n(.*?)^\1```", re.S | re.M)

# Blocks that tests/test_docs.py::test_cpu_command_blocks_run runs, in this order, after the tiny CPU
# run every one of them names as its set-up (identified by a line of the block).
RUN = [
    "create_model_and_transforms('local-dir:runs/tiny-cpu/model')",  # docs/checkpoints.md
    "python -m clip_benchmark.cli eval --model local-dir:runs/tiny-cpu/model",  # docs/evaluation.md
]
# Blocks not run, and why (identified by a line of the block). Their commands are still checked
# against the CLI and the config schema they call.
SKIP = {
    "bash launch/setup.sh && . .venv/bin/activate && bash launch/demo.sh":
        "sets up .venv (a network install) and runs the 250-step demo on 2 processes (70 s+)",
    "bash launch/setup.sh && . .venv/bin/activate && python -m pytest -q": "is this suite",
    "clip-train train --config configs/demo.yaml train.steps=100 optim.lr=1e-3":
        "trains the demo model and evaluates/exports its 250-step run (minutes); the same commands on "
        "the tiny CPU run are run from docs/checkpoints.md",
    "hf upload <user>/<repo>": "uploads to the Hugging Face Hub (network, an account)",
    "open_clip.create_model('ViT-B-32', pretrained='laion2b_s34b_b79k')": "downloads ViT-B-32 weights; needs SLURM",
    "clip-train train --config configs/tiny-cpu.yaml train.steps=300":
        "300 steps (97 s) and a TensorBoard server; docs/checkpoints.md's block runs after a 20-step run",
    "pip install -e '.[s3]'": "needs an S3 bucket and credentials",
    "moto_server -H 127.0.0.1 -p 9123 &": "a local S3 server and two 2-process demo runs (minutes); "
        "tests/test_remote.py runs the same against moto",
    "accelerate launch --config_file launch/accelerate/fsdp2.yaml -m clip_train train":
        "a GPU machine / SLURM; the CPU FSDP2 launch is run by tests/test_sharding.py",
    "sbatch --nodes=4 --partition=gpu --account=myproj": "needs SLURM (tests/test_launch.py fakes it)",
    "salloc --nodes=2 --gpus-per-node=8": "needs SLURM (tests/test_launch.py runs DRY_RUN under a fake one)",
    "python benchmarks/quality.py --seeds 0,1,2,3,4": "10 training runs (an hour); flags checked by "
        "tests/test_benchmarks.py",
}


@dataclass
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    text: str

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"

    def has(self, marker: str) -> bool:
        return marker in self.text


def command_blocks() -> list[Block]:
    out = []
    for page in PAGES:
        text = page.read_text()
        for m in FENCE.finditer(text):
            body = "\n".join(line[len(m.group(1)):] for line in m.group(3).splitlines())
            out.append(Block(page, text[:m.start()].count("\n") + 1, body))
    return out


def simple_commands(script: str) -> list[list[str]]:
    """The simple commands of a shell script, as argument lists (redirections dropped)."""
    out = []
    for line in script.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split, lexer.commenters = True, "#"
        words, skip_next = [], False
        for token in [*lexer, ";"]:
            if token in ("&&", "||", ";", "|", "&"):
                if words:
                    out.append(words)
                words = []
            elif token in (">", ">>", "<", "2>"):
                skip_next = True
            elif skip_next:
                skip_next = False
            else:
                words.append(token)
    return out


def clip_train_argv(words: list[str]) -> list[str] | None:
    """The `clip-train` arguments of a command that runs clip_train, however it is launched."""
    while words and re.match(r"^[A-Za-z_]\w*=", words[0]):  # FOO=bar env assignments
        words = words[1:]
    if not words:
        return None
    if words[0] == "clip-train":
        return words[1:]
    if words[0] in ("bash", "sh") and len(words) > 1:
        words = words[1:]
    if words[0] in ("launch/local.sh",):
        return words[1:]
    if "-m" in words and words[words.index("-m") + 1:][:1] == ["clip_train"]:
        return words[words.index("-m") + 2:]
    if words[0] in ("sbatch", "launch/slurm.sbatch") or "launch/slurm.sbatch" in words:
        rest = words[words.index("launch/slurm.sbatch") + 1:]
        return ["train", "--config", *rest] if rest else None
    return None


PLACEHOLDER = re.compile(r"<[\w/ -]+>|\.\.\.|\$")


def check_clip_train_command(argv: list[str]) -> None:
    from clip_train.__main__ import build_parser
    from clip_train.config import load_config

    if argv[0] in ("make-shards", "make-demo"):
        return  # they parse their own flags (and run when parsed)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as err:
        raise AssertionError(f"`clip-train {shlex.join(argv)}` is refused by the CLI") from err
    if args.command in ("train", "eval", "export", "config"):
        overrides = [o for o in args.overrides if not PLACEHOLDER.search(o)]
        config = str(REPO / args.config) if args.config else None
        load_config(config, overrides)  # every key exists and every value has its type


@pytest.mark.parametrize("block", command_blocks(), ids=lambda b: b.id)
def test_command_block_is_valid_and_run_or_skipped_with_a_reason(block):
    """Every block parses as bash and every clip_train command in it (clip-train, launch/local.sh,
    accelerate launch -m clip_train, the SLURM script) is accepted by the CLI and its overrides by
    the config schema; the block is then run by test_cpu_command_blocks_run or skipped, with why."""
    proc = subprocess.run(["bash", "-n"], input=block.text, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, f"{block.id}: not valid bash: {proc.stderr}"
    checked = 0
    for words in simple_commands(block.text):
        argv = clip_train_argv(words)
        if argv:
            check_clip_train_command(argv)
            checked += 1
    if any(block.has(marker) for marker in RUN):
        return
    reasons = [why for marker, why in SKIP.items() if block.has(marker)]
    if reasons:
        pytest.skip(f"not run: {reasons[0]} ({checked} clip_train commands checked)")
    if re.search(r"python benchmarks/\w+\.py", block.text):
        pytest.skip("a benchmark (minutes); its flags are checked by tests/test_benchmarks.py")
    pytest.skip(f"not classified in tests/test_docs.py RUN/SKIP: {checked} clip_train commands checked, "
                "not run")


def _clip_benchmark_env() -> Path | None:
    """clip_benchmark, as tests/test_clip_benchmark.py installs it in pytest's cache (not installed here)."""
    if os.environ.get("CLIP_BENCHMARK_ENV"):
        return Path(os.environ["CLIP_BENCHMARK_ENV"])
    ready = sorted((REPO / ".pytest_cache" / "d" / "clip-benchmark-env").glob("*/READY"))
    return ready[-1].parent if ready else None


@pytest.mark.slow
@pytest.mark.timeout(900)  # ~50 s on a quiet 2-core machine; minutes when it is shared
def test_cpu_command_blocks_run(tmp_path):
    """The blocks in RUN, as written, in a fresh directory that holds the repository's configs and
    launch scripts, after the set-up they name: the demo shards and a 20-step tiny CPU run. The
    clip_benchmark block then scores the run's model folder as clip-train eval does."""
    for name in ("configs", "launch", "benchmarks"):
        (tmp_path / name).symlink_to(REPO / name)
    shutil.copytree(REPO / "docs", tmp_path / "docs")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "clip-train").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m clip_train "$@"\n')
    (bin_dir / "clip-train").chmod(0o755)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2", "WANDB_MODE": "offline",
           "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("WORLD_SIZE", None)

    def sh(script: str, what: str) -> str:
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{what}:\n{script}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        return proc.stdout

    sh("clip-train make-demo --output demo_data && clip-train train --config configs/tiny-cpu.yaml",
       "the set-up the pages name")
    blocks = {marker: next(b for b in command_blocks() if b.has(marker)) for marker in RUN}
    out = sh(blocks[RUN[0]].text, blocks[RUN[0]].id)
    assert "Compose(" in out  # open_clip built the transform from the folder
    assert (tmp_path / "export/tiny-cpu/open_clip_model.safetensors").is_file()
    assert (tmp_path / "model.pt").is_file()
    # clip-train eval of the folder gives the run's own final evaluation (the same predictions).
    run = json.loads((tmp_path / "runs/tiny-cpu/eval.json").read_text())
    folder = json.loads((tmp_path / "results/tiny-cpu.json").read_text())["results"]
    assert run["step"] == 20 and folder["zeroshot/num_samples"] == 359
    for key in ("zeroshot/top1", "zeroshot/top5", "retrieval/image_to_text_R@5"):
        assert folder[key] == pytest.approx(run[key], abs=1e-12), key

    cb_env = _clip_benchmark_env()
    if cb_env is None:
        pytest.skip(f"{blocks[RUN[1]].id}: clip_benchmark is not installed in pytest's cache (run "
                    "tests/test_clip_benchmark.py once, with network access)")
    (tmp_path / ".venv").mkdir()
    (tmp_path / ".venv" / "clip-benchmark").symlink_to(cb_env)
    script = "\n".join(line for line in blocks[RUN[1]].text.splitlines() if not line.startswith("pip install"))
    sh(script, f"{blocks[RUN[1]].id} (without its pip install: the cached environment)")
    theirs = json.loads(next((tmp_path / "results").glob("*digits_tiny.json")).read_text())["metrics"]
    ours = json.loads((tmp_path / "results/clip-train_tiny.json").read_text())["results"]
    print(f"tiny CPU run, held-out digits: clip_benchmark acc1={theirs['acc1']:.6f}, "
          f"clip-train top1={ours['zeroshot/digits/top1']:.6f}")
    assert ours["zeroshot/digits/num_samples"] == 359
    assert ours["zeroshot/digits/top1"] == pytest.approx(theirs["acc1"], abs=1e-12)
    assert ours["zeroshot/digits/mean_per_class_recall"] == pytest.approx(theirs["mean_per_class_recall"], abs=1e-12)
