"""The session's fixtures: the uninterrupted reference runs (2 CPU ranks) that several test files compare to.
The helpers they are made with (launch commands, job runs, the test recipes) are prelora_ds.testing.harness."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prelora_ds.testing.harness import RELORA_RUN, REPO, SPLIT_RUN, SWITCH_RUN, deepspeed_cmd, mpirun_cmd, run


@pytest.fixture(scope="session")
def root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def global64(tmp_path_factory) -> str:
    """The demo's DeepSpeed config with the global batch fixed (64) instead of the accumulation: DeepSpeed derives
    accumulation 1 on 2 ranks and 2 on 1 rank, so a run keeps its steps and data when its world size changes."""
    ds = json.loads((REPO / "ds_configs" / "cpu_zero2_fp32.json").read_text())
    ds.pop("gradient_accumulation_steps")
    ds["train_batch_size"] = 64
    path = tmp_path_factory.mktemp("ds") / "global64.json"
    path.write_text(json.dumps(ds))
    return str(path)


@pytest.fixture(scope="session")
def switch_reference(tmp_path_factory) -> Path:
    """Phases full 0-12, warmup 12-20, lora 20-40 on 2 ranks by `deepspeed --num_gpus 2` (the demo's launch; the other
    references start by mpirun, harness.mpirun_cmd), uninterrupted. What the launch printed (stdout, then
    stderr, as a log file would hold it) is kept beside the run: `launch.log`."""
    out = tmp_path_factory.mktemp("switch_reference") / "run"
    proc = run(deepspeed_cmd("--output_dir", out, *SWITCH_RUN))
    (out.parent / "launch.log").write_text(proc.stdout + proc.stderr)
    return out


@pytest.fixture(scope="session")
def split_reference(tmp_path_factory) -> Path:
    """SWITCH_RUN with split q/k/v and the six targets (full 0-12, warmup 12-20, lora 20-40), uninterrupted."""
    out = tmp_path_factory.mktemp("split_reference") / "run"
    run(mpirun_cmd("--output_dir", out, *SPLIT_RUN))
    return out


@pytest.fixture(scope="session")
def relora_reference(tmp_path_factory) -> Path:
    """Phases full 0-4, relora 4-16 (merges after steps 9 and 14; the convergence test fails at 12 and passes at 16),
    warmup 16-24, lora 24-60 on 2 ranks, uninterrupted."""
    out = tmp_path_factory.mktemp("relora_reference") / "run"
    run(mpirun_cmd("--output_dir", out, *RELORA_RUN))
    return out
