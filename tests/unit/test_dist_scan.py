"""The package's collectives all go through prelora_ds/distributed/collectives.py (an AST scan), and per-phase peak
memory."""

from __future__ import annotations

import ast

from prelora_ds.testing.harness import REPO

COLLECTIVES = {
    "all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "broadcast", "broadcast_object_list",
    "barrier", "monitored_barrier", "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single",
    "reduce", "gather", "gather_object", "scatter", "scatter_object_list", "send", "recv", "isend", "irecv",
}
COMM_MODULES = {"torch.distributed", "deepspeed.comm"}


def direct_collectives(source: str) -> list[int]:
    """Lines that call a collective of torch.distributed or deepspeed.comm, whatever name they are imported as."""
    tree = ast.parse(source)
    aliases = set(COMM_MODULES)  # dotted names that mean one of the comm modules
    direct = set()  # collectives imported by name
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {a.asname for a in node.names if a.name in COMM_MODULES and a.asname}
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                if f"{node.module}.{a.name}" in COMM_MODULES:
                    aliases.add(a.asname or a.name)
                elif node.module in COMM_MODULES and a.name in COLLECTIVES:
                    direct.add(a.asname or a.name)
    lines = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Name) and f.id in direct:
            lines.append(node.lineno)
        elif isinstance(f, ast.Attribute) and f.attr in COLLECTIVES and ast.unparse(f.value) in aliases:
            lines.append(node.lineno)
    return lines


def test_no_collective_outside_dist():
    """Every collective of the package and its tools goes through prelora_ds/distributed/collectives.py (CPU tensors,
    gloo)."""
    offenders = []
    scanned = [*(REPO / "prelora_ds").rglob("*.py"), *(REPO / "tools").glob("*.py")]
    assert len(scanned) > 40  # the sub-packages are scanned too
    for path in scanned:
        if path == REPO / "prelora_ds" / "distributed" / "collectives.py":
            continue
        offenders += [f"{path.relative_to(REPO)}:{i}" for i in direct_collectives(path.read_text())]
    assert not offenders, "collectives outside prelora_ds/distributed/collectives.py:\n" + "\n".join(offenders)


def test_the_scan_finds_direct_collectives():
    found = direct_collectives(
        "import torch\nimport torch.distributed as dist\nfrom deepspeed import comm\n"
        "from torch.distributed import barrier as b\n"
        "dist.all_reduce(t)\ntorch.distributed.barrier()\ncomm.all_gather_object(x, y)\nb()\n"
    )
    assert found == [5, 6, 7, 8]
    source = "from prelora_ds.distributed import collectives as dist\ndist.barrier()\ndist.all_reduce_sum([1.0])\n"
    assert direct_collectives(source) == []


def test_peak_memory_resets_per_phase():
    """What each phase reports as its peak: the CPU path (VmHWM) of what torch.cuda.reset_peak_memory_stats does."""
    import numpy as np

    from prelora_ds.metrics.recorder import memory_bytes, reset_peak_memory

    big = np.ones(400 * 2**20 // 8)
    big[::4096] = 2.0  # touched: resident
    del big
    before = memory_bytes()
    reset_peak_memory()
    assert memory_bytes() < before - 300 * 2**20
