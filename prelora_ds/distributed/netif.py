"""Which network interface the package's gloo group uses, and a rendezvous that fails instead of hanging.

Gloo (the package's statistics group on every cluster, and the whole job on CPUs) binds to the address
the machine's hostname resolves to unless GLOO_SOCKET_IFNAME names an interface. On many clusters (and
Debian's default /etc/hosts) the hostname resolves to 127.0.1.1: each rank then advertises loopback to
the others, rank 0 fails with `Gloo connectFullMesh failed ... remote=[127.0.0.1]` and the other nodes
wait. The interface that routes to MASTER_ADDR is the one every node can reach the others through, so it
is the default here. NCCL picks its own interfaces (NCCL_SOCKET_IFNAME overrides); it is not touched.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import threading

from prelora_ds.log import EVERY_RANK, logger

GLOO_VAR = "GLOO_SOCKET_IFNAME"


def local_address_to(addr: str) -> str:
    """The source address the kernel uses to reach `addr` (a UDP connect sends no packet)."""
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect((addr, 9))  # any port: only the route is looked up
        return s.getsockname()[0]


def interface_of(address: str) -> str | None:
    """The name of the interface holding `address` (None when no interface does)."""
    import psutil

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address.split("%")[0] == address for a in addrs if a.family in (socket.AF_INET, socket.AF_INET6)):
            return name
    if ipaddress.ip_address(address).is_loopback:  # 127.0.1.1 and the like are on lo without being listed
        return next((n for n, a in psutil.net_if_addrs().items() if any(x.address == "127.0.0.1" for x in a)), None)
    return None


def route_to(master_addr: str) -> tuple[str, str]:
    """(interface, local address) through which this machine reaches `master_addr`.

    Raises OSError with what to set when the address does not resolve or no route leads to it."""
    try:
        addr = socket.getaddrinfo(master_addr, None, proto=socket.IPPROTO_TCP)[0][4][0]
        local = local_address_to(addr)
    except OSError as exc:
        raise OSError(
            f"MASTER_ADDR={master_addr} cannot be reached from {socket.gethostname()} ({exc}); pass node 0's address "
            f"as --master_addr, and set {GLOO_VAR} (and NCCL_SOCKET_IFNAME on GPUs) to the interface that reaches it."
        ) from exc
    name = interface_of(local)
    if name is None:
        raise OSError(f"no interface holds {local}, the address that routes to MASTER_ADDR={master_addr}; "
                      f"set {GLOO_VAR}.")
    return name, local


def choose_gloo_interface(log: bool) -> str:
    """Set GLOO_SOCKET_IFNAME to the interface that routes to MASTER_ADDR (under torchrun: to its --rdzv_endpoint,
    distributed/elastic.py) unless it is set; returns the value.

    Called on every rank before the process group starts; `log` on one rank per node."""
    from prelora_ds.distributed import elastic

    endpoint = elastic.rendezvous_host()
    master, what = (endpoint, "torchrun's --rdzv_endpoint") if endpoint else (os.environ["MASTER_ADDR"], "MASTER_ADDR")
    if os.environ.get(GLOO_VAR):
        if log:
            logger.info(f"prelora-train: {socket.gethostname()}: {GLOO_VAR}={os.environ[GLOO_VAR]} (set by the user)",
                        extra=EVERY_RANK)
        return os.environ[GLOO_VAR]
    name, local = route_to(master)
    os.environ[GLOO_VAR] = name
    if log:
        logger.info(
            f"prelora-train: {socket.gethostname()}: {GLOO_VAR}={name} (address {local}, the interface that routes to "
            f"{what}={master}; set {GLOO_VAR} to choose another)",
            extra=EVERY_RANK,
        )
    return name


def address_in_use(error: BaseException) -> bool:
    """Whether a process-group start failed because MASTER_PORT is taken on this host (torch's TCPStore server
    reports EADDRINUSE; another job's rendezvous is the usual holder)."""
    text = str(error)
    return "EADDRINUSE" in text or "address already in use" in text.lower()


def port_in_use_help() -> str:
    """What rank 0 says when its MASTER_PORT is taken: the cause, and the flag that picks another port."""
    port = os.environ.get("MASTER_PORT", "?")
    return (
        f"MASTER_PORT={port} is already in use on {socket.gethostname()} (another job's process group, or another "
        f"program, listens there), so rank {os.environ.get('RANK', '?')} could not start the rendezvous. Pick a free "
        "port: deepspeed --master_port N (torchrun --master_port N, or --rdzv_endpoint HOST:N; mpirun or a plain "
        "process: MASTER_PORT=N). The deepspeed launcher's default 29500 collides with any other job on the host."
    )


def rendezvous_help() -> str:
    """What a rank that could not join the others should say: the address, the interface, what to set."""
    master, port = os.environ.get("MASTER_ADDR", "?"), os.environ.get("MASTER_PORT", "?")
    return (
        f"rank {os.environ.get('RANK', '?')} of WORLD_SIZE={os.environ.get('WORLD_SIZE', '?')} on "
        f"{socket.gethostname()} could not join the process group at MASTER_ADDR={master}:{port} "
        f"({GLOO_VAR}={os.environ.get(GLOO_VAR, 'unset')}). Check that every node can reach {master}:{port} "
        f"(firewall, --master_addr is node 0's address on the network the nodes share), that {GLOO_VAR} "
        "(and NCCL_SOCKET_IFNAME on GPUs) names that network's interface on each node, and that every node "
        "started with the same hostfile (the same WORLD_SIZE)."
    )


class RendezvousWatchdog:
    """Ends this process with `rendezvous_help()` when the process group has not started after `timeout_s`.

    A rank whose peers died or advertised an unreachable address waits in the store or in gloo's full-mesh
    connect for the group's whole timeout (train.collective_timeout_s, 30 min by default) otherwise."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="prelora-rendezvous-watchdog", daemon=True)

    def _watch(self) -> None:
        if not self._done.wait(self.timeout_s):
            logger.error(
                f"the process group did not start within train.rendezvous_timeout_s={self.timeout_s:g} s: "
                f"{rendezvous_help()}"
            )
            os._exit(1)  # the main thread is blocked in C++ (store or gloo connect): nothing else can end it

    def __enter__(self) -> RendezvousWatchdog:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
