"""prelora_ds.distributed.collectives on a default group that refuses CPU tensors (NCCL's device dispatch, made on
this CPU)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from prelora_ds.testing.harness import REPO, free_port, job_env


def run_ranks(out, world: int) -> list[dict]:
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "scripts" / "dist_check.py"), str(out)],
            cwd=REPO,
            env={**job_env(), "RANK": str(r), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(port)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world)
    ]
    for p in procs:
        log, _ = p.communicate(timeout=300)
        assert p.returncode == 0, log[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.mark.parametrize("world", [1, 2])
def test_package_collectives_on_a_cuda_only_default_group(tmp_path, world):
    facts = run_ranks(tmp_path, world)
    for f in facts:
        # the group is NCCL-like: the direct all-reduce the package used to issue is refused
        assert f["default_group_error"] == "No backend type associated with device type cpu"
        assert f["sum"] == [sum(r + 1.0 for r in range(world)), 0.25 * world]
        assert f["max"] == [world - 1.0, 0.0]
        assert (f["agree_true"], f["agree_false"]) == (True, False)
        if world > 1:
            assert "ranks disagree on a forced disagreement" in f["disagree_message"]
        else:
            assert f["disagree_message"] is None  # one rank always agrees with itself
        assert f["gathered"] == [{"rank": r, "files": [f"rank{r}.pt"]} for r in range(world)]  # objects, rank order
        # the streamed rebuild's broadcast uses the training group: a CPU tensor is refused there, as under NCCL
        assert f["bulk_broadcast_error"] == "No backend type associated with device type cpu"
        # norms: exact to fp32 rounding, the frozen fp32 value counted once (not once per rank)
        assert f["norm_max_rel_err"] < 1e-5
        assert (f["loss_sum"], f["loss_count"]) == (sum(r + 1.0 for r in range(world)), 3.0 * world)
        assert f["lora_norm_max_rel_err"] < 1e-5
        c1, c5, n, loss = f["val_union_local"]
        assert f["val"] == pytest.approx({"top1": 100 * c1 / n, "top5": 100 * c5 / n, "loss": loss / n}, rel=1e-6)
