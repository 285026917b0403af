"""The one harness of the launched tests and the benchmarks: launch commands, job runs, tiny trainers.

Runs from a checkout (ds_configs/ and recipes/ are read from `REPO`):

  run(deepspeed_cmd("--recipe", "recipes/demo.yaml", "--output_dir", out))        # 2 ranks, a free master port
  run(deepspeed_cmd(out, script="tests/scripts/switch_check.py"))                  # a script instead of the module
  run(mpirun_cmd("--output_dir", out, *SWITCH_RUN))              # mpirun: when the launcher is not what is tested
  trainer = synthetic_trainer(out / "run", model_kwargs=tiny_vit(depth=2))          # inside a launched process

`deepspeed_cmd` is the only place a deepspeed launch is spelled out and `mpirun_cmd` the launch of the tests whose
subject is not the launcher (test_reliability's chains also start the installed `prelora-train` under mpirun, by
torchrun and as a plain process); `synthetic_trainer` the only place a Trainer on synthetic images is built outside
the product's entry point.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prelora_ds.config.sections import SPLIT_TARGETS
from prelora_ds.distributed.launch import free_port

if TYPE_CHECKING:
    import torch

    from prelora_ds.training.trainer import Trainer

REPO = Path(__file__).resolve().parents[2]  # the checkout: ds_configs/, recipes/, tests/, tools/
BIN = Path(sys.executable).parent

# ---------------------------------------------------------------------------------------------- the test recipes
# A tiny ViT with the real module names (blocks.N.attn.qkv, ...) on the embedded digits: seconds per run.
TINY = [
    "--recipe", "recipes/demo.yaml",
    "--deepspeed_config", "ds_configs/cpu_zero2_fp32.json",
    "--model.kwargs", "{img_size: 16, patch_size: 4, depth: 4, embed_dim: 64, num_heads: 2}",
    "--train.log_every_steps", "1",
    "--train.lr_warmup_steps", "4",
]  # fmt: skip
# The switch flags of the acceptance command: windows of 4 steps, thresholds that always pass.
SWITCH = [
    "--prelora.window_steps", "4", "--prelora.num_windows", "3",
    "--prelora.delta_w", "1000", "--prelora.delta_l", "1000", "--prelora.warmup_steps", "8",
]  # fmt: skip
# The uninterrupted references that resumed runs (test_launch, test_relora, test_reliability) are compared to.
SWITCH_RUN = ["--recipe", "recipes/demo.yaml", "--train.max_steps", "40", *SWITCH, "--train.log_every_steps", "1"]
# The one reference whose switch the convergence test decides at thresholds that can fail: relora's windows close
# at steps 8, 12 and 16 (N=2: the first test at 12). Recorded changes (windows.json; AVX-512, AVX2 and SSE4.2 kernels
# with 1 and 2 threads a rank): dL 1.626 at 12, 0.808 at 16; the largest module change D 2.39e-3 % at 12, at most
# 4.8e-5 % at 16 (the fp32 floor: 30 % apart between those CPUs). delta_l 1.15 sits 1.4x from each, delta_w 1e-3 2.4x
# and 20x: the test fails at 12 and passes at 16, on any CPU (tests/integration/test_references.py).
RELORA_DELTA_W, RELORA_DELTA_L = 1e-3, 1.15
RELORA_RUN = [
    "--recipe", "recipes/demo.yaml", "--train.max_steps", "60", "--relora.enabled", "true",
    "--relora.start_step", "4", "--relora.rank", "8", "--relora.merge_every_steps", "5",
    "--prelora.window_steps", "4", "--prelora.num_windows", "2", "--prelora.delta_w", str(RELORA_DELTA_W),
    "--prelora.delta_l", str(RELORA_DELTA_L), "--prelora.warmup_steps", "8", "--train.log_every_steps", "1",
    # one candidate rank: the switch's ranks cannot depend on the reduction order of a world size (per-layer norm
    # changes of ~1e-4 % in this short run put layers on bucket edges), so resumed runs compare exactly
    "--prelora.r_min", "16", "--prelora.r_max", "16",
]  # fmt: skip
# Engines per phase (on a ZeRO-3 config with micro batch 16): relora and lora rebuild onto ZeRO-2 with micro batch 32,
# warmup back onto the run's own ZeRO-3 with 16 (tests/scripts/zero_stages.py `phased`)
PHASE_ENGINES = ["--engine.relora", "{zero_stage: 2, micro_batch: 32}",
                 "--engine.lora", "{zero_stage: 2, micro_batch: 32}"]
# The paper's structure: separate q, k, v projections and the six targets (model.qkv: split).
# ... with the ranks stated for 384-wide layers (prelora.rank_reference_width): 4..32 on the demo's 192-wide ones
SPLIT_RUN = [*SWITCH_RUN, "--model.qkv", "split", "--prelora.target_modules", SPLIT_TARGETS,
             "--prelora.rank_reference_width", "384"]


# ---------------------------------------------------------------------------------------------- launches and runs
def launcher() -> list[str]:
    """The deepspeed launcher: the running interpreter's own script, else the one on PATH (a `pip install --target`
    puts it elsewhere), else its module."""
    own = BIN / "deepspeed"
    if own.is_file():
        return [str(own)]
    found = shutil.which("deepspeed")
    return [found] if found else [sys.executable, "-m", "deepspeed.launcher.runner"]


def deepspeed_cmd(
    *args: str | os.PathLike,
    ranks: int | None = 2,
    port: int | str | None = None,
    module: str = "prelora_ds.train",
    script: str | os.PathLike | None = None,
    launcher_args: Sequence[str | os.PathLike] = (),
) -> list[str]:
    """`deepspeed [--num_gpus RANKS] LAUNCHER_ARGS... --master_port PORT (--module MODULE | SCRIPT) ARGS...`.

    `ranks`: processes on this node (None: the launcher's own choice, every GPU, or the hostfile's slots);
    `port`: the rendezvous port, a free one unless given (one port agreed by several hosts is picked once, with
    `free_port()`, and passed to each); `script`: a Python file run instead of `module` (relative paths: from the
    checkout); `launcher_args`: more launcher flags (--hostfile, --no_ssh, --node_rank, --master_addr, ...)."""
    cmd = launcher()
    if ranks is not None:
        cmd += ["--num_gpus", str(ranks)]
    cmd += [*map(str, launcher_args), "--master_port", str(port if port is not None else free_port())]
    cmd += [str(REPO / script)] if script is not None else ["--module", module]
    return [*cmd, *map(str, args)]


def mpirun_cmd(
    *args: str | os.PathLike, ranks: int = 2, module: str = "prelora_ds.train", script: str | os.PathLike | None = None
) -> list[str]:
    """`mpirun -np RANKS python (-m MODULE | SCRIPT) ARGS...`: the launch of the tests whose subject is what the ranks
    do, not the launcher (test_launch, test_multinode and the launcher chains keep deepspeed's runner, hostfiles and
    torchrun). MPICH's mpiexec starts the ranks at once and ends the job when one dies, as the deepspeed launcher
    does; the runner and its per-node launcher each import DeepSpeed before any rank starts and poll the ranks once a
    second: about 8 s of a 25-s tiny launch here. The ranks agree on a free port (distributed/launch.py)."""
    target = [str(REPO / script)] if script is not None else ["-m", module]
    return [str(BIN / "mpirun"), "-np", str(ranks), sys.executable, *target, *map(str, args)]


def job_env() -> dict[str, str]:
    """This process's environment for a job: the interpreter's bin first on PATH, unbuffered output, and none of the
    variables a launcher sets (a job inside a launched test would otherwise join that test's group)."""
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("OMP_NUM_THREADS", None)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def run(
    cmd: list[str], timeout: int = 600, check: bool = True, env: dict[str, str] | None = None, **popen
) -> subprocess.CompletedProcess:
    """Run a job to its end in the checkout; `env` adds variables (e.g. PRELORA_FAULTS), `popen` goes to
    subprocess.run. With `check`, a non-zero exit raises AssertionError with the ends of its output."""
    full_env = {**job_env(), **(env or {})}
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout, **popen)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def run_ranked(cmd: list[str], result: Path, ranks: int) -> list[dict]:
    """Run a benchmark job in the checkout and read what each of its `ranks` wrote to `result`.rank<R>.json.

    glibc returns a freed block of 1 MiB or more to the OS at once (by default its threshold grows to 32 MiB after
    the first large free, and freed gathered parameters stay in the heap): peak RSS then follows live memory."""
    subprocess.run(cmd, cwd=REPO, check=True, env={**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)})
    return [json.loads(result.with_suffix(f".rank{r}.json").read_text()) for r in range(ranks)]


def load_tool(name: str):
    """A script of tools/ as a module (the tools are scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"tools_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------- data and results
def write_digit_jpegs(root: Path, count: int = 800, val_every: int = 5) -> Path:
    """An ImageFolder of real JPEGs: scikit-learn's digits, RGB, scaled to 16-27 px (odd sizes and aspect
    ratios), quality 90; every `val_every`-th image goes to val/. Returns `root`."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    for i, (img, label) in enumerate(zip(images[:count], digits.target[:count], strict=True)):
        path = root / ("val" if i % val_every == val_every - 1 else "train") / f"d{label}" / f"{i:04d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        size = (16 + i % 12, 16 + (i * 7) % 9)
        Image.fromarray(img).resize(size, Image.Resampling.BICUBIC).convert("RGB").save(path, quality=90)
    return root


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


# ---------------------------------------------------------------------------------------------- tiny trainers
def tiny_vit(img_size: int = 16, **kwargs: Any) -> dict[str, Any]:
    """timm kwargs of vit_tiny_patch16_224 shrunk to `img_size` px with 4 px patches (plus `kwargs`: depth, ...)."""
    return {"img_size": img_size, "patch_size": 4, **kwargs}


def start_distributed(timeout_s: float = 600) -> tuple[int, int, int]:
    """(rank, local rank, world size): the process group started once per process (init_distributed: the launcher's
    variables, mpirun, or a plain process as a world of one), torn down at exit."""
    import torch.distributed as tdist

    from prelora_ds.distributed import collectives
    from prelora_ds.distributed.launch import init_distributed

    if tdist.is_available() and tdist.is_initialized():
        return collectives.rank(), int(os.environ["LOCAL_RANK"]), collectives.world_size()
    return init_distributed(timeout_s)  # which also destroys the groups at exit


def synthetic_trainer(
    out_dir: Path,
    *,
    model: str = "vit_tiny_patch16_224",
    model_kwargs: dict[str, Any] | None = None,
    img_size: int = 16,
    ds_config: str | os.PathLike | dict = "ds_configs/cpu_zero2_bf16.json",
    ds_changes: dict[str, Any] | None = None,
    micro_batch: int = 4,
    global_batch: int | None = None,
    train_size: int = 64,
    val_size: int = 16,
    num_classes: int = 10,
    first_phase: str = "full",
    start_ranks: dict[str, int] | None = None,
    resume: bool = False,
    num_threads: int | None = None,
    **sections: dict[str, Any],
) -> Trainer:
    """The package's Trainer writing to `out_dir`, on `model` and synthetic `img_size` px images, after starting
    the process group (once per process; `trainer.rank`, `trainer.world`).

    `model_kwargs`: timm kwargs (None: `tiny_vit(img_size)`). `ds_config`: a file (relative: in the checkout) or a
    dict; `ds_changes` replace its top-level keys (None removes one); `micro_batch`: the micro batch per rank;
    `global_batch`: train_batch_size with the accumulation derived (a resume on another world size).
    `train_size`/`val_size`/`num_classes`: the synthetic data set. `first_phase`/`start_ranks`: a phase's structure
    built directly (benchmarks). `num_threads`: torch's intra-op threads (None: left as they are). `sections`
    replace whole recipe sections (train: epochs 1, seed 0, no LR warmup unless given)."""
    import torch

    from prelora_ds.config.deepspeed import load_ds_config, prepare_ds_config
    from prelora_ds.config.recipe import build_config
    from prelora_ds.data.datasets import build_datasets
    from prelora_ds.training.trainer import Trainer

    rank, _, world = start_distributed()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    cfg = build_config({
        "data": {"dataset": "synthetic", "synthetic_train_size": train_size, "synthetic_val_size": val_size,
                 "synthetic_num_classes": num_classes, "num_workers": 0, "mixup": 0.0, "cutmix": 0.0},
        "model": {"name": model, "kwargs": tiny_vit(img_size) if model_kwargs is None else model_kwargs},
        "train": {"epochs": 1, "seed": 0, "lr_warmup_steps": 0},
        **sections,
    })  # fmt: skip
    ds = dict(ds_config) if isinstance(ds_config, dict) else load_ds_config(REPO / ds_config)
    for key, value in (ds_changes or {}).items():
        if value is None:
            ds.pop(key, None)
        else:
            ds[key] = value
    ds["train_micro_batch_size_per_gpu"] = micro_batch
    if global_batch is not None:
        ds.pop("gradient_accumulation_steps", None)
        ds["train_batch_size"] = global_batch
    ds = prepare_ds_config(ds, world)
    data = build_datasets(cfg.data, img_size, 3, seed=0)
    return Trainer(cfg, ds, data, Path(out_dir), rank, world, resume=resume, first_phase=first_phase,
                   start_ranks=start_ranks)  # fmt: skip


def fixed_batch(n: int = 8, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` random 16 px images and labels of 10 classes, the same on every rank and in every run."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 16, 16, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def fixed_batch_loss(trainer: Trainer, images: torch.Tensor, targets: torch.Tensor) -> float:
    """The model's cross-entropy on a batch, in eval mode (no dropout, no update)."""
    import torch

    engine = trainer.engine
    engine.eval()
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(engine(images.to(trainer.phases.dtype)).float(), targets)
    engine.train()
    return float(loss)
