import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "helpers"))


def launch(args: list[str], nproc: int = 2, timeout: int = 240, env: dict | None = None,
           use_cpu: bool = True) -> subprocess.CompletedProcess:
    """Run `accelerate launch` with nproc CPU processes (gloo) and return the finished process."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    if use_cpu:
        full_env["ACCELERATE_USE_CPU"] = "true"
    else:
        full_env.pop("ACCELERATE_USE_CPU", None)
    full_env.update(env or {})
    multi = ["--multi_gpu"] if nproc > 1 else []
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *multi, "--num_processes", str(nproc),
           "--num_machines", "1", "--main_process_port", "0", *args]
    return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


def launch_result(args: list[str], **kwargs) -> dict:
    """Launch a 2-process check script, require success, and return its `RESULT {json}` line."""
    proc = launch(args, **kwargs)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def write_color_shards(out_dir: Path, n_shards: int = 2, per_shard: int = 32, size: int = 32,
                       n_classes: int = 4, sizes_file: bool = True) -> str:
    """Learnable tiny image–caption shards: the colour of the image is named by its caption."""
    import numpy as np
    import webdataset as wds
    from PIL import Image

    colors = [(220, 30, 30), (30, 200, 30), (30, 30, 220), (230, 230, 30)][:n_classes]
    names = ["red", "green", "blue", "yellow"][:n_classes]
    rng = np.random.default_rng(0)
    out_dir.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for s in range(n_shards):
        path = out_dir / f"train-{s:06d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for i in range(per_shard):
                cls = int(rng.integers(n_classes))
                pixels = np.clip(np.array(colors[cls]) + rng.normal(0, 20, (size, size, 3)), 0, 255)
                buf = io.BytesIO()
                Image.fromarray(pixels.astype("uint8")).save(buf, format="PNG")
                sink.write({"__key__": f"s{s}_{i:04d}", "png": buf.getvalue(),
                            "txt": f"a photo of a {names[cls]} square", "cls": str(cls)})
        sizes[path.name] = per_shard
    if sizes_file:
        (out_dir / "sizes.json").write_text(json.dumps(sizes))
    return str(out_dir / f"train-{{000000..{n_shards - 1:06d}}}.tar")


@pytest.fixture(scope="session")
def color_shards(tmp_path_factory) -> str:
    return write_color_shards(tmp_path_factory.mktemp("color_shards"))
