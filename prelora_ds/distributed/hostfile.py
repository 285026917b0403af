"""Hostfile mistakes caught on every node before any process group starts.

The deepspeed launcher reads the hostfile (`host slots=N` lines) and starts `slots` ranks on each host, but
a wrong entry only shows later as a hang at the rendezvous: a host name that does not resolve (pdsh cannot
reach it; the others wait), a node started with the `--node_rank` of another host (`--no_ssh`: two nodes
claim the same ranks), more ranks on a node than its `slots` (`--num_gpus` over the hostfile) or than it
has GPUs. `check_launch()` runs in each rank before the process group (prelora-train calls it) with what
the launcher passed its per-node process; `prelora check-hostfile HOSTFILE --node_rank N` (prelora_ds.cli) runs
the same checks before launching (e.g. in a SLURM or Kubernetes start script), including a node rank outside
the hostfile, which the launcher itself refuses with an assertion.
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
               gpus: int | None = None, source: str = "the hostfile") -> None:
    """Raise ConfigError for a node rank outside `hosts`, a host that does not resolve, a node rank that names
    another host than this machine, more ranks here than the host's slots, or slots beyond this node's GPUs."""
    names = list(hosts)
    if not 0 <= node_rank < len(names):
        raise ConfigError(
            f"--node_rank {node_rank} is outside {source}, which lists {len(names)} host(s) ({', '.join(names)}): "
            f"node ranks are 0..{len(names) - 1} in the file's order; start node i with --node_rank i."
        )
    resolved = {h: _addresses(h) for h in names}
    unknown = [h for h, a in resolved.items() if a is None]
    if unknown:
        raise ConfigError(
            f"host(s) {', '.join(unknown)} of {source} do not resolve on {socket.gethostname()}: fix the name(s), or "
            "add them to DNS or /etc/hosts on every node (the launcher and the rendezvous use these names)."
        )
    local = _local_addresses()
    here = [i for i, h in enumerate(names) if _is_here(resolved[h], local)]  # type: ignore[arg-type]
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


def _launcher_args() -> tuple[dict[str, list[int]] | None, str | None]:
    """(world_info, hostfile path) from the deepspeed launcher's processes above this rank: the per-node
    `deepspeed.launcher.launch` (world_info, always) and the `deepspeed` runner (its --hostfile, when it runs on
    this node: --no_ssh, or node 0 under pdsh)."""
    import psutil

    world, hostfile = None, None
    proc = psutil.Process().parent()
    while proc is not None and (world is None or hostfile is None):
        try:
            cmd = proc.cmdline()
        except psutil.Error:
            break
        for i, arg in enumerate(cmd):
            if arg.startswith("--world_info=") and world is None:
                world = json.loads(base64.urlsafe_b64decode(arg.split("=", 1)[1]))
            if arg in ("--hostfile", "-H") and i + 1 < len(cmd) and hostfile is None:
                hostfile = str(Path(proc.cwd()) / cmd[i + 1])
            elif arg.startswith("--hostfile=") and hostfile is None:
                hostfile = str(Path(proc.cwd()) / arg.split("=", 1)[1])
        proc = proc.parent()
    return world, hostfile


def check_launch() -> None:
    """In a rank started by the deepspeed launcher, before the process group: the checks of `check_node` on
    the hostfile it read (its world when the file is not on this node). Other launchers: nothing to check."""
    if "CROSS_RANK" not in os.environ or "LOCAL_SIZE" not in os.environ:
        return
    world, path = _launcher_args()
    if world is None:
        return
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else None
    node_rank, ranks_here = int(os.environ["CROSS_RANK"]), int(os.environ["LOCAL_SIZE"])
    if path and Path(path).is_file():
        hosts = read(path)
        if all(h in hosts for h in world):  # --include/--exclude/--num_nodes keep the file's order
            node_rank = list(hosts).index(list(world)[node_rank])
            check_node(hosts, node_rank, ranks_here, gpus, source=f"hostfile {path}")
            return
    check_node(OrderedDict((h, len(s)) for h, s in world.items()), node_rank, ranks_here, gpus,
               source="the launcher's host list")

