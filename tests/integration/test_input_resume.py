"""Exact resume through the device input path, on an ImageFolder of real JPEGs and on its shards.

One uninterrupted 2-rank run on the ImageFolder (`data.loader: device`, RandAugment + flip on) is the reference.
The same run is then cut three ways: SIGKILL in `full` (resumed on the ImageFolder), stopped in `warmup` and
resumed on the shards of the same folder by a single process (another world size), which switches to `lora` and
runs to the end. Its losses must be the reference's: same images, same order, same augmentations, same position.
"""

from __future__ import annotations

import json

import pytest

from prelora_ds.data.shards import write_shards
from prelora_ds.metrics.readers import scalars
from prelora_ds.testing.harness import BIN, REPO, SWITCH, TINY, mpirun_cmd, run, summary, write_digit_jpegs

pytestmark = pytest.mark.launch

WORLD_TOL = 2e-3  # tests/integration/test_reliability.py's: another world size sums the same losses in another order


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    base = tmp_path_factory.mktemp("input")
    folder = write_digit_jpegs(base / "folder", count=800)
    write_shards(folder, base / "shards", shard_size=128, log=lambda s: None)
    return base


def _elastic_ds(tmp_path_factory) -> str:
    cfg = json.loads((REPO / "ds_configs" / "cpu_zero2_fp32.json").read_text())
    cfg.pop("gradient_accumulation_steps")
    cfg["train_batch_size"] = 64  # 32 x 1 on 2 ranks, 32 x 2 on 1: the same steps at either size
    path = tmp_path_factory.mktemp("ds") / "elastic.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def _cmd(data, dataset: str, ds_config: str) -> list[str]:
    root = data / ("folder" if dataset == "imagefolder" else "shards")
    return [*TINY, "--deepspeed_config", ds_config, *SWITCH, "--train.max_steps", "24",
            "--train.checkpoint_every_steps", "5", "--data.loader", "device", "--data.dataset", dataset,
            "--data.root", str(root), "--data.auto_augment", "rand-m9-mstd0.5-inc1", "--data.hflip", "0.5"]


def losses(out) -> dict[int, float]:
    return dict(scalars(out)["1_train/loss"])


def test_device_loader_resumes_exactly_on_imagefolder_and_on_shards(data, tmp_path_factory, tmp_path):
    ds_config = _elastic_ds(tmp_path_factory)
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    run(mpirun_cmd("--output_dir", str(ref), *_cmd(data, "imagefolder", ds_config)))
    folder, shards = _cmd(data, "imagefolder", ds_config), _cmd(data, "shards", ds_config)
    killed = run(mpirun_cmd("--output_dir", str(cut), *folder), check=False,
                 env={"PRELORA_FAULTS": "kill@8:1"}, timeout=300)
    assert killed.returncode != 0 and "SIGKILL after step 8" in killed.stdout
    stopped = run(mpirun_cmd("--output_dir", str(cut), *folder, "--resume", "--train.stop_at_step", "16"),
                  timeout=300)
    assert "resumed at step 5 (epoch 0, phase full)" in stopped.stdout
    single = run([str(BIN / "python"), "-m", "prelora_ds.train", "--output_dir", str(cut),
                  *shards, "--resume"], timeout=300)
    assert "resumed at step 16 (epoch 1, phase warmup)" in single.stdout
    assert "on 1 rank(s)" in single.stdout  # a universal checkpoint: another world size

    def timeline(out):
        return [(p["name"], p["start_step"], p["end_step"]) for p in summary(out)["phases"]]

    assert timeline(ref) == [("full", 0, 12), ("warmup", 12, 20), ("lora", 20, 24)]
    assert timeline(cut) == timeline(ref)
    a, b = losses(ref), losses(cut)
    assert sorted(b) == list(range(1, 25))
    worst = max(abs(a[s] - b[s]) for s in range(1, 25))
    same_world = max(abs(a[s] - b[s]) for s in range(1, 17))
    print(f"device loader resume: largest loss difference {worst:.2e} (2 ranks, steps 1-16: {same_world:.2e})")
    assert same_world == 0.0  # the same ranks and reduction order: bit for bit
    assert worst <= WORLD_TOL
    assert abs(summary(cut)["final_val_top1"] - summary(ref)["final_val_top1"]) <= 0.3
