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
