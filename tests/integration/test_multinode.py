"""Two real hosts (network namespaces with their own addresses, hostnames and /etc/hosts:
prelora_ds/testing/two_hosts.py) running the package through the deepspeed launcher's multi-node paths, a node that
dies, a rendezvous that cannot complete, and hostfile mistakes. Needs root (`ip netns add`); skipped with the reason
otherwise.

The hosts' /etc/hosts map their own name to 127.0.1.1 as Debian does, so gloo's default binding is
loopback (the failure of issue 14): every run here leaves GLOO_SOCKET_IFNAME unset unless it says so.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

from prelora_ds.metrics.readers import scalars
from prelora_ds.testing.harness import BIN, REPO, SWITCH_RUN, deepspeed_cmd, free_port, job_env, summary
from prelora_ds.testing.two_hosts import TwoHosts, can_make_namespaces

WHY_NOT = can_make_namespaces()
pytestmark = [pytest.mark.launch, pytest.mark.skipif(WHY_NOT is not None, reason=f"two test hosts: {WHY_NOT}")]

MISSING = [c for c in ("pdsh", "sshd", "ssh", "ssh-keygen") if shutil.which(c) is None]
needs_ssh = pytest.mark.skipif(bool(MISSING), reason=f"{', '.join(MISSING)} not installed: apt-get install pdsh "
                               "openssh-server (.ci/run does)")
PORT = free_port()  # one rendezvous port for both hosts (inside their own network namespaces)
TIMEOUT_S = 20  # train.collective_timeout_s of the node-death run
RENDEZVOUS_S = 15  # train.rendezvous_timeout_s of the failed-rendezvous run
WORLD_TOL = 2e-3  # 1 rank x 2 micro batches vs 2 ranks x 1: another reduction order (as in test_reliability)
PRELORA = [str(BIN / "python"), "-m", "prelora_ds.cli"]  # the `prelora` command, without its installed script


@pytest.fixture(scope="module")
def hosts():
    with TwoHosts("pl14") as h:
        yield h


@pytest.fixture(scope="module")
def hostfile(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hostfiles") / "two"
    path.write_text("node0 slots=1\nnode1 slots=1\n")
    return path


def threads_env() -> dict[str, str]:
    """The one-host reference gives each of its 2 ranks cores // 2 threads; a node with 1 rank would take every
    core, and another thread count sums the matmuls in another order: the same count, for bit-equal losses."""
    return {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // 2))}


def node_cmd(hosts, i: int, hostfile: Path, *train: str, launcher: list[str] | None = None) -> list[str]:
    """`deepspeed --hostfile H --no_ssh --node_rank i --master_addr <node0>` on host i (as SLURM starts it)."""
    launcher = launcher or ["--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(i)]
    flags = [*launcher, "--master_addr", hosts.node[0].addr]
    return hosts.cmd(hosts.node[i], deepspeed_cmd(*train, ranks=None, port=PORT, launcher_args=flags))


class Job:
    """Processes started together (one per host), output to files that can be watched while they run."""

    def __init__(self, cmds: list[list[str]], logs: list[Path], env: list[dict[str, str]] | None = None):
        self.logs = logs
        self.procs = []
        self.started = time.monotonic()
        for i, (cmd, log) in enumerate(zip(cmds, logs, strict=True)):
            full_env = {**job_env(), **(env[i] if env else {})}
            with open(log, "w") as f:
                self.procs.append(subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=f, stderr=subprocess.STDOUT))

    def wait(self, timeout: float = 300) -> list[int]:
        deadline = time.monotonic() + timeout
        try:
            return [p.wait(timeout=max(1, deadline - time.monotonic())) for p in self.procs]
        finally:
            for p in self.procs:
                if p.poll() is None:
                    p.kill()

    def ended(self, timeout: float = 300) -> tuple[list[int], list[float]]:
        """`wait`, also giving when each process ended (seconds since the start)."""
        deadline, ends = time.monotonic() + timeout, [None] * len(self.procs)
        while None in ends and time.monotonic() < deadline:
            for i, p in enumerate(self.procs):
                if ends[i] is None and p.poll() is not None:
                    ends[i] = time.monotonic() - self.started
            time.sleep(0.1)
        return self.wait(timeout=1), ends

    def text(self, i: int) -> str:
        return self.logs[i].read_text()

    def wait_for(self, i: int, needle: str, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.text(i):
            if time.monotonic() > deadline or all(p.poll() is not None for p in self.procs):
                raise AssertionError(f"{needle!r} never appeared:\n{self.text(i)[-3000:]}")
            time.sleep(0.2)


def two_node_job(hosts, hostfile, out: Path, *train: str, env=None, launcher=None, name: str = "run") -> Job:
    cmds = [node_cmd(hosts, i, hostfile, "--output_dir", str(out), *train, launcher=launcher) for i in (0, 1)]
    return Job(cmds, [out.parent / f"{name}.node{i}.log" for i in (0, 1)], env)


def losses(out: Path) -> dict[int, float]:
    return dict(scalars(out)["1_train/loss"])


def timeline(out: Path) -> list[tuple[str, int, int]]:
    return [(p["name"], p["start_step"], p["end_step"]) for p in summary(out)["phases"]]


# ------------------------------------------------------------------ 2 hosts x 1 rank through the switch
@pytest.fixture(scope="module")
def two_nodes(hosts, hostfile, tmp_path_factory):
    """The switch reference's run (full 0-12, warmup 12-20, lora 20-40) on node0 + node1, `--no_ssh` per node,
    GLOO_SOCKET_IFNAME unset, each rank writing down the images it loaded."""
    base = tmp_path_factory.mktemp("two_nodes")
    out, trace = base / "run", base / "trace"
    trace.mkdir()
    env = {**threads_env(), "PRELORA_TRACE_SAMPLES": str(trace)}
    job = two_node_job(hosts, hostfile, out, *SWITCH_RUN, env=[env, env])
    codes = job.wait()
    assert codes == [0, 0], job.text(0)[-3000:] + job.text(1)[-3000:]
    return out, trace, job


def test_interface_routing_to_the_master_is_chosen_and_logged(two_nodes, hosts):
    _, _, job = two_nodes
    for i, h in enumerate(hosts.node):
        assert (
            f"prelora-train: {h.name}: GLOO_SOCKET_IFNAME={h.ifname} (address {h.addr}, the interface that routes to "
            f"MASTER_ADDR={hosts.node[0].addr}" in job.text(i)
        )


def test_two_nodes_saw_disjoint_shards_covering_the_epoch(two_nodes):
    out, trace, _ = two_nodes
    seen = {r: [tuple(map(int, line.split())) for line in (trace / f"rank{r}.txt").read_text().splitlines()]
            for r in (0, 1)}
    n_train = 1437  # the digits' train split (1797 images, 20 % val)
    micro, steps_per_epoch = 32, summary(out)["steps_per_epoch"]
    for epoch in (0, 1):  # epoch 0 whole, epoch 1 up to step 40
        shards = [[i for e, i in seen[r] if e == epoch] for r in (0, 1)]
        assert all(len(s) == len(set(s)) for s in shards)  # no image twice on a rank
        assert not set(shards[0]) & set(shards[1]), f"epoch {epoch}: the nodes loaded the same images"
        assert len(shards[0]) == len(shards[1])
    full = [{i for e, i in seen[r] if e == 0} for r in (0, 1)]
    assert len(full[0]) == steps_per_epoch * micro
    # what no rank loaded is each rank's last partial micro batch (DistributedSampler pads, the loader drops it)
    assert n_train - len(full[0] | full[1]) < 2 * micro
    assert full[0] | full[1] <= set(range(n_train))


def test_two_nodes_match_the_one_host_run_bit_for_bit(two_nodes, switch_reference):
    out, _, _ = two_nodes
    s = summary(out)
    assert s["world_size"] == 2 and timeline(out) == timeline(switch_reference)
    assert [p["name"] for p in s["phases"]] == ["full", "warmup", "lora"]
    assert losses(out) == losses(switch_reference)  # same ranks, same reduction order, same thread count
    assert json.loads((out / "ranks.json").read_text()) == json.loads((switch_reference / "ranks.json").read_text())
    a, b = (load_file(str(d / "model_merged.safetensors")) for d in (out, switch_reference))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert s["final_val_top1"] == summary(switch_reference)["final_val_top1"]


# ------------------------------------------------------------------ node1 dies in warmup; both again through mpiexec
def shards(trace: Path) -> list[set[int]]:
    """The train images each of the 2 ranks loaded (PRELORA_TRACE_SAMPLES) in epoch 0; asserts none twice."""
    out = []
    for r in (0, 1):
        seen = [int(i) for e, i in (line.split() for line in (trace / f"rank{r}.txt").read_text().splitlines())
                if e == "0"]
        assert len(seen) == len(set(seen)), f"rank {r} loaded an image twice in one epoch"
        out.append(set(seen))
    return out


@pytest.fixture(scope="module")
def node_death(hosts, hostfile, tmp_path_factory, global64):
    """The switch reference's run with the global batch fixed (64: accumulation 1 on 2 ranks, 2 on 1), a
    checkpoint every 5 steps, through the launcher's other multi-node paths:

    L1 `deepspeed --hostfile` from node0 (pdsh over ssh to both sshds); node1's rank parks after step 16
       (warmup), then every process of node1 (sshd included) gets SIGKILL.
    L2 `mpiexec -hosts node0,node1` (MPICH's hydra over ssh; node1's sshd restarted) to the end. (Going on without
       node1 on 1 rank, and growing back to 2, is torchrun's test below: `elastic`.)
    """
    base = tmp_path_factory.mktemp("node_death")
    out = base / "run"
    cmd = [*SWITCH_RUN, "--deepspeed_config", global64, "--train.checkpoint_every_steps", "5",
           "--train.collective_timeout_s", str(TIMEOUT_S)]
    ssh = hosts.start_sshd(base / "ssh")
    traces = [base / "trace_pdsh", base / "trace_mpi"]
    for t in traces:
        t.mkdir()
    # pdsh carries only the launcher's export list to node1; DS_ENV_FILE adds these (DeepSpeed's .deepspeed_env)
    env = {**threads_env(), "PRELORA_FAULTS": "hang@16:1", "PRELORA_TRACE_SAMPLES": str(traces[0])}
    (base / "ds_env").write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    pdsh = deepspeed_cmd("--output_dir", out, *cmd, ranks=None, port=PORT,
                         launcher_args=["--hostfile", hostfile, "--no_ssh_check", "--master_addr", hosts.node[0].addr])
    first = Job([hosts.cmd(hosts.node[0], pdsh)], [base / "pdsh.log"],
                [{"PDSH_SSH_ARGS_APPEND": " ".join(ssh), "DS_ENV_FILE": str(base / "ds_env")}])
    first.wait_for(0, "rank 1: hanging after step 16")
    killed_at = time.monotonic()
    started = killed_at - first.started  # start-up and 16 steps
    killed = hosts.kill_all(hosts.node[1])
    while first.procs[0].poll() is None and time.monotonic() - killed_at < TIMEOUT_S + 120:
        time.sleep(0.1)
    stopped_after = time.monotonic() - killed_at
    codes = first.wait(timeout=10)
    after_kill = {"latest": (out / "checkpoints" / "latest").read_text().strip(),
                  "complete": sorted(p.parent.name for p in (out / "checkpoints").glob("step*/COMPLETE"))}
    env = threads_env()
    ssh = hosts.start_sshd(base / "ssh")  # node1 comes back
    (base / "ssh_launcher").write_text(f"#!/bin/sh\nexec ssh {' '.join(ssh)} \"$@\"\n")
    (base / "ssh_launcher").chmod(0o755)
    mpi = [str(BIN / "mpiexec"), "-launcher", "ssh", "-launcher-exec", str(base / "ssh_launcher"),
           "-hosts", "node0,node1", "-n", "2", "-ppn", "1", str(BIN / "prelora-train"), "--output_dir", str(out), *cmd,
           "--resume"]
    both = Job([hosts.cmd(hosts.node[0], mpi)], [base / "mpiexec.log"],
               [{**env, "PRELORA_TRACE_SAMPLES": str(traces[1])}])
    both_codes = both.wait()
    return dict(out=out, first=first, codes=codes, killed=killed, started=started, stopped_after=stopped_after,
                after_kill=after_kill, both=both, both_codes=both_codes, traces=traces)


@needs_ssh
def test_node_death_stops_node0_within_the_timeout_naming_the_checkpoint(node_death):
    d = node_death
    log = d["first"].text(0)
    assert d["killed"], "node1 had no process to kill"
    assert "node1: prelora-train: node1: GLOO_SOCKET_IFNAME=veth1" in log  # node1's rank started through pdsh
    assert d["codes"][0] != 0, log[-3000:]
    print(f"node death: node0 stopped {d['stopped_after']:.1f} s after node1's death ({d['started']:.1f} s to start "
          "and train 16 steps)")
    # the collective's timeout, then a teardown shorter than the start-up (not the process group's 30-min timeout)
    assert d["stopped_after"] < TIMEOUT_S + d["started"], (d["stopped_after"], d["started"])
    ckpt = d["out"] / "checkpoints"
    assert ("node0: prelora-train: error: rank 0: the all-reduce of the logged loss at step 16 failed: another rank "
            f"closed its connection (its process or node died). The last complete checkpoint is {ckpt / 'step00000015'}"
            "; restart the job with --resume" in log), log[-3000:]
    assert "node0: [" in log and "exits with return code = 1" in log  # node0's rank exited 1
    assert d["after_kill"] == {"latest": "step00000015", "complete": ["step00000012", "step00000015"]}


@needs_ssh
def test_both_nodes_continue_from_the_checkpoint_through_mpiexec(node_death, switch_reference):
    d = node_death
    out = d["out"]
    assert d["both_codes"] == [0], d["both"].text(0)[-2000:]
    both = d["both"].text(0)
    assert "resumed at step 15 (epoch 0, phase warmup)" in both
    assert "node1: GLOO_SOCKET_IFNAME=veth1" in both  # mpiexec's rank 1 ran on node1
    assert timeline(out) == timeline(switch_reference)
    assert json.loads((out / "ranks.json").read_text()) == json.loads((switch_reference / "ranks.json").read_text())
    a, b = losses(switch_reference), losses(out)
    assert sorted(b) == list(range(1, 41))
    # the same 2 ranks, the same reduction order (accumulation 1 either way): bit for bit, across the death
    assert all(a[s] == b[s] for s in range(1, 41)), max(abs(a[s] - b[s]) for s in range(1, 41))
    assert summary(out)["final_val_top1"] == summary(switch_reference)["final_val_top1"]
    for trace in d["traces"]:  # pdsh's and mpiexec's ranks loaded disjoint shards of the same size
        r0, r1 = shards(trace)
        assert r0 and not r0 & r1 and len(r0) == len(r1), trace.name


# ------------------------------------------------------------------ torchrun's elastic agents: a node dies, comes back
# the last call waits for a second node after the first (both start together here); a dead node is known after 3 s
AGENT_RDZV = "join_timeout=120,last_call_timeout=6,keep_alive_interval=1,keep_alive_max_attempt=3"


def agent_cmd(hosts, i: int, port: int, *train: str) -> list[str]:
    """One torchrun agent on host i, 1 worker, 1 to 2 nodes, c10d rendezvous on node0, restarts left. node0's agent
    hosts the rendezvous store (`is_host`: torchrun guesses it from the hostname, which resolves to 127.0.1.1 here)."""
    rdzv = f"{AGENT_RDZV},is_host={int(i == 0)}"
    return hosts.cmd(hosts.node[i], [
        str(BIN / "torchrun"), "--nnodes", "1:2", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
        "--rdzv_endpoint", f"{hosts.node[0].addr}:{port}", "--rdzv_id", "prelora-elastic", "--rdzv_conf", rdzv,
        "--max-restarts", "3", "--monitor-interval", "0.5", "-m", "prelora_ds.train", *train,
    ])  # fmt: skip


@pytest.fixture(scope="module")
def elastic(hosts, tmp_path_factory, global64):
    """The switch reference's run (global batch fixed at 64) under two torchrun agents, one per host, --resume on the
    command line (what an agent restarts) and nothing typed after the start:

    A1 both agents form a world of 2; node1's worker parks after step 16 (warmup), then every process of node1 (its
       agent included) gets SIGKILL. node0's worker finds its peer gone and exits; node0's agent re-forms a world of 1
       and its new worker resumes the newest checkpoint (15) on 1 rank, then pauses after step 22 (a fixed step for
       what follows: the fault fires in restart 1 only).
    A2 node1's agent starts again and joins: node0's agent stops its worker with SIGTERM (a membership change), the
       worker stops after step 22 with a checkpoint (the pre-emption path) and both agents start a world of 2 that
       resumes at step 22 and trains to the end in lora.
    """
    base = tmp_path_factory.mktemp("elastic")
    out = base / "run"
    port = free_port()
    train = ["--output_dir", str(out), *SWITCH_RUN, "--deepspeed_config", global64,
             "--train.checkpoint_every_steps", "5", "--train.collective_timeout_s", str(TIMEOUT_S), "--resume"]
    t0 = time.monotonic()
    env = {**threads_env(), "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}  # for a node change (distributed/elastic.py)
    first = Job([agent_cmd(hosts, i, port, *train) for i in (0, 1)], [base / f"agent.node{i}.log" for i in (0, 1)],
                [{**env, "PRELORA_FAULTS": "pause@22#1"}, {**env, "PRELORA_FAULTS": "hang@16"}])
    first.wait_for(1, "hanging after step 16")
    killed_at = time.monotonic()
    started = killed_at - t0  # both agents' start-up, rendezvous and 16 steps
    killed = hosts.kill_all(hosts.node[1])
    first.wait_for(0, "resumed at step 15")
    resumed_after = time.monotonic() - killed_at
    first.wait_for(0, "pausing after step 22")
    again = Job([agent_cmd(hosts, 1, port, *train)], [base / "agent.node1.again.log"], [env])
    codes = [first.procs[0].wait(timeout=300), *again.wait(timeout=300)]
    took = time.monotonic() - t0
    for p in first.procs:
        if p.poll() is None:
            p.kill()
    return dict(out=out, first=first, again=again, codes=codes, killed=killed, started=started,
                resumed_after=resumed_after, took=took)


def test_elastic_agents_shrink_when_a_node_dies_and_grow_when_it_returns(elastic, hosts):
    e = elastic
    node0, node1 = e["first"].text(0), e["again"].text(0)
    print(f"elastic: node death to the resumed step on 1 rank {e['resumed_after']:.1f} s (the first world took "
          f"{e['started']:.1f} s to start and train 16 steps); job {e['took']:.0f} s")
    assert e["killed"], "node1 had no process to kill"
    assert e["codes"] == [0, 0], node0[-3000:] + node1[-3000:]
    ckpt = e["out"] / "checkpoints"
    # the shrink: node0 alone from the newest complete checkpoint, on 1 rank through the universal conversion
    assert "another rank closed its connection" in node0
    assert f"resuming step00000015, saved by 2 rank(s), on 1 rank(s): converted to a DeepSpeed universal checkpoint " \
           f"({ckpt / 'step00000015_universal'}" in node0
    assert "resumed at step 15 (epoch 0, phase warmup)" in node0
    # dead-node detection (3 s) + last call (6 s) + a worker's start-up, conversion and load: no longer than the
    # first world's start and 16 steps twice over
    assert e["resumed_after"] < 9 + 2 * e["started"], (e["resumed_after"], e["started"])
    # the grow: the agent's SIGTERM stops the lone worker after the step it was at, with a checkpoint; the world of 2
    # resumes exactly there (no step lost)
    assert "pre-empted by SIGTERM: every rank stopped after step 22 (lora)" in node0, node0[-3000:]
    assert "Exit code 75 (requeue): a torchrun agent that stopped its workers for a node change" in node0
    grown = node0[node0.index("pausing after step 22"):] + node1  # rank 0 of the world of 2 logs for both
    assert "resuming step00000022, saved by 1 rank(s), on 2 rank(s)" in grown
    assert "resumed at step 22 (epoch 1, phase lora)" in grown and "resumed at step 15" not in grown
    assert f"GLOO_SOCKET_IFNAME={hosts.node[1].ifname}" in node1  # routed to --rdzv_endpoint, not to loopback
    assert "could not join the process group" not in node0 + node1


def test_elastic_run_matches_the_uninterrupted_one(elastic, switch_reference):
    out = elastic["out"]
    assert timeline(out) == timeline(switch_reference)
    assert json.loads((out / "ranks.json").read_text()) == json.loads((switch_reference / "ranks.json").read_text())
    a, b = losses(switch_reference), losses(out)
    assert sorted(b) == list(range(1, 41))
    assert all(a[s] == b[s] for s in range(1, 16))  # up to the death: the same 2 ranks, bit for bit
    worst = max(abs(a[s] - b[s]) for s in range(16, 41))
    print(f"elastic: largest loss difference after the shrink and the grow {worst:.2e}")
    assert worst <= WORLD_TOL
    model = timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=16, patch_size=4, depth=6)
    model.load_state_dict(load_file(str(out / "model_merged.safetensors")))  # strict: a plain timm state dict


# ------------------------------------------------------------------ a rendezvous that cannot complete
def test_unreachable_rank_fails_fast_on_every_node_naming_address_and_variable(hosts, hostfile, tmp_path):
    """Both nodes told to use loopback (GLOO_SOCKET_IFNAME=lo: what gloo picks by itself when the hostname resolves
    to 127.0.1.1, the failure of issue 14): one rank cannot connect to the address the other advertised and stops
    at once; the other waits for a connection that never comes and stops after train.rendezvous_timeout_s."""
    out = tmp_path / "run"
    job = two_node_job(hosts, hostfile, out, *SWITCH_RUN, "--train.rendezvous_timeout_s", str(RENDEZVOUS_S),
                       env=[{"GLOO_SOCKET_IFNAME": "lo"}] * 2)
    codes, ends = job.ended(timeout=RENDEZVOUS_S + 120)
    assert codes == [1, 1], job.text(0)[-2000:] + job.text(1)[-2000:]
    master = f"MASTER_ADDR={hosts.node[0].addr}:{PORT}"
    rank0, rank1 = job.text(0), job.text(1)
    # whichever rank reads the other's loopback address first fails at once (refused); the other waits for a
    # connection that never comes and stops by the watchdog: which is which depends on who registered first
    for r, text in enumerate((rank0, rank1)):
        assert f"rank {r} of WORLD_SIZE=2 on node{r} could not join the process group at {master} " \
               "(GLOO_SOCKET_IFNAME=lo)" in text
    assert f"the process group did not start within train.rendezvous_timeout_s={RENDEZVOUS_S} s" in rank0 + rank1
    assert "node1: GLOO_SOCKET_IFNAME=lo (set by the user)" in rank1
    for text in (rank0, rank1):
        assert "that GLOO_SOCKET_IFNAME (and NCCL_SOCKET_IFNAME on GPUs) names that network's interface" in text
    # the refused rank ends after its start-up (imports, dataset); the other after its start-up and the watchdog, not
    # the process group's 30-min timeout
    first, last = sorted(ends)
    print(f"unreachable rank: the refused node ended {first:.1f} s after the start, the other {last:.1f} s")
    assert last < RENDEZVOUS_S + 2 * first, ends


# ------------------------------------------------------------------ hostfile mistakes, refused before anything starts
def test_hostfile_mistakes_are_refused_before_the_process_group(hosts, hostfile, tmp_path):
    unknown = tmp_path / "unknown"
    unknown.write_text("node0 slots=1\nnode7 slots=1\n")
    cases = {  # name: (launcher flags on node0, the error)
        "slots": (["--hostfile", str(hostfile), "--no_ssh", "--node_rank", "0", "--num_gpus", "2"],
                  f"2 ranks started on node0, but hostfile {hostfile} gives it slots=1: drop --num_gpus"),
        "node rank of another host": (["--hostfile", str(hostfile), "--no_ssh", "--node_rank", "1"],
                                      f"this machine (node0) is node0, node rank 0 of hostfile {hostfile}, but was "
                                      "started with --node_rank 1 (node1); start it with --node_rank 0."),
    }
    jobs = {name: Job([node_cmd(hosts, 0, hostfile, "--output_dir", str(tmp_path / "run"), *SWITCH_RUN,
                                launcher=flags)], [tmp_path / f"{i}.log"])
            for i, (name, (flags, _)) in enumerate(cases.items())}
    # a name that does not resolve: a --no_ssh launch never uses it (a warning), so node0 goes on to the
    # rendezvous, where node7 never comes
    unresolved = Job([node_cmd(hosts, 0, hostfile, "--output_dir", str(tmp_path / "unresolved"), *SWITCH_RUN,
                               "--train.rendezvous_timeout_s", "5",
                               launcher=["--hostfile", str(unknown), "--no_ssh", "--node_rank", "0"])],
                     [tmp_path / "unresolved.log"])
    for name, job in jobs.items():
        assert job.wait(timeout=180) == [2], (name, job.text(0)[-2000:])
        assert f"prelora-train: error: {cases[name][1]}" in job.text(0), (name, job.text(0)[-2000:])
        assert "GLOO_SOCKET_IFNAME=" not in job.text(0)  # init_distributed never ran
    assert not (tmp_path / "run").exists()
    assert unresolved.wait(timeout=RENDEZVOUS_S + 180) == [1], unresolved.text(0)[-2000:]
    text = unresolved.text(0)
    assert (f"prelora-train: warning: host(s) node7 of hostfile {unknown} do not resolve on node0; a --no_ssh launch "
            "never uses the names" in text), text[-2000:]
    assert "the process group did not start within train.rendezvous_timeout_s=5 s" in text
    # where the names are used (pdsh/ssh, MPI launchers) the check before launching refuses them
    for flags, code, message in (([], 2, f"error: host(s) node7 of hostfile {unknown} do not resolve on node0: fix "),
                                 (["--no_ssh"], 0, f"warning: host(s) node7 of hostfile {unknown} do not resolve")):
        check = subprocess.run(hosts.cmd(hosts.node[0], [*PRELORA, "check-hostfile", str(unknown), "--node_rank", "0",
                                                         *flags]), capture_output=True, text=True, cwd=REPO)
        assert check.returncode == code and f"prelora check-hostfile: {message}" in check.stderr, check.stderr
    # a node rank outside the hostfile: the launcher stops itself (an assertion); the check says it plainly
    outside = Job([node_cmd(hosts, 0, hostfile, *SWITCH_RUN,
                            launcher=["--hostfile", str(hostfile), "--no_ssh", "--node_rank", "2"])],
                  [tmp_path / "outside.log"])
    assert outside.wait(timeout=120) != [0]
    assert "--node_rank is not set correctly" in outside.text(0) and "spawned" not in outside.text(0)
    check = subprocess.run(hosts.cmd(hosts.node[0], [*PRELORA, "check-hostfile", str(hostfile), "--node_rank", "2"]),
                           capture_output=True, text=True, cwd=REPO)
    assert check.returncode == 2
    assert (f"--node_rank 2 is outside hostfile {hostfile}, which lists 2 host(s) (node0, node1): node ranks are "
            "0..1 in the file's order" in check.stderr)
    ok = subprocess.run(hosts.cmd(hosts.node[1], [*PRELORA, "check-hostfile", str(hostfile), "--node_rank", "1"]),
                        capture_output=True, text=True, cwd=REPO)
    assert ok.returncode == 0 and "this is node1 (node rank 1, 1 slot(s))" in ok.stdout, ok.stderr
