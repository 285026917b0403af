"""The launcher watch on real process chains: scripts named as the launchers are (`deepspeed`, `torchrun`) start a
rank-like process that records its launcher ancestry and reports when one goes (the launched runs are in
test_reliability)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from prelora_ds.distributed import preempt, supervisor
from prelora_ds.testing.harness import REPO

PY = sys.executable


@pytest.mark.parametrize(("cmdline", "expected"), [
    # how the real launchers' command lines look (captured from `deepspeed --num_gpus 2`, mpirun, torchrun)
    ([PY, "/venv/bin/deepspeed", "--num_gpus", "2", "--master_port", "29500", "--module", "prelora_ds.train"],
     ("deepspeed", ["--num_gpus", "2", "--master_port", "29500", "--module", "prelora_ds.train"])),
    (["/usr/bin/python3.11", "-u", "-m", "deepspeed.launcher.launch", "--world_info=eyJsb2NhbGhvc3QiOiBbMF19",
      "--master_addr=127.0.0.1"], ("deepspeed.launcher.launch", ["--world_info=eyJsb2NhbGhvc3QiOiBbMF19",
                                                                 "--master_addr=127.0.0.1"])),
    (["python", "-um", "torch.distributed.run", "--nproc_per_node", "2"], ("torch.distributed.run",
                                                                           ["--nproc_per_node", "2"])),
    (["python3", "-W", "ignore", "-X", "faulthandler", "/opt/bin/torchrun", "-m", "x"], ("torchrun", ["-m", "x"])),
    (["/venv/bin/mpirun", "-np", "2", "/venv/bin/prelora-train"], ("mpirun", ["-np", "2", "/venv/bin/prelora-train"])),
    (["/venv/bin/hydra_pmi_proxy", "--control-port", "node0:4242"], ("hydra_pmi_proxy", ["--control-port",
                                                                                         "node0:4242"])),
    ([PY, "-c", "import deepspeed"], ("", [])),
    (["bash", "-c", "cd /w; python -u -m deepspeed.launcher.launch"], ("bash", ["-c", "cd /w; python -u -m "
                                                                               "deepspeed.launcher.launch"])),
    ([], ("", [])),
])  # fmt: skip
def test_program_of_a_command_line(cmdline, expected):
    assert supervisor.program(cmdline) == expected


def test_a_rank_is_not_a_launcher_whatever_its_arguments():
    """A rank's own command line names deepspeed in its arguments; only the program counts."""
    prog, _ = supervisor.program([PY, "-u", "-m", "prelora_ds.train", "--output_dir", "deepspeed", "--local_rank=0"])
    assert prog == "prelora_ds.train" and prog not in supervisor.PROGRAMS


# A rank-like leaf: prints its launchers as JSON, then checks them every 10 ms and prints the first that went, with
# when (time.monotonic(), the same clock in every process) its last check that found them all began.
LEAF = textwrap.dedent("""
    import json, sys, time
    from prelora_ds.distributed.supervisor import LauncherWatch
    watch = LauncherWatch.of_this_process()
    print(json.dumps([[l.kind, l.program, l.pid] for l in watch.launchers]), flush=True)
    t0 = last_alive = time.monotonic()
    while time.monotonic() - t0 < 60:
        began = time.monotonic()
        gone = watch.gone()
        if gone is not None:
            print(f"GONE {gone.kind} {gone.pid} {last_alive!r} | {gone}", flush=True)
            break
        last_alive = began
        time.sleep(0.01)
""")
# A launcher-like parent: starts its command line's rest as a child and waits for it (as the real ones do).
PARENT = "import subprocess, sys\nsys.exit(subprocess.call(sys.argv[1:]))\n"


@pytest.fixture
def chain(tmp_path):
    """deepspeed -> torchrun -> leaf, as real processes; yields (deepspeed Popen, leaf's launchers, stdout)."""
    for name in ("deepspeed", "torchrun"):
        (tmp_path / name).write_text(PARENT)
    (tmp_path / "leaf.py").write_text(LEAF)
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    top = subprocess.Popen([PY, str(tmp_path / "deepspeed"), PY, str(tmp_path / "torchrun"), PY,
                            str(tmp_path / "leaf.py")], stdout=subprocess.PIPE, text=True, env=env)
    below = []
    try:
        launchers = json.loads(top.stdout.readline())  # the whole chain runs
        below = psutil.Process(top.pid).children(recursive=True)
        yield top, launchers
    finally:
        for proc in below:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        top.kill()
        top.wait()


def test_ancestry_names_the_launchers_nearest_first(chain):
    top, launchers = chain
    middle = psutil.Process(top.pid).children()[0]
    assert launchers == [["torchrun", "torchrun", middle.pid], ["runner", "deepspeed", top.pid]]


def test_the_runner_killed_alone_is_seen_gone_while_the_launcher_below_lives(chain):
    """SIGTERM to the runner only (its child, like deepspeed.launcher.launch, stays): the leaf notices at its first
    check after the runner died (no check begun after the death found it alive; checks are 10 ms apart), though the
    runner is a zombie until its parent (this test) waits for it."""
    top, _ = chain
    middle = psutil.Process(top.pid).children()[0]
    top.send_signal(signal.SIGTERM)
    runner = psutil.Process(top.pid)
    while runner.status() != psutil.STATUS_ZOMBIE:  # the signal is delivered, the runner dies
        time.sleep(0.001)
    dead = time.monotonic()  # the runner was dead by then
    line = top.stdout.readline()  # the leaf still writes to the pipe
    head, _, rest = line.partition(" | ")
    assert head.startswith(f"GONE runner {top.pid} ") and rest.startswith(
        f"the deepspeed runner (deepspeed, pid {top.pid})"), line
    last_alive = float(head.split()[-1])
    assert last_alive < dead, (last_alive, dead)
    assert psutil.Process(top.pid).status() == psutil.STATUS_ZOMBIE  # not waited for yet: still counted gone
    assert middle.is_running() and middle.status() != psutil.STATUS_ZOMBIE


def test_the_direct_parent_killed_is_seen_gone(chain):
    top, _ = chain
    middle = psutil.Process(top.pid).children()[0]
    middle.kill()  # the leaf is re-parented; the runner above lives on
    line = top.stdout.readline()
    assert line.startswith(f"GONE torchrun {middle.pid} ") and f" | torchrun's agent (torchrun, pid {middle.pid}" \
        in line, "the leaf did not see its parent go"


def test_a_plain_process_has_no_launcher_to_watch():
    code = "from prelora_ds.distributed.supervisor import LauncherWatch; print(LauncherWatch.of_this_process())"
    out = subprocess.run([PY, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
                         check=True)
    assert out.stdout.strip() == "none"


def test_a_gone_launcher_requests_the_stop_once(capsys):
    """The StopRequest's check before the agreement: nothing while the launcher lives; then the flag, the time and
    one warning naming it, as a signal would; the MAX of the agreement names a real signal over it."""
    proc = subprocess.Popen(["sleep", "60"])
    ps = psutil.Process(proc.pid)
    launcher = supervisor.Launcher(proc.pid, ps.create_time(), supervisor.PER_NODE, "deepspeed.launcher.launch",
                                   process=ps)
    request = preempt.StopRequest(supervisor.LauncherWatch([launcher]))
    request.check_launchers()
    assert not request.requested
    proc.kill()
    proc.wait()  # reaped: the pid no longer exists
    t0 = time.time()
    request.check_launchers()
    request.check_launchers()
    assert request.signum == preempt.LAUNCHER_GONE and t0 <= request.time <= time.time()
    err = capsys.readouterr().err
    assert err.count("is gone") == 1
    assert (f"prelora-train: warning: the deepspeed per-node launcher (deepspeed.launcher.launch, pid {proc.pid}) is "
            "gone: stopping after this step as for a pre-emption") in err
    assert preempt.reason(preempt.LAUNCHER_GONE) == "LAUNCHER_GONE"
    assert max(preempt.LAUNCHER_GONE, *map(int, preempt.SIGNALS)) != preempt.LAUNCHER_GONE
