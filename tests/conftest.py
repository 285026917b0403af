"""Shared helpers: real launches of real jobs (2 CPU ranks), TensorBoard readers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from prelora_ds.config.sections import SPLIT_TARGETS
from prelora_ds.metrics.readers import scalars  # noqa: F401  (the tests' reader of TensorBoard files)

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# A tiny ViT with the real module names (blocks.N.attn.qkv, ...) on the embedded digits: seconds per run.
TINY = [
    "--recipe", "recipes/demo.yaml",
    "--deepspeed_config", "ds_configs/cpu_zero2_fp32.json",
    "--model.kwargs", "{img_size: 16, patch_size: 4, depth: 4, embed_dim: 64, num_heads: 2}",
    "--train.log_every_steps", "1",
    "--train.lr_warmup_steps", "4",
]
# The switch flags of the acceptance command: windows of 4 steps, thresholds that always pass.
SWITCH = [
    "--prelora.window_steps", "4", "--prelora.num_windows", "3",
    "--prelora.delta_w", "1000", "--prelora.delta_l", "1000", "--prelora.warmup_steps", "8",
]


def job_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("OMP_NUM_THREADS", None)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def run(
    cmd: list[str], timeout: int = 600, check: bool = True, env: dict[str, str] | None = None, **popen
) -> subprocess.CompletedProcess:
    """Run a job to its end; `env` adds variables (e.g. PRELORA_FAULTS), `popen` goes to subprocess.run."""
    full_env = {**job_env(), **(env or {})}
    proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout, **popen)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def load_tool(name: str):
    """A script of tools/ as a module (the tools are scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"tools_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def deepspeed_cmd(*args: str, port: int | None = None) -> list[str]:
    extra = ["--master_port", str(port)] if port else []
    return [str(BIN / "deepspeed"), "--num_gpus", "2", *extra, "--module", "prelora_ds.train", *args]


def write_digit_jpegs(root: Path, count: int = 800, val_every: int = 5) -> Path:
    """An ImageFolder of real JPEGs: scikit-learn's digits, RGB, scaled to 16-27 px (odd sizes and aspect
    ratios), quality 90; every `val_every`-th image goes to val/. Returns `root`."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    for i, (img, label) in enumerate(zip(images[:count], digits.target[:count], strict=True)):
        path = root / ("val" if i % val_every == val_every - 1 else "train") / f"d{label}" / f"{i:04d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        size = (16 + i % 12, 16 + (i * 7) % 9)
        Image.fromarray(img).resize(size, Image.Resampling.BICUBIC).convert("RGB").save(path, quality=90)
    return root


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


# The uninterrupted references that resumed runs (test_launch, test_relora, test_reliability) are compared to.
SWITCH_RUN = ["--recipe", "recipes/demo.yaml", "--train.max_steps", "40", *SWITCH, "--train.log_every_steps", "1"]
RELORA_RUN = [
    "--recipe", "recipes/demo.yaml", "--train.max_steps", "60", "--relora.enabled", "true",
    "--relora.start_step", "4", "--relora.rank", "8", "--relora.merge_every_steps", "5",
    *SWITCH, "--train.log_every_steps", "1",
    # one candidate rank: the switch's ranks cannot depend on the reduction order of a world size (per-layer norm
    # changes of ~1e-4 % in this short run put layers on bucket edges), so resumed runs compare exactly
    "--prelora.r_min", "16", "--prelora.r_max", "16",
]


@pytest.fixture(scope="session")
def switch_reference(tmp_path_factory) -> Path:
    """Phases full 0-12, warmup 12-20, lora 20-40 on 2 ranks, uninterrupted."""
    out = tmp_path_factory.mktemp("switch_reference") / "run"
    run(deepspeed_cmd("--output_dir", str(out), *SWITCH_RUN, port=29621))
    return out


# The paper's structure: separate q, k, v projections and the six targets (model.qkv: split).
SPLIT_RUN = [*SWITCH_RUN, "--model.qkv", "split", "--prelora.target_modules", SPLIT_TARGETS]


@pytest.fixture(scope="session")
def split_reference(tmp_path_factory) -> Path:
    """SWITCH_RUN with split q/k/v and the six targets (full 0-12, warmup 12-20, lora 20-40), uninterrupted."""
    out = tmp_path_factory.mktemp("split_reference") / "run"
    run(deepspeed_cmd("--output_dir", str(out), *SPLIT_RUN, port=29651))
    return out


@pytest.fixture(scope="session")
def relora_reference(tmp_path_factory) -> Path:
    """Phases full 0-4, relora from 4 (merges every 5 steps), then warmup and lora, 60 steps on 2 ranks."""
    out = tmp_path_factory.mktemp("relora_reference") / "run"
    run(deepspeed_cmd("--output_dir", str(out), *RELORA_RUN, port=29681))
    return out
