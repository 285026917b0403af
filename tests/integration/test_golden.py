"""The demo's runs bit for bit as recorded before the package moved into sub-packages (issue 23): losses and top-1
at every step, the phase timeline, the ranks, the merged export's bytes. No launch of its own: it reads the
session's uninterrupted references (switch: full -> warmup -> lora in 40 steps; relora: the demo's first 60 steps
through full, relora with merges, warmup and lora).

Recorded by `python -m prelora_ds.testing.golden tests/golden/demo_runs.json switch=RUN relora=RUN` on the platform
it names; float results depend on the CPU's kernels, so elsewhere the comparison is skipped (record it again from
a commit known to be good).
"""

from __future__ import annotations

import json

import pytest

from prelora_ds.testing.golden import fingerprint, platform
from prelora_ds.testing.harness import REPO

pytestmark = pytest.mark.launch
GOLDEN = json.loads((REPO / "tests" / "golden" / "demo_runs.json").read_text())


@pytest.fixture
def same_platform():
    if GOLDEN["platform"] != platform():
        pytest.skip(f"recorded on {GOLDEN['platform']}, this is {platform()}: float results differ between CPUs")


@pytest.mark.parametrize("name", ["switch", "relora"])
def test_demo_runs_are_bit_for_bit_as_recorded(name, same_platform, switch_reference, relora_reference):
    run_dir = {"switch": switch_reference, "relora": relora_reference}[name]
    got, want = fingerprint(run_dir), GOLDEN["runs"][name]
    assert got["phases"] == want["phases"] and got["switch_step"] == want["switch_step"]
    assert got["ranks"] == want["ranks"]
    for tag in ("train/loss", "val/top1"):
        diff = [(s, a, b) for (s, a), (_, b) in zip(got[tag], want[tag], strict=True) if a != b]
        assert not diff, f"{tag} differs at (step, now, recorded): {diff[:5]}"
    assert got["model_sha256"] == want["model_sha256"]
