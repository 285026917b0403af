"""Two test hosts on one machine (root): network namespaces joined by a veth pair.

Each host has its own address, its own hostname (a UTS namespace per command) and its own /etc/hosts
(`ip netns exec` binds /etc/netns/NAME/hosts over /etc/hosts), written as Debian writes it: the host's own
name on 127.0.1.1, so gloo's default binding picks loopback as on many clusters. The filesystem is shared,
as on a cluster with shared storage. Used by tests/integration/test_multinode.py and tools/bench_multinode.py.

  with TwoHosts("pl14") as hosts:
      subprocess.run(hosts.cmd(hosts.node[1], ["python", "-c", "import socket; print(socket.gethostname())"]))
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

NETNS_ETC = Path("/etc/netns")


@dataclass(frozen=True)
class Host:
    name: str  # hostname inside, e.g. node0
    ns: str  # network namespace, e.g. pl14-node0
    addr: str  # e.g. 10.77.0.1
    ifname: str  # its end of the veth pair


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


def can_make_namespaces() -> str | None:
    """None when namespaces can be made here, else why not (for a pytest skip)."""
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2)"
    if shutil.which("unshare") is None:
        return "no `unshare` command (util-linux)"
    probe = "plprobe-ns"
    proc = _ip("netns", "add", probe, check=False)
    if proc.returncode != 0:
        return f"`ip netns add` failed (needs root and CAP_SYS_ADMIN): {proc.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


class TwoHosts:
    """node0 and node1 on `subnet`.1 and .2 (/24); `down()` removes namespaces, links and /etc/netns files."""

    def __init__(self, prefix: str, subnet: str = "10.77.0") -> None:
        self.node = [Host(f"node{i}", f"{prefix}-node{i}", f"{subnet}.{i + 1}", f"veth{i}") for i in range(2)]

    def up(self) -> TwoHosts:
        self.down()  # leftovers of a killed session
        try:
            for h in self.node:
                _ip("netns", "add", h.ns)
                _ip("-n", h.ns, "link", "set", "lo", "up")
            a, b = self.node
            _ip("link", "add", a.ifname, "netns", a.ns, "type", "veth", "peer", "name", b.ifname, "netns", b.ns)
            for h in self.node:
                _ip("-n", h.ns, "addr", "add", f"{h.addr}/24", "dev", h.ifname)
                _ip("-n", h.ns, "link", "set", h.ifname, "up")
                etc = NETNS_ETC / h.ns
                etc.mkdir(parents=True, exist_ok=True)
                others = "".join(f"{o.addr} {o.name}\n" for o in self.node if o != h)
                (etc / "hosts").write_text(f"127.0.0.1 localhost\n127.0.1.1 {h.name}\n{others}")
        except BaseException:
            self.down()
            raise
        return self

    def down(self) -> None:
        for h in self.node:
            self.kill_all(h)
            _ip("netns", "del", h.ns, check=False)  # deletes its veth end, and so the pair
            shutil.rmtree(NETNS_ETC / h.ns, ignore_errors=True)
        if NETNS_ETC.is_dir() and not any(NETNS_ETC.iterdir()):
            NETNS_ETC.rmdir()

    def __enter__(self) -> TwoHosts:
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()

    def cmd(self, host: Host, argv: list[str]) -> list[str]:
        """`argv` run on `host`: in its network namespace, with its hostname."""
        return ["ip", "netns", "exec", host.ns, "unshare", "--uts", "--", "sh", "-c",
                'hostname "$0" && exec "$@"', host.name, *argv]

    def pids(self, host: Host) -> list[int]:
        proc = _ip("netns", "pids", host.ns, check=False)
        return [int(p) for p in proc.stdout.split()]

    def kill_all(self, host: Host) -> list[int]:
        """SIGKILL every process of `host` (a node that dies); returns their pids."""
        pids = self.pids(host)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return pids

    def start_sshd(self, workdir: Path) -> list[str]:
        """An sshd on each host (root, key-only, its own key files under `workdir`); returns the ssh options a
        client needs (for PDSH_SSH_ARGS_APPEND or mpiexec's -launcher-exec). Call again after a node died."""
        workdir.mkdir(parents=True, exist_ok=True)
        key, host_key = workdir / "id", workdir / "host_key"
        for k in (key, host_key):
            if not k.exists():
                subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(k)], check=True)
        (workdir / "authorized_keys").write_text(Path(f"{key}.pub").read_text())
        (workdir / "sshd_config").write_text(
            f"HostKey {host_key}\nAuthorizedKeysFile {workdir / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nPidFile none\n"
        )
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # its privilege-separation directory
        for h in self.node:
            if not any(self._is_sshd(p) for p in self.pids(h)):
                subprocess.Popen(self.cmd(h, [shutil.which("sshd") or "/usr/sbin/sshd", "-D", "-e", "-f",
                                              str(workdir / "sshd_config")]),
                                 stdout=open(workdir / f"sshd.{h.name}.log", "a"), stderr=subprocess.STDOUT)
        return ["-i", str(key), "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "LogLevel=ERROR", "-o", "ConnectionAttempts=20"]

    @staticmethod
    def _is_sshd(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/comm").read_text().strip() == "sshd"
        except OSError:
            return False

    def limit(self, rate: str | None) -> None:
        """Limit both ends of the link to `rate` (tc tbf, e.g. '1gbit'); None removes the limit."""
        for h in self.node:
            subprocess.run(["ip", "netns", "exec", h.ns, "tc", "qdisc", "del", "dev", h.ifname, "root"],
                           capture_output=True)
            if rate:
                # burst >= rate / HZ (250) or tbf cannot reach the rate; 50 ms of queue
                subprocess.run(["ip", "netns", "exec", h.ns, "tc", "qdisc", "add", "dev", h.ifname, "root", "tbf",
                                "rate", rate, "burst", "8mbit", "latency", "50ms"], check=True, capture_output=True)
