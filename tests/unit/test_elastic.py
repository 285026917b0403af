"""torchrun's agent as the workers see it: faults per attempt, the node range, the interface for the endpoint."""

from __future__ import annotations

import pytest

from prelora_ds.distributed import elastic
from prelora_ds.testing import faults


def test_a_fault_can_fire_in_one_attempt_only(monkeypatch):
    monkeypatch.setenv(faults.ENV, "kill@30:1#0,pause@22#1")
    faults.active.cache_clear()
    try:
        assert faults.active() == (faults.Fault("kill", 30, 1, 0), faults.Fault("pause", 22, None, 1))
        monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)  # outside torchrun: attempt 0
        assert faults.due("kill", 30, 1) and not faults.due("pause", 22, 0)
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # the agent's first restart
        assert not faults.due("kill", 30, 1) and faults.due("pause", 22, 0) and faults.due("pause", 22, 3)
    finally:
        monkeypatch.delenv(faults.ENV)
        faults.active.cache_clear()


@pytest.mark.parametrize(("argv", "nodes"), [
    (["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "prelora_ds.train"], 1),
    (["torchrun", "--nnodes", "1:2", "--nproc_per_node", "1"], 2),
    (["torchrun", "--nnodes=4", "--rdzv_endpoint", "10.0.0.1:29400"], 4),
    (["torchrun", "--nnodes=2:16", "-m", "prelora_ds.train"], 16),
])
def test_max_nodes_reads_the_agents_node_range(argv, nodes):
    assert elastic.max_nodes(argv) == nodes


def test_a_shared_agent_store_is_refused_where_nodes_can_change(monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    assert elastic.check_agent(["torchrun", "--standalone", "--nproc_per_node", "2"]) is None  # one node: restarts work
    why = elastic.check_agent(["torchrun", "--nnodes", "1:2"])
    assert why is not None and "up to 2 nodes" in why and "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in why
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")  # what the agent says with the variable set
    assert elastic.check_agent(["torchrun", "--nnodes", "1:2"]) is None


def test_outside_torchrun_nothing_is_read_from_the_parent(monkeypatch):
    for var in (*elastic.AGENT_VARS, "TORCHELASTIC_USE_AGENT_STORE"):
        monkeypatch.delenv(var, raising=False)
    assert not elastic.under_agent() and elastic.agent_argv() == [] and elastic.rendezvous_host() is None
    assert elastic.check_agent() is None and elastic.restart_count() == 0
