"""The multi-node checks that need no second host: the gloo interface, the rendezvous watchdog, the hostfile."""

from __future__ import annotations

import subprocess
import sys
from collections import OrderedDict

import pytest

from prelora_ds.distributed import hostfile, netif
from prelora_ds.errors import ConfigError
from prelora_ds.testing.harness import REPO


def test_interface_routing_to_loopback_is_lo():
    assert netif.route_to("127.0.0.1") == ("lo", "127.0.0.1")
    assert netif.interface_of("127.0.1.1") == "lo"  # Debian's address of the hostname: on lo, not listed


def test_unresolvable_master_names_the_variables():
    with pytest.raises(OSError, match=r"MASTER_ADDR=no-such-node\.invalid cannot be reached from .*--master_addr.*"
                                      r"GLOO_SOCKET_IFNAME \(and NCCL_SOCKET_IFNAME on GPUs\)"):
        netif.route_to("no-such-node.invalid")


def test_gloo_interface_chosen_unless_set(monkeypatch, capsys):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    assert netif.choose_gloo_interface(log=True) == "lo"
    assert "GLOO_SOCKET_IFNAME=lo (address 127.0.0.1, the interface that routes to MASTER_ADDR=127.0.0.1" in \
        capsys.readouterr().out
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth7")
    assert netif.choose_gloo_interface(log=False) == "eth7"


def test_rendezvous_watchdog_ends_a_stuck_process_naming_address_and_variable():
    code = ("import os, time; os.environ.update(MASTER_ADDR='10.9.9.9', MASTER_PORT='29999', RANK='1', "
            "WORLD_SIZE='2');\nfrom prelora_ds.distributed.netif import RendezvousWatchdog\n"
            "with RendezvousWatchdog(1):\n    time.sleep(30)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=25)
    assert proc.returncode == 1
    assert ("the process group did not start within train.rendezvous_timeout_s=1 s: rank 1 of WORLD_SIZE=2 on "
            in proc.stderr and "could not join the process group at MASTER_ADDR=10.9.9.9:29999" in proc.stderr)


@pytest.mark.parametrize(("text", "message"), [
    ("node0 slots=2\nnode1\n", "hf:2: cannot read 'node1'; write 'HOST slots=N'"),
    ("node0 slots=2\nnode0 slots=2\n", "hf:2: host node0 is listed twice"),
    ("# nothing\n\n", "lists no host"),
])
def test_hostfile_format_errors(tmp_path, monkeypatch, text, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "hf").write_text(text)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        hostfile.read("hf")


def test_hostfile_reads_comments_and_order(tmp_path):
    (tmp_path / "hf").write_text("# two nodes\nnode1 slots=4  # first: node rank 0\nnode0 slots=2\n")
    assert hostfile.read(tmp_path / "hf") == OrderedDict([("node1", 4), ("node0", 2)])


def test_check_node_errors():
    hosts = OrderedDict([("localhost", 2), ("no-such-node.invalid", 2)])
    with pytest.raises(ConfigError, match=r"--node_rank 2 is outside the hostfile, which lists 2 host\(s\)"):
        hostfile.check_node(hosts, 2)
    with pytest.raises(ConfigError, match=r"host\(s\) no-such-node.invalid of the hostfile do not resolve"):
        hostfile.check_node(hosts, 0)
    one = OrderedDict([("localhost", 2)])
    hostfile.check_node(one, 0, ranks_here=2)
    with pytest.raises(ConfigError, match="3 ranks started on localhost, but the hostfile gives it slots=2"):
        hostfile.check_node(one, 0, ranks_here=3)
    with pytest.raises(ConfigError, match="gives localhost slots=2, but it has 1 GPU"):
        hostfile.check_node(one, 0, gpus=1)
