"""The demo's runs as recorded before the package moved into sub-packages (issue 23): losses and top-1 at every step,
the phase timeline, the ranks, the merged export's bytes. No launch of its own: it reads the session's uninterrupted
references (switch: full -> warmup -> lora in 40 steps; relora: the demo's first 60 steps through full, relora with
merges, warmup and lora).

On any CPU: the timeline, switch step and ranks exactly, top-1 to one image, losses to golden.LOSS_TOL (what another
CPU's kernels cannot move, measured). On the platform the file names: everything bit for bit.

Recorded by `python -m prelora_ds.testing.golden tests/golden/demo_runs.json switch=RUN relora=RUN` on that platform;
elsewhere the bit-for-bit comparison is skipped (record it again from a commit known to be good).
"""

from __future__ import annotations

import json

import pytest

from prelora_ds.testing.golden import differences, fingerprint, platform
from prelora_ds.testing.harness import REPO

pytestmark = pytest.mark.launch
GOLDEN = json.loads((REPO / "tests" / "golden" / "demo_runs.json").read_text())


@pytest.fixture(params=["switch", "relora"])
def demo(request, switch_reference, relora_reference) -> tuple[dict, dict]:
    """(this machine's fingerprint, the recorded one) of one demo run."""
    run_dir = {"switch": switch_reference, "relora": relora_reference}[request.param]
    return fingerprint(run_dir), GOLDEN["runs"][request.param]


def test_demo_runs_keep_their_timeline_ranks_and_losses_on_any_cpu(demo):
    got, want = demo
    assert differences(got, want, bitwise=False) == []


def test_demo_runs_are_bit_for_bit_as_recorded(demo):
    if GOLDEN["platform"] != platform():
        pytest.skip(f"recorded on {GOLDEN['platform']}, this is {platform()}: float results differ between CPUs")
    got, want = demo
    assert differences(got, want, bitwise=True) == []
