"""DeepSpeed's own JSON config: loaded, checked and completed before any process group starts.

DeepSpeed silently ignores `"auto"` inside sub-configs (it is a HF Trainer convention), and a
batch triple that does not multiply out fails late with an assert. Both are caught here.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prelora_ds.errors import ConfigError

if TYPE_CHECKING:
    import torch

BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def load_ds_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"DeepSpeed config {path} does not exist; pass --deepspeed_config with a file from ds_configs/."
        )
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"DeepSpeed config {path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
            "DeepSpeed configs are strict JSON: no comments, no trailing commas."
        ) from exc
    if not isinstance(cfg, dict):
        raise ConfigError(f"DeepSpeed config {path} must be a JSON object, got {type(cfg).__name__}.")
    return cfg


def _find_auto(node: Any, where: str = "") -> list[str]:
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _find_auto(v, f"{where}.{k}" if where else k)]
    if isinstance(node, list):
        return [p for i, v in enumerate(node) for p in _find_auto(v, f"{where}[{i}]")]
    return [where] if node == "auto" else []


def resolve_batch(cfg: dict[str, Any], world_size: int) -> tuple[int, int, int]:
    """(global, micro, accumulation) with micro x accumulation x world == global, or a ConfigError."""
    given = {k: cfg.get(k) for k in BATCH_KEYS if cfg.get(k) not in (None, "auto")}
    for key, value in given.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"DeepSpeed {key}={value!r} must be a positive integer.")
    glob, micro, accum = (given.get(k) for k in BATCH_KEYS)
    if micro is None and glob is None:
        raise ConfigError(
            "the DeepSpeed config sets neither train_micro_batch_size_per_gpu nor train_batch_size; "
            "set train_micro_batch_size_per_gpu (images per rank per forward pass)."
        )
    if micro is not None and accum is None and glob is None:
        accum = 1
    if glob is None:
        glob = micro * accum * world_size
    elif micro is None:
        accum = accum or 1
        if glob % (accum * world_size):
            raise ConfigError(
                f"train_batch_size={glob} is not divisible by gradient_accumulation_steps={accum} x "
                f"world size {world_size}; pick a train_batch_size that is a multiple of {accum * world_size}"
                f"{_fitting_worlds(glob, accum)}."
            )
        micro = glob // (accum * world_size)
    elif accum is None:
        if glob % (micro * world_size):
            raise ConfigError(
                f"train_batch_size={glob} is not divisible by train_micro_batch_size_per_gpu={micro} x "
                f"world size {world_size}; use a multiple of {micro * world_size}, or set "
                f"gradient_accumulation_steps explicitly{_fitting_worlds(glob, micro)}."
            )
        accum = glob // (micro * world_size)
    if micro * accum * world_size != glob:
        raise ConfigError(
            f"batch arithmetic does not hold: train_micro_batch_size_per_gpu={micro} x "
            f"gradient_accumulation_steps={accum} x world size {world_size} = {micro * accum * world_size}, "
            f"but train_batch_size={glob}. Set train_batch_size to {micro * accum * world_size}, or remove it "
            "and let it be derived."
        )
    return glob, micro, accum


def _keeping(glob: int, other: int, upto: int) -> list[int]:
    """The n <= `upto` with n x `other` dividing `glob`: the world sizes that keep a global batch when each rank takes
    a multiple of `other` images, or the micro batches that keep it on `other` ranks."""
    return [n for n in range(1, upto + 1) if glob % (other * n) == 0]


def _fitting_worlds(glob: int, per_rank: int, upto: int = 1024) -> str:
    """The world sizes (up to `upto`) that keep `glob` images a step when each rank takes a multiple of `per_rank`
    (an elastic run resumes on whichever of them the agent forms)."""
    worlds = _keeping(glob, per_rank, upto)
    return f" (train_batch_size={glob} is kept on {', '.join(map(str, worlds))} rank(s))" if worlds else ""


def prepare_ds_config(cfg: dict[str, Any], world_size: int) -> dict[str, Any]:
    """A copy with the batch triple resolved and every `"auto"` rejected (after the batch keys)."""
    cfg = copy.deepcopy(cfg)
    glob, micro, accum = resolve_batch(cfg, world_size)
    cfg.update(train_batch_size=glob, train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=accum)
    autos = _find_auto(cfg)
    if autos:
        raise ConfigError(
            f'DeepSpeed config has "auto" at {", ".join(autos)}; raw DeepSpeed ignores "auto" (a HF Trainer '
            "convention) and would run with its own defaults. Write explicit values."
        )
    if "scheduler" in cfg:
        raise ConfigError(
            'the DeepSpeed config has a "scheduler" section; prelora_ds drives the LR as a function of the '
            "global step so it survives engine rebuilds. Remove it and set train.lr_warmup_steps / "
            "train.min_lr in the recipe (peak LR = optimizer.params.lr)."
        )
    opt = cfg.get("optimizer")
    if not isinstance(opt, dict) or not isinstance(opt.get("params"), dict) or "lr" not in opt["params"]:
        raise ConfigError(
            'the DeepSpeed config needs an "optimizer" section with params.lr (the peak LR), e.g. '
            '{"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.05, "torch_adam": true}}.'
        )
    if "gradient_clipping" not in cfg:
        raise ConfigError(
            "the DeepSpeed config does not set gradient_clipping; its default changed to 1.0 in DeepSpeed "
            "0.19.3. Set it explicitly (0 disables clipping)."
        )
    if (cfg.get("fp16") or {}).get("enabled") and (cfg.get("bf16") or {}).get("enabled"):
        raise ConfigError("the DeepSpeed config enables both fp16 and bf16; enable one.")
    if (cfg.get("bf16") or {}).get("check_grad_overflow") is False:
        raise ConfigError(
            "bf16.check_grad_overflow=false lets a non-finite gradient into the weights; prelora_ds relies on "
            "DeepSpeed skipping such steps (counted, and the run stops after train.max_bad_steps in a row). "
            "Remove the key."
        )
    zero = cfg.get("zero_optimization") or {}
    if zero.get("compute_grad_norm") is False:
        raise ConfigError(
            "zero_optimization.compute_grad_norm=false hides non-finite gradients from DeepSpeed's step skip; "
            "remove the key."
        )
    _check_zero(cfg, zero)
    return cfg


def phase_ds_config(base: dict[str, Any], settings: dict[str, Any], world_size: int, phase: str) -> dict[str, Any]:
    """The DeepSpeed config of `phase`'s engine: `base` (prepared for `world_size`) with the phase's settings
    (`EngineConfig.settings`), checked by the same rules. The global batch is kept: a new micro batch derives the
    accumulation, and one that cannot keep the global batch is a ConfigError naming the micro batches that can."""
    cfg = copy.deepcopy(base)
    zero = dict(cfg.get("zero_optimization") or {})
    if "zero_stage" in settings:
        zero["stage"] = settings["zero_stage"]
        if zero["stage"] != 3:  # parameters whole: nothing to offload or prefetch per parameter
            zero.pop("offload_param", None)
            for key in [k for k in zero if k.startswith("stage3_")]:
                zero.pop(key)
    if "offload_optimizer" in settings:
        if settings["offload_optimizer"]:
            zero["offload_optimizer"] = zero.get("offload_optimizer") or {"device": "cpu", "pin_memory": True}
            cfg.setdefault("zero_force_ds_cpu_optimizer", False)  # the recipe's torch AdamW, as offload tests use
        else:
            zero.pop("offload_optimizer", None)
    cfg["zero_optimization"] = zero
    if "micro_batch" in settings:
        glob, micro = base["train_batch_size"], settings["micro_batch"]
        if glob % (micro * world_size):
            fits = _keeping(glob, world_size, glob // world_size)
            raise ConfigError(
                f"engine.{phase}.micro_batch={micro} cannot keep train_batch_size={glob} on {world_size} rank(s) "
                f"(micro batch x accumulation x ranks must be {glob}); micro batches that keep it: "
                f"{', '.join(map(str, fits))}."
            )
        cfg.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=glob // (micro * world_size))
    try:
        return prepare_ds_config(cfg, world_size)
    except ConfigError as exc:
        raise ConfigError(f"engine.{phase}: {exc}") from exc


def phase_configs(base: dict[str, Any], engine, world_size: int) -> dict[str, dict[str, Any]]:
    """Every phase's DeepSpeed config (`engine`: the recipe's EngineConfig); ConfigError for the first that cannot
    run. `full` is `base`."""
    configs = {"full": base}
    for phase in ("relora", "warmup", "lora"):
        settings = {k: v for k, v in engine.settings(phase).items() if k != "activation_checkpointing"}
        configs[phase] = phase_ds_config(base, settings, world_size, phase) if settings else base
    return configs


def engine_record(cfg: dict[str, Any], activation_checkpointing: bool) -> dict[str, Any]:
    """What a checkpoint records of the engine that wrote it (and a resume compares: `storage.layout_mismatch`)."""
    zero = cfg.get("zero_optimization") or {}
    offload = (zero.get("offload_optimizer") or {}).get("device", "none") not in ("none", None)
    return {"zero_stage": zero.get("stage", 0), "offload_optimizer": offload,
            "micro_batch": cfg["train_micro_batch_size_per_gpu"], "activation_checkpointing": activation_checkpointing}


def _check_zero(cfg: dict[str, Any], zero: dict[str, Any]) -> None:
    """ZeRO settings the PreLoRA cycle cannot run with (the switch must carry exact fp32 masters)."""
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"zero_optimization.stage={stage!r}: DeepSpeed has stages 0, 1, 2 and 3; write one of them.")
    if stage == 0 and (cfg.get("fp16") or {}).get("enabled"):
        raise ConfigError(
            "fp16 with zero_optimization.stage 0 keeps no fp32 masters the engine switch can read, so every switch "
            "would round the weights to fp16; use stage 1, 2 or 3 (or bf16, whose optimizer keeps them)."
        )
    if zero.get("offload_param") and stage != 3:
        raise ConfigError(
            f"zero_optimization.offload_param needs stage 3 (the parameters must be partitioned to be offloaded), "
            f"but stage is {stage}; set stage 3 or offload the optimizer only (offload_optimizer)."
        )
    if zero.get("zero_quantized_weights") or zero.get("zero_quantized_nontrainable_weights"):
        raise ConfigError(
            "ZeRO++ quantized weights (zero_quantized_weights / zero_quantized_nontrainable_weights) gather "
            "rounded copies: the norm statistics, the switch and the export need exact values. Remove the keys."
        )


def peak_lr(cfg: dict[str, Any]) -> float:
    return float(cfg["optimizer"]["params"]["lr"])


def weight_decay(cfg: dict[str, Any]) -> float:
    return float(cfg["optimizer"]["params"].get("weight_decay", 0.0))


def compute_dtype(cfg: dict[str, Any]) -> torch.dtype:
    """The dtype the engine holds the module in (bf16, fp16 or fp32)."""
    import torch  # this module reads JSON; torch only for the dtype object

    if any((cfg.get(k) or {}).get("enabled", False) for k in ("bf16", "bfloat16")):
        return torch.bfloat16
    return torch.float16 if (cfg.get("fp16") or {}).get("enabled", False) else torch.float32


def zero_stage(cfg: dict[str, Any]) -> int:
    return int(cfg.get("zero_optimization", {}).get("stage", 0))
