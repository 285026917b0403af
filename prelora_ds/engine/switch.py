"""Engine build and the in-process engine switch (docs/design.md §4).

Three traps this module exists for:
- Under bf16, `deepspeed.initialize` casts the module to bf16 and builds the fp32 masters from the
  rounded weights. So the masters are read out of the old ZeRO optimizer before it is destroyed
  (`safe_get_full_fp32_param`) and written into the new one afterwards (`safe_set_full_fp32_param`).
- Handing the old `engine.module` to a new engine keeps the old engine and its optimizer alive
  through module hooks (about 1.1 GiB per rebuild on ViT-B). So every rebuild builds a fresh timm
  model and loads the fp32 state into it.
- A new optimizer forgets: every weight that trains on would restart Adam from zero moments. So the moments of
  each such parameter are carried with their step counts (`moments.py`), unless the recipe asks for a reset.
"""

from __future__ import annotations

import ctypes
import gc
import sys
from collections.abc import Callable

import deepspeed
import torch

from prelora_ds.engine import moments, zero
from prelora_ds.lora.inject import canonical_name

FP32State = dict[str, torch.Tensor]


def build_engine(model: torch.nn.Module, ds_config: dict, weight_decay: float, counts: dict[str, int] | None = None):
    """A DeepSpeed engine whose optimizer holds exactly the model's trainable parameters, in weight-decay groups
    split by the Adam step count each parameter carries in (`counts`, name -> count; none: one fresh history)."""
    groups = moments.param_groups(model, weight_decay, counts)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config)
    return engine


def gather_fp32_state(engine, frozen_fp32: FP32State) -> FP32State:
    """Every parameter's fp32 value on CPU, by canonical name. Collective: all ranks call it.

    Trainable parameters come from the ZeRO fp32 masters (all-gathered from the partitions);
    frozen ones from `frozen_fp32`, the masters kept when they were frozen (the engine holds bf16).
    """
    state: FP32State = {}
    for name, p in engine.module.named_parameters():
        key = canonical_name(name)
        state[key] = frozen_fp32[key] if not p.requires_grad and key in frozen_fp32 else zero.full_value(p)
    return state


def load_fp32_state(model: torch.nn.Module, state: FP32State) -> list[str]:
    """Copy `state` into a model's parameters (a fresh one, or an engine's module: partitioned under ZeRO-3, then
    collective); returns the canonical names it had no value for."""
    missing = []
    for name, p in model.named_parameters():
        key = canonical_name(name)
        if key in state:
            zero.write_module_value(p, state[key])
        else:
            missing.append(key)
    return missing


def write_fp32_masters(engine, state: FP32State) -> None:
    """Overwrite the new engine's fp32 masters (and its low-precision copies) with exact fp32 values."""
    for name, p in engine.module.named_parameters():
        key = canonical_name(name)
        if p.requires_grad and key in state:
            zero.write_master(p, state[key])


def frozen_fp32_of(engine, state: FP32State) -> FP32State:
    """The fp32 values of the engine's frozen parameters (kept on CPU: the engine has only bf16)."""
    return {
        canonical_name(n): state[canonical_name(n)]
        for n, p in engine.module.named_parameters()
        if not p.requires_grad and canonical_name(n) in state
    }


def release(engine) -> None:
    """Destroy an engine and drop what it holds so its memory can be returned."""
    engine.destroy()
    for attr in ("optimizer", "module", "lr_scheduler", "training_dataloader"):
        if hasattr(engine, attr):
            try:
                setattr(engine, attr, None)
            except (AttributeError, TypeError):
                pass
    del engine
    return_freed_memory()


def return_freed_memory() -> None:
    """Collect garbage and hand freed memory back (CUDA cache; glibc heap, which otherwise keeps the
    freed engine's pages and makes RSS creep up by fragmentation although nothing leaks)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (e.g. musl)
            pass


def rebuild(
    old_engine,
    frozen_fp32: FP32State,
    make_model: Callable[[FP32State], torch.nn.Module],
    ds_config: dict,
    weight_decay: float,
    transform: Callable[[FP32State], FP32State] | None = None,
    carry_moments: bool = True,
    dormant: moments.Moments | None = None,
):
    """Switch engines in-process: masters and Adam moments out, old engine destroyed, fresh model, new engine,
    masters and moments in.

    `transform(state)` may rewrite the gathered fp32 state first (e.g. merge LoRA deltas into the base);
    `make_model(state)` builds the new phase's structure on a fresh model with `state` loaded. Moments travel
    for the parameters whose value travels unchanged in shape (so not for LoRA factors a merge folded away);
    `carry_moments=False` gives the new engine a fresh optimizer (the paper's and the authors' behaviour).
    `dormant`: moments of parameters the old engine did not train, to take up again (the base after `relora`).
    Returns (new_engine, new_frozen_fp32, counts, left): counts = name -> the Adam step count each carried
    parameter brought into the new engine (its group layout); left = the old engine's moments of parameters the
    new one does not train.
    """
    state = gather_fp32_state(old_engine, frozen_fp32)
    gathered = moments.gather(old_engine) if carry_moments else {}
    carried = {**(dormant or {}), **gathered}
    if transform is not None:
        state = transform(state)
    carried = {n: m for n, m in carried.items() if n in state and state[n].shape == next(iter(m[1].values())).shape}
    release(old_engine)
    model = make_model(state)
    counts = {n: c for n, (c, _) in carried.items()}
    engine = build_engine(model, ds_config, weight_decay, counts)
    if engine.bfloat16_enabled() or engine.fp16_enabled():  # in fp32 the masters were built from exact values
        write_fp32_masters(engine, state)
    written = moments.write(engine, carried)
    frozen = frozen_fp32_of(engine, state)
    left = {n: m for n, m in gathered.items() if n not in written}
    del model, carried
    return_freed_memory()
    return engine, frozen, {n: counts[n] for n in written}, left
