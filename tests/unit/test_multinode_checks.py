"""The multi-node checks that need no second host: the gloo interface, the rendezvous watchdog, the hostfile."""

from __future__ import annotations

import base64
import json
import os
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


UNRESOLVED = OrderedDict([("alpha.invalid", 1), ("beta.invalid", 1)])  # .invalid never resolves (RFC 2606)


def test_names_a_no_ssh_launch_never_uses_are_a_warning():
    with pytest.raises(ConfigError, match=r"host\(s\) alpha.invalid, beta.invalid of the hostfile do not resolve on "
                                          r".*: fix the name\(s\).*a --no_ssh launch, one launcher per node"):
        hostfile.check_node(UNRESOLVED, 1)  # pdsh/ssh and MPI launchers reach the nodes by these names
    warnings = hostfile.check_node(UNRESOLVED, 1, names_used=False)
    assert len(warnings) == 1 and warnings[0].startswith(
        "host(s) alpha.invalid, beta.invalid of the hostfile do not resolve on ") and "make sure each node gets its " \
        "own" in warnings[0]
    assert hostfile.check_node(OrderedDict([("localhost", 2)]), 0, names_used=False) == []
    # the other refusals stand
    with pytest.raises(ConfigError, match=r"--node_rank 2 is outside the hostfile"):
        hostfile.check_node(UNRESOLVED, 2, names_used=False)
    with pytest.raises(ConfigError, match="2 ranks started on beta.invalid, but the hostfile gives it slots=1"):
        hostfile.check_node(UNRESOLVED, 1, ranks_here=2, names_used=False)


def test_check_hostfile_command_warns_for_no_ssh_and_refuses_otherwise(tmp_path, capsys):
    from prelora_ds.cli import main

    (tmp_path / "hf").write_text("alpha.invalid slots=1\nbeta.invalid slots=1\n")
    assert main(["check-hostfile", str(tmp_path / "hf"), "--node_rank", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"prelora check-hostfile: error: host(s) alpha.invalid, beta.invalid of hostfile "
                          f"{tmp_path / 'hf'} do not resolve on "), err
    assert main(["check-hostfile", str(tmp_path / "hf"), "--node_rank", "1", "--no_ssh"]) == 0
    out, err = capsys.readouterr()
    assert err.startswith("prelora check-hostfile: warning: host(s) alpha.invalid, beta.invalid of hostfile ")
    assert "this is beta.invalid (node rank 1, 1 slot(s))" in out


# How a rank learns the launch mode, on real processes: a `deepspeed` script (the runner, on this node only with
# --no_ssh) -> `python -m deepspeed.launcher.launch` (a stand-in module with the real one's --world_info) -> a rank
# that runs check_launch.
FAKE_LAUNCH = """
import os, subprocess, sys
env = {**os.environ, "PYTHONPATH": os.environ["REPO"], "CROSS_RANK": "1", "LOCAL_SIZE": "1"}
sys.exit(subprocess.call([sys.executable, os.environ["RANK_SCRIPT"]], env=env))
"""
FAKE_RUNNER = """
import os, subprocess, sys
world = '--world_info=' + os.environ["WORLD_INFO"]
sys.exit(subprocess.call([sys.executable, "-u", "-m", "deepspeed.launcher.launch", world, "--node_rank=1"]))
"""
RANK = """
from prelora_ds.distributed.hostfile import check_launch
from prelora_ds.errors import ConfigError
try:
    check_launch()
except ConfigError as exc:
    print(f"refused: {exc}")
    raise SystemExit(2)
print("started")
"""


@pytest.mark.parametrize("mode", ["no_ssh", "pdsh"])
def test_a_rank_warns_under_no_ssh_and_refuses_under_pdsh(tmp_path, mode):
    fake = tmp_path / "fake" / "deepspeed" / "launcher"
    fake.mkdir(parents=True)
    for init in (fake.parent / "__init__.py", fake / "__init__.py"):
        init.write_text("")
    (fake / "launch.py").write_text(FAKE_LAUNCH)
    (tmp_path / "deepspeed").write_text(FAKE_RUNNER)
    (tmp_path / "rank.py").write_text(RANK)
    (tmp_path / "hf").write_text("alpha.invalid slots=1\nbeta.invalid slots=1\n")
    world = base64.urlsafe_b64encode(json.dumps({"alpha.invalid": [0], "beta.invalid": [0]}).encode()).decode()
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "fake"), "REPO": str(REPO),
           "RANK_SCRIPT": str(tmp_path / "rank.py"), "WORLD_INFO": world}
    if mode == "no_ssh":  # deepspeed --hostfile hf --no_ssh --node_rank 1 ... on this node (a relative hostfile)
        cmd = [sys.executable, str(tmp_path / "deepspeed"), "--hostfile", "hf", "--no_ssh", "--node_rank", "1",
               "--master_addr", "10.0.0.1", "--module", "prelora_ds.train"]
    else:  # pdsh: sshd -> bash -> the per-node launcher; the runner is on node 0, behind ssh
        cmd = [sys.executable, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={world}", "--node_rank=1"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    if mode == "no_ssh":
        assert proc.returncode == 0 and proc.stdout.strip() == "started", proc.stdout + proc.stderr
        assert (f"prelora-train: warning: host(s) alpha.invalid, beta.invalid of hostfile {tmp_path / 'hf'} do not "
                "resolve on ") in proc.stderr
    else:
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert proc.stdout.startswith("refused: host(s) alpha.invalid, beta.invalid of the launcher's host list do "
                                      "not resolve on "), proc.stdout
