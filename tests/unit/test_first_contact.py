"""What a new user meets first, checked without a job: the commands a run prints resolve from a shell without the
venv on PATH, library deprecation noise is gone while other warnings stay, the progress display writes plain lines
to a log file, a busy MASTER_PORT is named as such, run files follow the umask, the package's per-rank checkpoint
state loads with weights_only=True (old checkpoints too), and `prelora compare` writes beside the runs."""

from __future__ import annotations

import json
import os
import pickle
import random
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from prelora_ds.checkpoint import storage
from prelora_ds.log import setup_logging
from prelora_ds.metrics.progress import LineProgress
from prelora_ds.metrics.tags import current_name, tag
from prelora_ds.testing.harness import REPO
from prelora_ds.train import tool_command

SYSTEM_PATH = "/usr/bin:/bin"  # a shell whose PATH does not hold the venv


def test_printed_tool_commands_run_from_a_shell_without_the_venv(monkeypatch):
    monkeypatch.setenv("PATH", SYSTEM_PATH)
    monkeypatch.chdir(REPO)
    for name in ("tensorboard", "prelora"):
        command = tool_command(name)
        assert command != name, command  # not on this PATH: the run prints where it is
        proc = subprocess.run(f"{command} --help", shell=True, env={"PATH": SYSTEM_PATH}, cwd=REPO,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, (command, proc.stderr[-500:])
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}:{SYSTEM_PATH}")
    assert tool_command("tensorboard") == "tensorboard"  # an activated venv: the bare name


def test_library_deprecation_noise_is_filtered_by_message_only():
    setup_logging()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # what a fresh process has, then the package's filters on top
        setup_logging()
        warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated. Please use "
                      "`torch.distributed.all_gather_single` instead.", FutureWarning, stacklevel=1)
        warnings.warn("`torch.distributed.reduce_scatter_tensor` is deprecated. Please use "
                      "`torch.distributed.reduce_scatter_single` instead.", FutureWarning, stacklevel=1)
        warnings.warn("`some_other_api` is deprecated", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["`some_other_api` is deprecated"]


def test_progress_lines_for_a_log_file(monkeypatch, capsys):
    clock = iter([0.0, 5.0, 31.0, 40.0, 70.0, 75.0])
    monkeypatch.setattr("prelora_ds.metrics.progress.time.monotonic", lambda: next(clock))
    setup_logging(0)
    progress = LineProgress(total=100, initial=0, interval_s=30)
    progress.update(10, {"loss": "1.5000", "phase": "full"})  # 5 s: too soon
    progress.update(40, {"loss": "1.2000", "phase": "full"})  # 31 s
    progress.update(50, {})  # 40 s: too soon
    progress.update(100, {"phase": "lora"})  # the last step always
    progress.update(100, {})  # and once
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["step 40/100 (40%) [full] loss 1.2000, 0:00:31 elapsed, 0:00:46 left",
                     "step 100/100 (100%) [lora] loss 1.2000, 0:01:10 elapsed, 0:00:00 left"]
    assert "\r" not in "".join(lines)


def test_a_busy_master_port_is_named_with_the_flag_that_fixes_it(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))
        proc = subprocess.run([sys.executable, "-m", "prelora_ds.train", "--recipe", "recipes/demo.yaml",
                               "--output_dir", str(tmp_path / "run")], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=300)
    assert proc.returncode == 1
    assert f"prelora-train: error: MASTER_PORT={port} is already in use on {socket.gethostname()}" in proc.stderr
    assert "deepspeed --master_port N" in proc.stderr
    assert "could not join the process group" not in proc.stderr  # not a network fault
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_merged_model_follows_the_umask(tmp_path):
    from prelora_ds.lora.merge import save_merged

    old = os.umask(0o022)
    try:
        save_merged(tmp_path / "model.safetensors", {"head.weight": torch.ones(2, 2)}, {})
        (tmp_path / "config.yaml").write_text("x")  # how the run's other files are made
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == {"model.safetensors": 0o644, "config.yaml": 0o644}


def _rank_file(tmp_path: Path, rng: dict) -> Path:
    torch.save({"pending_loss": [1.5, 2.0], "rng": rng}, tmp_path / "rank0.pt")
    return tmp_path / "rank0.pt"


def test_rank_state_loads_with_weights_only_and_restores_every_rng(tmp_path):
    path = _rank_file(tmp_path, storage.rng_state())
    plain = torch.load(path, weights_only=True)  # no allow-list needed: tensors and plain types only
    expected = (np.random.rand(), random.random(), torch.rand(1).item())
    storage.set_rng_state(storage.read_rank_state(tmp_path, 0)["rng"])
    assert (np.random.rand(), random.random(), torch.rand(1).item()) == expected
    assert plain["pending_loss"] == [1.5, 2.0]


def test_rank_state_of_an_older_checkpoint_still_resumes(tmp_path):
    legacy = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    _rank_file(tmp_path, legacy)  # numpy's own tuple, as checkpoints before the tensor form hold it
    expected = np.random.rand()
    storage.set_rng_state(storage.read_rank_state(tmp_path, 0)["rng"])
    assert np.random.rand() == expected


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_a_rank_file_that_would_run_code_is_refused(tmp_path):
    torch.save({"rng": _Payload()}, tmp_path / "rank0.pt")  # torch.load(weights_only=False) would run it
    with pytest.raises(pickle.UnpicklingError, match="weights_only"):
        storage.read_rank_state(tmp_path, 0)


def test_older_runs_tags_read_under_todays_names():
    assert current_name("train/loss") == tag("loss") == "1_train/loss"
    assert current_name("norm/attn.qkv") == tag("norm", module="attn.qkv")
    assert current_name("window/D/mlp.fc1") == tag("D", module="mlp.fc1")
    assert current_name("lora_norm/base/mean") == "lora_norm/base/mean"  # unchanged names stay
    assert current_name("norm_layer/attn.qkv/00") == "norm_layer/attn.qkv/00"


def _summary(run: Path, switch: int | None) -> None:
    run.mkdir(parents=True)
    phases = [{"name": "full", "start_step": 0, "end_step": 40, "trainable_params": 100, "total_params": 100,
               "median_step_s": 0.1}]
    (run / "summary.json").write_text(json.dumps({"phases": phases, "switch_step": switch, "final_val_top1": 97.5,
                                                  "wall_time_s": 12.0, "steps_per_epoch": 10, "val": []}))


def test_compare_writes_beside_the_runs(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    from prelora_ds.cli import compare

    monkeypatch.chdir(tmp_path)
    _summary(tmp_path / "runs" / "a", 20)
    _summary(tmp_path / "runs" / "b", None)
    assert compare.main(["runs/a"]) == 0
    assert (tmp_path / "runs" / "a" / "compare_runs.png").is_file()
    assert compare.main(["runs/a", "runs/b"]) == 0
    assert (tmp_path / "runs" / "compare_runs.png").is_file()
    assert not (tmp_path / "compare_runs.png").exists()
    table = capsys.readouterr().out
    assert "| a | 12.0 | 20 | 97.50 |" in table and "| b | 12.0 | no switch | 97.50 |" in table


@pytest.mark.parametrize("command", ["compare", "plot", "sharpness"])
def test_tool_help_states_every_default(command):
    proc = subprocess.run([str(Path(sys.executable).parent / "prelora"), command, "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0
    options = [line for line in proc.stdout.split("options:")[1].splitlines() if line.strip().startswith("--")]
    for line in options:
        if "--help" in line:
            continue
        block = proc.stdout.split(line, 1)[1].split("\n  -", 1)[0]
        assert "default" in (line + block).lower(), (command, line)
    positional = proc.stdout.split("positional arguments:")[1].split("options:")[0]
    assert len(positional.strip().splitlines()[0].split()) > 1, positional  # the argument is described
