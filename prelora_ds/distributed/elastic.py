"""torchrun's elastic agent: a process-group store of each worker group's own, so a restarted group forms at once.

Since torch 2.5, torchrun's c10d rendezvous shares one TCPStore, hosted by the agent, with every worker group it
starts (`TORCHELASTIC_USE_AGENT_STORE=True`, MASTER_PORT is that store). The store outlives the workers, and the
process group's keys carry no attempt prefix (torch dropped `TORCHELASTIC_RESTART_COUNT` as one: it is counted per
agent, so the nodes disagree after a node restarts, pytorch issue 135712). A restarted group then reads the addresses
its predecessors published: gloo's full-mesh connect is refused at once, or waits for a peer that never comes (NCCL:
a stale unique id, pytorch issue 167288). Measured here: the restart after `kill@20:1` failed in gloo's connect within
a second, the next one waited for the whole rendezvous timeout.

The fix needs nothing from the agent: worker rank 0 of each group hosts a new TCPStore on a free port and publishes
`port token` in the agent's store; the other ranks read that key until the store it names answers with the same
token. A stale entry names the store of a process that is gone (the agent stops every worker before it starts a new
group), so its port refuses the connection and the rank reads again. The group then starts on the new store, which
holds no key of any earlier group. Setting TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for the agent does the same inside
torch (a new MASTER_PORT a round); either way works.
"""

from __future__ import annotations

import os
import time
import uuid
from datetime import timedelta

from prelora_ds.distributed.supervisor import TORCHRUN, ancestry, flag

AGENT_VARS = ("TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT")
STORE_KEY = "prelora/worker_group_store"  # in the agent's store: "PORT TOKEN" of the current group's store
TOKEN_KEY = "prelora/token"  # in the group's store: TOKEN
PROBE_S = 2.0  # how long one connect to a published store may take before the key is read again


def under_agent() -> bool:
    """Whether torchrun's elastic agent started this process."""
    return all(v in os.environ for v in AGENT_VARS)


def restart_count() -> int:
    """How many times this node's agent restarted its workers (0 in the first attempt, and outside torchrun)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def shares_agent_store() -> bool:
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"


def group_store(rank: int, world_size: int, timeout: timedelta):
    """A TCPStore of this worker group's own (rank 0 hosts it; module docstring). Every rank calls it once before
    `init_process_group`; blocks until rank 0 published the store (bounded by the caller's rendezvous watchdog)."""
    import torch.distributed as tdist

    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    agent = tdist.TCPStore(addr, port, world_size, is_master=False, timeout=timeout)
    if rank == 0:
        # port 0: a free one; the server listens on every interface, as the agent's does
        store = tdist.TCPStore(addr, 0, world_size, is_master=True, timeout=timeout, wait_for_workers=False)
        token = uuid.uuid4().hex
        store.set(TOKEN_KEY, token)
        agent.set(STORE_KEY, f"{store.port} {token}")
        return store
    while True:
        new_port, token = agent.get(STORE_KEY).decode().split()
        try:
            store = tdist.TCPStore(addr, int(new_port), world_size, is_master=False,
                                   timeout=timedelta(seconds=PROBE_S))
            if store.get(TOKEN_KEY).decode() == token:
                store.set_timeout(timeout)
                return store
        except (RuntimeError, ValueError):  # refused or timed out: a store of an earlier group; rank 0 not there yet
            pass
        time.sleep(0.2)


def rendezvous_host() -> str | None:
    """The host of the agent's `--rdzv_endpoint` (None outside torchrun, with --standalone, or when it is loopback).

    Every node reaches it (the agents rendezvous there), so the gloo interface is chosen for it: MASTER_ADDR is the
    rank-0 agent's own name, which on node 0 often resolves to 127.0.1.1 (Debian's /etc/hosts) and would bind gloo
    to loopback there. torchrun does not pass the endpoint to its workers; it is read from the agent's command line."""
    import ipaddress
    import socket

    endpoint = flag(agent_argv(), "--rdzv_endpoint", "--rdzv-endpoint")
    if not endpoint:
        return None
    host = endpoint.rsplit(":", 1)[0].strip("[]") if endpoint.count(":") != 1 or "]" in endpoint else \
        endpoint.split(":")[0]
    try:
        if ipaddress.ip_address(socket.getaddrinfo(host, None)[0][4][0]).is_loopback:
            return None
    except (OSError, ValueError):
        return None
    return host


def agent_argv() -> list[str]:
    """The arguments of the torchrun agent that started this process ([] outside torchrun)."""
    if not under_agent():
        return []
    return next((list(launcher.args) for launcher in ancestry() if launcher.kind == TORCHRUN), [])


def max_nodes(argv: list[str]) -> int:
    """The most nodes a torchrun command line lets join (`--nnodes N` or `MIN:MAX`; 1 with --standalone or none)."""
    try:
        return int((flag(argv, "--nnodes") or "1").split(":")[-1])
    except ValueError:
        return 1


def check_agent(argv: list[str] | None = None) -> str | None:
    """Why this torchrun launch cannot survive a change of its nodes, or None.

    With the shared agent store, the rank-0 agent publishes the worker group's MASTER_ADDR/MASTER_PORT in the first
    round only (torch 2.14, `DynamicRendezvousHandler.next_rendezvous` keeps it): an agent that joins later (a node
    that comes back, a replaced node) waits for that key and fails after 60 s, taking the job with it. Measured here
    with two agents: the shrink worked, the grow failed. One node has no other agent to join, so it is safe."""
    argv = agent_argv() if argv is None else argv
    if not shares_agent_store() or max_nodes(argv) <= 1:
        return None
    return (
        f"torchrun lets up to {max_nodes(argv)} nodes join, and its agents share their rendezvous store with the "
        "workers (torch's default), which breaks every rendezvous after a node leaves or joins: an agent that joins "
        "later waits for an address the first agent never publishes again. Start torchrun on every node with "
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in its environment (docs/multinode.md, torchrun)."
    )
