"""Hostfile mistakes caught on every node before any process group starts.

The deepspeed launcher reads the hostfile (`host slots=N` lines) and starts `slots` ranks on each host, but
a wrong entry only shows later as a hang at the rendezvous: a host name that does not resolve (pdsh cannot
reach it; the others wait), a node started with the `--node_rank` of another host (`--no_ssh`: two nodes
claim the same ranks), more ranks on a node than its `slots` (`--num_gpus` over the hostfile) or than it
has GPUs. `check_launch()` runs in each rank before the process group (prelora-train calls it) with what
the launcher passed its per-node process; `prelora check-hostfile HOSTFILE --node_rank N` (prelora_ds.cli) runs
the same checks before launching (e.g. in a SLURM or Kubernetes start script), including a node rank outside
the hostfile, which the launcher itself refuses with an assertion.

Names are used only where processes are started through them (pdsh/ssh from node 0, MPI launchers). A `--no_ssh`
launch (one launcher per node, the rendezvous at --master_addr) never resolves them: there a name that does not
resolve is a warning, not a refusal. A rank knows which it is from its ancestors: the `deepspeed` runner is one
only when it started this node's launcher itself (--no_ssh, or a single node); under pdsh it runs behind ssh.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import re
import socket
from collections import OrderedDict
from pathlib import Path

from prelora_ds.errors import ConfigError

_LINE = re.compile(r"^(\S+)\s+slots=(\d+)\s*$")


def read(path: str | Path) -> OrderedDict[str, int]:
    """host -> slots, in the file's order (the launcher's node ranks); the launcher's format, stricter errors."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"hostfile {path} does not exist; write one line per node, e.g. 'node01 slots=4'.")
    hosts: OrderedDict[str, int] = OrderedDict()
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = _LINE.match(line)
        if not m:
            raise ConfigError(f"{path}:{n}: cannot read {raw.strip()!r}; write 'HOST slots=N', e.g. 'node01 slots=4'.")
        if m[1] in hosts:
            raise ConfigError(f"{path}:{n}: host {m[1]} is listed twice; give each node one line.")
        hosts[m[1]] = int(m[2])
    if not hosts:
        raise ConfigError(f"hostfile {path} lists no host; write one line per node, e.g. 'node01 slots=4'.")
    return hosts


def _addresses(host: str) -> set[str] | None:
    try:
        return {info[4][0] for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)}
    except OSError:
        return None


def _local_addresses() -> set[str]:
    import psutil

    return {a.address.split("%")[0] for addrs in psutil.net_if_addrs().values() for a in addrs
            if a.family in (socket.AF_INET, socket.AF_INET6)}


def _is_here(addrs: set[str], local: set[str]) -> bool:
    return any(a in local or ipaddress.ip_address(a).is_loopback for a in addrs)


def check_node(hosts: OrderedDict[str, int], node_rank: int, ranks_here: int | None = None,
               gpus: int | None = None, source: str = "the hostfile", names_used: bool = True) -> list[str]:
    """Raise ConfigError for a node rank outside `hosts`, a host that does not resolve, a node rank that names
    another host than this machine, more ranks here than the host's slots, or slots beyond this node's GPUs.

    `names_used=False`: a launch that never resolves the names (--no_ssh); one that does not resolve is then
    returned as a warning (and cannot be matched to this machine). Returns the warnings."""
    names = list(hosts)
    if not 0 <= node_rank < len(names):
        raise ConfigError(
            f"--node_rank {node_rank} is outside {source}, which lists {len(names)} host(s) ({', '.join(names)}): "
            f"node ranks are 0..{len(names) - 1} in the file's order; start node i with --node_rank i."
        )
    resolved = {h: _addresses(h) for h in names}
    unknown = [h for h, a in resolved.items() if a is None]
    warnings = []
    if unknown and names_used:
        raise ConfigError(
            f"host(s) {', '.join(unknown)} of {source} do not resolve on {socket.gethostname()}: fix the name(s), or "
            "add them to DNS or /etc/hosts on every node (pdsh and ssh, and MPI launchers, reach the nodes by these "
            "names; a --no_ssh launch, one launcher per node with --master_addr, does not use them)."
        )
    if unknown:
        warnings.append(
            f"host(s) {', '.join(unknown)} of {source} do not resolve on {socket.gethostname()}; a --no_ssh launch "
            "never uses the names (one launcher per node, the rendezvous at --master_addr), so they only number the "
            "nodes, but nothing can check that this machine was started with its own --node_rank: make sure each "
            "node gets its own."
        )
    local = _local_addresses()
    here = [i for i, h in enumerate(names) if resolved[h] is not None and _is_here(resolved[h], local)]
    me = names[node_rank]
    if node_rank not in here and here and len(names) > 1:
        # another host of the file is this machine: two nodes would claim the same ranks and wait forever
        raise ConfigError(
            f"this machine ({socket.gethostname()}) is {names[here[0]]}, node rank {here[0]} of {source}, but was "
            f"started with --node_rank {node_rank} ({me}); start it with --node_rank {here[0]}."
        )
    slots = hosts[me]
    if ranks_here is not None and ranks_here > slots:
        raise ConfigError(
            f"{ranks_here} ranks started on {me}, but {source} gives it slots={slots}: drop --num_gpus (or make it "
            f"<= {slots}), or write '{me} slots={ranks_here}'."
        )
    if gpus is not None and slots > gpus:
        raise ConfigError(
            f"{source} gives {me} slots={slots}, but it has {gpus} GPU(s): write '{me} slots={gpus}'."
        )
    return warnings


def _launcher_args() -> tuple[dict[str, list[int]] | None, str | None, bool]:
    """(world_info, hostfile path, whether the runner is on this node) from the deepspeed launcher's processes
    above this rank: the per-node `deepspeed.launcher.launch` (world_info, always) and the `deepspeed` runner (its
    --hostfile), an ancestor only when it started this node's launcher itself (--no_ssh, or a single node)."""
    import psutil

    from prelora_ds.distributed.supervisor import PER_NODE, RUNNER, ancestry, flag

    world, hostfile, runner_here = None, None, False
    for launcher in ancestry():
        if launcher.kind == PER_NODE and world is None:
            info = flag(launcher.args, "--world_info")
            world = json.loads(base64.urlsafe_b64decode(info)) if info else None
        elif launcher.kind == RUNNER and not runner_here:
            runner_here = True
            name = flag(launcher.args, "--hostfile", "-H")
            if name is not None:
                try:
                    hostfile = str(Path(launcher.process.cwd()) / name)
                except psutil.Error:  # gone meanwhile: check the launcher's host list instead
                    pass
    return world, hostfile, runner_here


def check_launch() -> None:
    """In a rank started by the deepspeed launcher, before the process group: the checks of `check_node` on
    the hostfile it read (its world when the file is not on this node); names that do not resolve are a warning
    when the runner is on this node (--no_ssh), a refusal under pdsh. Other launchers: nothing to check."""
    if "CROSS_RANK" not in os.environ or "LOCAL_SIZE" not in os.environ:
        return
    world, path, runner_here = _launcher_args()
    if world is None:
        return
    import torch

    from prelora_ds.log import RANK_ZERO, logger

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else None
    node_rank, ranks_here = int(os.environ["CROSS_RANK"]), int(os.environ["LOCAL_SIZE"])
    hosts, source = OrderedDict((h, len(s)) for h, s in world.items()), "the launcher's host list"
    if path and Path(path).is_file():
        in_file = read(path)
        if all(h in in_file for h in world):  # --include/--exclude/--num_nodes keep the file's order
            node_rank = list(in_file).index(list(world)[node_rank])
            hosts, source = in_file, f"hostfile {path}"
    for warning in check_node(hosts, node_rank, ranks_here, gpus, source=source, names_used=not runner_here):
        logger.warning(warning, extra=RANK_ZERO)
