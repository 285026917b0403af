"""Command line: argument parsing and `main()` failing with exit code 2 before any process group starts."""

from __future__ import annotations

import json

import pytest
import torch.distributed as dist

from prelora_ds.distributed import launch
from prelora_ds.errors import ConfigError
from prelora_ds.testing.harness import REPO
from prelora_ds.train import main, parse_args

DEMO = ["--recipe", "recipes/demo.yaml", "--deepspeed_config", "ds_configs/cpu_zero2_fp32.json"]
# Cases that get past resolve() build the model: a one-block ViT keeps that at milliseconds.
SMALL = ["--model.kwargs", "{img_size: 16, patch_size: 4, depth: 1, embed_dim: 32, num_heads: 2}"]
WORLD_ENV = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE", "RANK", "LOCAL_RANK")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for key in WORLD_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.chdir(REPO)
    # Tripwire, not a mock: every case here must fail before the process group starts, never train.
    monkeypatch.setattr(launch, "init_distributed", _tripwire)


def _tripwire(*args, **kwargs):
    raise AssertionError("main() reached init_distributed: the error was not caught before the process group")


# ----------------------------------------------------------------------------------------------- parse_args


def test_parse_args_overrides_with_and_without_equals():
    args, overrides = parse_args(
        [
            *DEMO,
            "--train.max_steps=12",
            "--prelora.delta_l",
            "-1",
            "--model.kwargs",
            "{depth: 6}",
            "--data.auto_augment=null",
            "--prelora.enabled",
            "false",
            "--output_dir",
            "runs/x",
            "--resume",
        ]
    )
    assert overrides == {
        "train.max_steps": 12,
        "prelora.delta_l": -1,
        "model.kwargs": {"depth": 6},
        "data.auto_augment": None,
        "prelora.enabled": False,
    }
    assert (args.recipe, args.deepspeed_config, args.output_dir) == (*DEMO[1::2], "runs/x")
    assert args.resume is True and args.local_rank is None


def test_parse_args_local_rank_from_launcher():
    args, overrides = parse_args(["--local_rank=1", "--train.epochs", "2"])
    assert args.local_rank == 1
    assert overrides == {"train.epochs": 2}
    assert parse_args([])[1] == {}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--train.max_steps"], "--train.max_steps needs a value, e.g. --train.max_steps 12."),
        (["--train.max_steps", "--train.epochs", "3"], "--train.max_steps needs a value"),
        (["stray"], "unexpected argument 'stray'; overrides look like --train.max_steps 12."),
        (["--train.epochs", "3", "extra"], "unexpected argument 'extra'"),
        (["--epochs", "3"], "unknown flag --epochs; recipe fields are written --section.field"),
        (["--epochs=3"], "unknown flag --epochs;"),
    ],
)
def test_parse_args_errors(argv, message):
    with pytest.raises(ConfigError) as exc:
        parse_args(argv)
    assert str(exc.value).startswith(message)


# ----------------------------------------------------------------------------------------------- main() fails early


def run_main(capsys, argv: list[str]) -> str:
    """main(argv) must return 2 with one error line on stderr, and must not have started a process group."""
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, f"exit {code}\nstdout: {out}\nstderr: {err}"
    assert err.startswith("prelora-train: error: "), err
    assert "prelora-train: " not in out  # no startup banner: training never started
    assert not (dist.is_available() and dist.is_initialized())
    return err


def write_ds(tmp_path, **changes) -> str:
    cfg = json.loads((REPO / "ds_configs" / "cpu_zero2_fp32.json").read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def test_main_unknown_recipe_key(capsys, tmp_path):
    err = run_main(capsys, [*DEMO, "--train.max_step", "3", "--output_dir", str(tmp_path / "run")])
    assert "unknown recipe key train.max_step. Did you mean 'max_steps'?" in err
    assert not (tmp_path / "run").exists()


def test_main_phase_engine_that_cannot_keep_the_global_batch(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as the launcher says before any group: 32 x 1 x 2 = 64 images a step
    err = run_main(capsys, [*DEMO, "--engine.lora", "{zero_stage: 2, micro_batch: 24}",
                            "--output_dir", str(tmp_path / "run")])
    assert ("engine.lora.micro_batch=24 cannot keep train_batch_size=64 on 2 rank(s) (micro batch x accumulation x "
            "ranks must be 64); micro batches that keep it: 1, 2, 4, 8, 16, 32.") in err
    err = run_main(capsys, [*DEMO, "--engine.warmup", "{zero_stage: 2, offload: true}"])
    assert "engine.warmup.offload is not a per-phase engine setting" in err


def test_main_bad_flag(capsys):
    err = run_main(capsys, [*DEMO, "--epochs", "3"])
    assert "unknown flag --epochs" in err


def test_main_recipe_not_a_mapping(capsys, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("- train\n- data\n")
    err = run_main(capsys, ["--recipe", str(recipe), "--deepspeed_config", "ds_configs/cpu_zero2_fp32.json"])
    assert "a recipe must be a mapping of sections" in err


def test_main_missing_ds_config(capsys, tmp_path):
    missing = tmp_path / "nope.json"
    err = run_main(capsys, ["--recipe", "recipes/demo.yaml", "--deepspeed_config", str(missing)])
    assert f"DeepSpeed config {missing} does not exist" in err


def test_main_no_ds_config_at_all(capsys, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train: {epochs: 1}\n")
    err = run_main(capsys, ["--recipe", str(recipe)])
    assert "no DeepSpeed config: pass --deepspeed_config" in err


def test_main_ds_config_with_auto(capsys, tmp_path):
    zero = {"stage": 2, "reduce_bucket_size": "auto"}
    ds = write_ds(tmp_path, zero_optimization=zero)
    err = run_main(capsys, ["--recipe", "recipes/demo.yaml", "--deepspeed_config", ds])
    assert 'DeepSpeed config has "auto" at zero_optimization.reduce_bucket_size' in err


def test_main_batch_not_divisible_by_world(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "3")
    ds = write_ds(tmp_path, train_batch_size=64, train_micro_batch_size_per_gpu=32, gradient_accumulation_steps=None)
    err = run_main(capsys, ["--recipe", "recipes/demo.yaml", "--deepspeed_config", ds])
    assert "train_batch_size=64 is not divisible by train_micro_batch_size_per_gpu=32 x world size 3" in err
    assert "use a multiple of 96" in err


def test_main_imagefolder_missing_root(capsys, tmp_path):
    err = run_main(
        capsys,
        [*DEMO, *SMALL, "--data.dataset", "imagefolder", "--data.root", "/nonexistent", "--output_dir", str(tmp_path)],
    )
    assert "data.root='/nonexistent' does not exist or is not a folder" in err


def test_main_imagefolder_without_root(capsys):
    err = run_main(capsys, [*DEMO, "--data.dataset", "imagefolder"])
    assert "data.dataset=imagefolder needs data.root" in err


def test_main_output_dir_with_checkpoint_needs_resume(capsys, tmp_path):
    tag = tmp_path / "checkpoints" / "step00000005"
    tag.mkdir(parents=True)
    (tag / "COMPLETE").write_text("step00000005")
    err = run_main(capsys, [*DEMO, *SMALL, "--output_dir", str(tmp_path)])
    assert f"{tmp_path} already holds checkpoints (step00000005 is the newest); add --resume" in err
    assert not (tmp_path / "config.yaml").exists()  # nothing written into the other run's directory


# ----------------------------------------------------------------------------------------------- issue 7: bad input


def test_main_target_regex_matching_nothing(capsys):
    err = run_main(capsys, [*DEMO, *SMALL, "--prelora.target_modules", r"blocks\.\d+\.ffn"])
    assert (
        "prelora.target_modules='blocks\\\\.\\\\d+\\\\.ffn' matches no Linear module of this model; module names "
        "look like ['blocks.0.attn.qkv', 'blocks.0.attn.proj', 'blocks.0.mlp.fc1', 'blocks.0.mlp.fc2', 'head']" in err
    )


def test_main_train_set_smaller_than_one_batch_per_rank(capsys):
    """Found before the process group starts (it used to surface in every rank's build_loaders as a traceback)."""
    err = run_main(capsys, [*DEMO, *SMALL, "--data.dataset", "synthetic", "--data.synthetic_train_size", "8"])
    assert "the train set has 8 images, fewer than micro_batch (32) x world_size (1) = 32" in err


def test_main_split_qkv_with_a_fused_target_regex(capsys):
    """model.qkv=split with the default (fused) targets would silently train no LoRA on q, k and v."""
    err = run_main(capsys, [*DEMO, *SMALL, "--model.qkv", "split"])
    assert "model.qkv=split has attn.q_proj, attn.k_proj and attn.v_proj, which prelora.target_modules=" in err
    assert r"write --prelora.target_modules 'blocks\.\d+\.(attn\.(q_proj|k_proj|v_proj|proj)|mlp\.fc[12])'" in err


def test_main_ds_config_not_json(capsys, tmp_path):
    path = tmp_path / "ds.json"
    path.write_text('{"train_micro_batch_size_per_gpu": 32,}\n')
    err = run_main(capsys, ["--recipe", "recipes/demo.yaml", "--deepspeed_config", str(path)])
    assert (
        f"DeepSpeed config {path} is not valid JSON (line 1, column 39: Expecting property name enclosed in double "
        "quotes); DeepSpeed configs are strict JSON: no comments, no trailing commas." in err
    )


def test_main_class_folder_without_images(capsys, tmp_path):
    from PIL import Image

    root = tmp_path / "data"
    for split in ("train", "val"):
        (root / split / "cat").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(root / split / "cat" / "a.png")
        (root / split / "dog").mkdir()
        (root / split / "dog" / "notes.txt").write_text("no images")
    err = run_main(capsys, [*DEMO, *SMALL, "--data.dataset", "imagefolder", "--data.root", str(root)])
    assert f"class folder(s) dog under {root / 'train'} hold no images (extensions: .jpg" in err
    assert "add images or remove the folder(s)." in err


def test_main_output_dir_under_a_file(capsys, tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")
    err = run_main(capsys, [*DEMO, *SMALL, "--output_dir", str(blocker / "run")])
    assert f"output_dir {blocker / 'run'}: its parent {blocker} is not a writable folder; pass a writable" in err


def test_main_bad_fault_spec(capsys, monkeypatch, tmp_path):
    from prelora_ds.testing import faults

    monkeypatch.setenv(faults.ENV, "kill@x")
    faults.active.cache_clear()
    try:  # its own output_dir: the recipe's runs/demo may hold a finished demo's checkpoints
        err = run_main(capsys, [*DEMO, *SMALL, "--output_dir", str(tmp_path / "run")])
    finally:
        monkeypatch.delenv(faults.ENV)
        faults.active.cache_clear()
    assert ("PRELORA_FAULTS: cannot read 'kill@x'; write KIND@STEP[:RANK][#ATTEMPT] with KIND one of kill, "
            "kill_in_save") in err


def test_main_rejects_bf16_overflow_check_off(capsys, tmp_path):
    ds = write_ds(tmp_path, bf16={"enabled": True, "check_grad_overflow": False})
    err = run_main(capsys, ["--recipe", "recipes/demo.yaml", "--deepspeed_config", ds])
    assert "bf16.check_grad_overflow=false lets a non-finite gradient into the weights" in err


def test_main_warns_when_keep_checkpoints_do_not_fit(capsys, monkeypatch, tmp_path):
    # more checkpoints than the disk holds only warns (saves stop the run cleanly if it does fill up);
    # a bad fault spec then stops main() before any process group, so nothing trains
    monkeypatch.setenv("PRELORA_FAULTS", "nope")
    from prelora_ds.testing import faults

    faults.active.cache_clear()
    try:
        out_dir = ["--output_dir", str(tmp_path / "run")]
        assert main([*DEMO, *SMALL, "--train.keep_checkpoints", str(10**12), *out_dir]) == 2
    finally:
        monkeypatch.delenv("PRELORA_FAULTS")
        faults.active.cache_clear()
    err = capsys.readouterr().err
    assert f"prelora-train: warning: output_dir {tmp_path / 'run'} has" in err
    assert f"train.keep_checkpoints={10**12} needs about" in err
