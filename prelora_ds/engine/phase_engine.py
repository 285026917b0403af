"""The DeepSpeed engine of the current phase, with what belongs to it: the frozen base's fp32 copy, the LR
scheduler and the compute dtype. A phase change is `PhaseEngine.rebuild`, in the same process (docs/design.md §4).

Three traps the rebuild exists for:
- Under bf16, `deepspeed.initialize` casts the module to bf16 and builds the fp32 masters from the rounded
  weights. So the masters are read out of the old ZeRO optimizer before it is destroyed
  (`safe_get_full_fp32_param`) and written into the new one afterwards (`safe_set_full_fp32_param`).
- Handing the old `engine.module` to a new engine keeps the old engine and its optimizer alive through module
  hooks (about 1.1 GiB per rebuild on ViT-B). So every rebuild builds a fresh timm model and loads the fp32
  state into it.
- A new optimizer forgets: every weight that trains on would restart Adam from zero moments. So the moments of
  each such parameter are carried with their step counts (`moments.py`), unless the recipe asks for a reset.

The fp32 copy of a frozen base exists because under bf16/fp16 DeepSpeed casts the module down and keeps
fp32 masters of trainable parameters only: without the copy a frozen base would lose its low bits at the
switch and every ReLoRA merge would round. In an fp32 engine the module already holds the exact values, so
no copy is kept (it would double the base's memory).
"""

from __future__ import annotations

import ctypes
import gc
import sys
import time

import deepspeed
import torch

from prelora_ds.algorithm import policy
from prelora_ds.algorithm.ranks import module_bounds
from prelora_ds.config.deepspeed import compute_dtype, weight_decay, zero_stage
from prelora_ds.config.sections import RunConfig
from prelora_ds.distributed import collectives
from prelora_ds.engine import moments, norms, stream, zero
from prelora_ds.engine.model import count_params, create_model
from prelora_ds.engine.schedule import build_scheduler, set_lr
from prelora_ds.log import logger
from prelora_ds.lora import relora
from prelora_ds.lora.inject import PHASES, build_structure, canonical_name, target_layers, trains
from prelora_ds.lora.merge import lora_scales
from prelora_ds.testing import faults

FP32State = dict[str, torch.Tensor]


def build_engine(model: torch.nn.Module, ds_config: dict, weight_decay: float, counts: dict[str, int] | None = None,
                 revived: frozenset[str] = frozenset(), revived_lr_scale: float = 1.0):  # fmt: skip
    """A DeepSpeed engine whose optimizer holds exactly the model's trainable parameters, in weight-decay groups
    split by the Adam step count each parameter carries in (`counts`, name -> count; none: one fresh history) and
    by whether it is `revived` (its groups' LR scaled by `revived_lr_scale`)."""
    groups = moments.param_groups(model, weight_decay, counts, revived, revived_lr_scale)
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


def gather_sharded(engine, frozen_fp32: FP32State, world: int, rank: int) -> stream.ShardedState:
    """`gather_fp32_state` streamed: each value kept by its owner rank only (`stream.owners`), so the ranks hold
    one fp32 copy of the model between them. Collective: all ranks call it."""
    shapes = {canonical_name(n): zero.shape(p) for n, p in engine.module.named_parameters()}
    state = stream.ShardedState.for_names(shapes, world, rank)
    for name, p in engine.module.named_parameters():
        key = canonical_name(name)
        if not p.requires_grad and key in frozen_fp32:
            state.keep(key, frozen_fp32[key])  # every rank has the kept copy
        elif p.requires_grad or zero.is_zero3(p) or state.mine(key):  # a master or a partition: collective
            state.keep(key, zero.full_value(p))
    return state


def load_streamed(model: torch.nn.Module, state: stream.ShardedState, keep_frozen: bool) -> tuple[list[str], FP32State]:
    """Write `state` into a model's parameters one at a time, each taken from its owner (partitioned under ZeRO-3,
    then the owner's value is re-cut into the partitions). Returns the canonical names it had no value for, and
    (`keep_frozen`) the fp32 values of the frozen parameters, which every rank keeps. Collective."""
    missing, frozen = [], {}
    for name, p in model.named_parameters():
        key = canonical_name(name)
        if key not in state:
            missing.append(key)
            continue
        keep = keep_frozen and not p.requires_grad  # every rank needs the whole value
        if zero.is_zero3(p) and state.src(key) is not None and not keep:
            zero.write_module_value(p, state.local.get(key), src=state.src(key))  # the owner's value, re-cut
            continue
        value = state.value(key)
        zero.write_module_value(p, value)
        if keep:
            frozen[key] = value.cpu()
    return missing, frozen


def write_fp32_masters(engine, state: stream.ShardedState) -> None:
    """Overwrite the new engine's fp32 masters (and its low-precision copies) with exact fp32 values. Collective."""
    for name, p in engine.module.named_parameters():
        key = canonical_name(name)
        if p.requires_grad and key in state:
            zero.write_master(p, state.value(key))


def release(engine) -> None:
    """Destroy an engine and drop what it holds so its memory can be returned."""
    engine.destroy()
    zero.forget_engine(getattr(engine, "module", None))
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


def low_precision(ds_config: dict) -> bool:
    """Whether DeepSpeed computes in bf16/fp16 (and so keeps no exact copy of frozen weights itself)."""
    return compute_dtype(ds_config) != torch.float32


class PhaseEngine:
    """Builds and rebuilds the engine for a phase; `engine` is None until `build`."""

    def __init__(self, cfg: RunConfig, ds_config: dict, num_classes: int, total_steps: int, lr_warmup_steps: int,
                 configs: dict[str, dict] | None = None, warmup_phase_steps: int = 0):  # fmt: skip
        """`configs`: each phase's DeepSpeed config (`config.deepspeed.phase_configs`); `ds_config` for every phase
        when not given. `warmup_phase_steps`: the length of `warmup` in steps (`relora.warmup_base_lr_ramp`)."""
        self.cfg, self.ds_config, self.num_classes = cfg, ds_config, num_classes
        self.configs = configs or dict.fromkeys(PHASES, ds_config)
        self.total_steps, self.lr_warmup_steps = total_steps, lr_warmup_steps
        self.warmup_phase_steps = warmup_phase_steps
        self.wd = weight_decay(ds_config)
        self.keep_fp32 = low_precision(ds_config)
        self.engine = None
        self.built_config: dict = self.configs["full"]  # the DeepSpeed config of `engine`
        self.scheduler = None
        self.frozen_fp32: FP32State = {}
        self.layout: norms.NormLayout | None = None
        self.rank_bounds: dict[str, tuple[int, int]] = {}  # module key -> Algorithm 2's (r_min, r_max) for it
        self.built_elements: tuple[int, int] | None = None  # ZeRO-3: (elements this rank allocated, whole model)
        self.counts: dict[str, int] = {}  # name -> the Adam step count its moments carried into this engine
        self.dormant: moments.Moments = {}  # in relora: the frozen base's Adam state from `full`, for `warmup`
        self.rewarm_start: int | None = None  # the step this engine was built at by a rebuild (fresh groups ramp)
        self.revived: frozenset[str] = frozenset()  # trainable here, frozen in the phase before (relora's base)

    # ----------------------------------------------------------------- build
    def make_model(self, state: FP32State | stream.ShardedState | None, phase: str, ranks: dict[str, int] | None,
                   ds_config: dict | None = None, frozen: FP32State | None = None) -> torch.nn.Module:  # fmt: skip
        """A fresh timm model with the structure of `phase` (LoRA of `ranks`), `state` loaded when given (a whole
        state every rank holds, or one streamed from its owners); `frozen` receives the fp32 values of the
        parameters the phase freezes, where the engine keeps a copy of them (bf16/fp16).

        With a `state`, every base weight is overwritten, so the model is allocated without timm's random
        init (meta device, then `to_empty`): seconds saved per switch on ViT-L. Under ZeRO-3 the model is
        built partitioned (`_make_partitioned`). Collective under ZeRO-3.
        """
        ds_config = ds_config or self.configs[phase]
        if zero_stage(ds_config) == 3:
            return self._make_partitioned(state, phase, ranks, ds_config, frozen)
        if state is None:
            model = create_model(self.cfg.model, self.num_classes)
        else:
            with torch.device("meta"):
                model = create_model(self.cfg.model, self.num_classes, init=False)
            if any(True for _ in model.buffers()):  # buffers are not in `state`: keep timm's values
                model = create_model(self.cfg.model, self.num_classes)
            else:
                model = model.to_empty(device="cpu")
        model = self._structure(model, phase, ranks)
        if state is not None:
            self._load(model, state, frozen)
        return model

    def _make_partitioned(self, state: FP32State | stream.ShardedState | None, phase: str,
                          ranks: dict[str, int] | None, ds_config: dict,
                          frozen: FP32State | None) -> torch.nn.Module:  # fmt: skip
        """ZeRO-3: the model is built under `deepspeed.zero.Init`, so a rank allocates its partitions only (each
        rank building the whole model first, as ZeRO-1/2 do, costs a whole model per rank: ViT-H/14 did not fit).

        timm's init cannot run on partitions, so for a new run rank 0 alone draws the whole model exactly as a
        ZeRO-1/2 run does (the same seed, the same weights), its values are written into the partitions one
        gathered parameter at a time, and every rank continues from rank 0's random state: the run is the same
        as under ZeRO-2. A rebuild writes `state` (the gathered fp32 values every rank holds) instead.
        """
        initial = None
        if state is None and collectives.rank() == 0:
            initial = dict(create_model(self.cfg.model, self.num_classes).named_parameters())
        with zero.partitioned_build(ds_config):
            model = create_model(self.cfg.model, self.num_classes, init=False)
        if state is None:
            collectives.broadcast_rng_state()  # rank 0 drew the weights: the LoRA factors come next, as under ZeRO-2
            zero.write_from_rank0(model, initial)
            del initial
        self.built_elements = zero.local_elements(model)  # before PEFT's factors, which the engine partitions
        model = self._structure(model, phase, ranks)
        if state is not None:
            self._load(model, state, frozen)
        dtype = compute_dtype(ds_config)
        if dtype != torch.float32:
            zero.cast_unpartitioned(model, dtype)
        return model

    def _structure(self, model: torch.nn.Module, phase: str, ranks: dict[str, int] | None) -> torch.nn.Module:
        if self.layout is None:
            self.layout = norms.NormLayout.from_layers(target_layers(model, self.cfg.prelora.target_modules))
            widths = {m: min(min(model.get_submodule(n).in_features, model.get_submodule(n).out_features)
                             for n in names) for m, names in self.layout.modules.items()}  # fmt: skip
            p = self.cfg.prelora
            self.rank_bounds = module_bounds(p.r_min, p.r_max, widths, p.rank_reference_width)
        # recompute block activations in the backward where the phase needs the memory (timm's own switch)
        model.set_grad_checkpointing(self.cfg.engine.settings(phase)["activation_checkpointing"])
        return build_structure(model, PHASES[phase], ranks or None, self.cfg.prelora)

    def _load(self, model: torch.nn.Module, state: FP32State | stream.ShardedState,
              frozen: FP32State | None) -> None:  # fmt: skip
        if not isinstance(state, stream.ShardedState):
            state = stream.ShardedState.replicated(state)
        missing, kept = load_streamed(model, state, self.keep_fp32 and frozen is not None)
        missing = [k for k in missing if ".lora_" not in k]
        if missing:
            raise RuntimeError(f"the carried state has no value for {missing[:5]}")
        if frozen is not None:
            frozen.update(kept)

    def build(self, phase: str, ranks: dict[str, int] | None, step: int, checkpoint: dict | None = None,
              keep_frozen: bool = True, saved: dict | None = None) -> None:
        """An engine on a freshly initialised model of `phase` (a new run, or before a resume loads its
        checkpoint), on the phase's DeepSpeed config; the same initial weights on every rank and in every run.
        `checkpoint`: the config's "checkpoint" section for this engine only (a universal load);
        `keep_frozen`: keep the fp32 copy of a frozen base (not before a resume: the checkpoint has one);
        `saved`: the checkpoint's `state_dict()`, whose optimizer group layout the engine must have to load it."""
        saved = saved or {}
        self.counts, self.rewarm_start = dict(saved.get("adam_counts", {})), saved.get("rewarm_start")
        self.revived = frozenset(saved.get("revived", ()))
        ds_config = {**self.configs[phase], "checkpoint": checkpoint} if checkpoint else self.configs[phase]
        torch.manual_seed(self.cfg.train.seed)
        model = self.make_model(None, phase, ranks, ds_config)
        self.frozen_fp32 = {  # under ZeRO-3 gathered from the partitions (collective): the values the module holds
            canonical_name(n): zero.full_value(p)
            for n, p in model.named_parameters()
            if not p.requires_grad and self.keep_fp32 and keep_frozen
        }
        self.engine = build_engine(model, ds_config, self.wd, self.counts, self.revived, self.revived_lr_scale(step))
        self.built_config = self.configs[phase]
        self._attach_scheduler(step)

    def rebuild(self, phase: str, ranks: dict[str, int] | None, step: int, merge_lora: bool = False) -> float:
        """Switch to `phase` in-process (fp32 masters carried exactly); returns the seconds it took.

        `merge_lora`: fold the current LoRA deltas into the base (in fp32) first, for a new rank layout."""
        t0 = time.perf_counter()
        scales = lora_scales(self.engine.module) if merge_lora else {}
        old, self.engine = self.engine, None
        self.scheduler = None  # timm's scheduler holds the old optimizer: it would outlive return_freed_memory()
        rank, world = collectives.rank(), collectives.world_size()
        carry = self.cfg.prelora.switch_optimizer == "carry"  # `reset`: a fresh optimizer, the paper's behaviour
        spec = PHASES[phase]
        # the moments the new engine takes: every weight's when the base trains on (or, into `relora`, is kept for
        # `warmup`), else those of the LoRA factors and `prelora.trainable_extra` only
        keep = None if spec.base_trainable or phase == "relora" else \
            (lambda name: trains(name, spec, self.cfg.prelora.trainable_extra))
        # Streamed (stream.py): each value and moment is kept by its owner rank only, so no rank holds a second whole
        # fp32 copy of the model. Into `relora` the base's moments stay whole on every rank until `warmup`
        # (`dormant`, which a checkpoint saves from rank 0).
        owner = stream.owners({canonical_name(n): zero.numel(p) for n, p in old.module.named_parameters()}, world)
        frozen_before = {canonical_name(n) for n, p in old.module.named_parameters() if not p.requires_grad}
        sharded = phase != "relora"
        gathered = moments.gather(old, keep, owner if sharded else None) if carry else {}
        moments.free(old)  # the old Adam state goes before the values are gathered beside the old engine
        state = gather_sharded(old, self.frozen_fp32, world, rank)  # masters out of the old engine (collective)
        self.frozen_fp32 = {}  # the old kept base: what this rank owns of it is in `state`
        carried = {**self.dormant, **gathered}  # dormant: the base's moments kept through `relora`
        self.dormant = {}
        if merge_lora:
            state = state.merged(scales)
        # moments travel for parameters whose value travels unchanged (not LoRA factors a merge folded away)
        carried = {n: m for n, m in carried.items() if n in state}
        release(old)
        del old
        faults.in_rebuild(step, rank)  # drills: a rank lost between the old engine and the new one
        frozen: FP32State = {}
        model = self.make_model(state, phase, ranks, frozen=frozen)  # whole or partitioned, as the stage says
        counts = {n: c for n, (c, _) in carried.items()}
        # the base after `relora` (frozen through it) trains at `relora.warmup_base_lr_scale` of the schedule
        self.revived = frozenset(canonical_name(n) for n, p in model.named_parameters()
                                 if p.requires_grad and canonical_name(n) in frozen_before)  # fmt: skip
        self.rewarm_start = step
        self.engine = build_engine(model, self.configs[phase], self.wd, counts, self.revived,
                                   self.revived_lr_scale(step))
        self._log_engine_change(phase, self.built_config, self.configs[phase])
        self.built_config = self.configs[phase]
        if self.engine.bfloat16_enabled() or self.engine.fp16_enabled():  # in fp32 the masters were exact already
            write_fp32_masters(self.engine, state)
        written = moments.write(self.engine, carried, {n: owner[n] for n in gathered} if sharded else None)
        left = {n: m for n, m in gathered.items() if n not in written}  # moments the new engine does not train
        self.counts = {n: counts[n] for n in written}
        del model, carried, state
        return_freed_memory()
        # `relora` freezes the base until `warmup`: keep its moments for then (measured best, docs/study.md)
        self.dormant = left if phase == "relora" else {}
        self.frozen_fp32 = frozen if self.keep_fp32 else {}
        self._attach_scheduler(step)
        return time.perf_counter() - t0

    @staticmethod
    def _log_engine_change(phase: str, old: dict, new: dict) -> None:
        def describe(cfg: dict) -> str:
            zero = cfg.get("zero_optimization") or {}
            offload = (zero.get("offload_optimizer") or {}).get("device", "none")
            return f"ZeRO stage {zero.get('stage', 0)}, optimizer offload {offload}"

        if describe(old) != describe(new):
            logger.info(f"[{phase}] engine: {describe(old)} -> {describe(new)}")

    def state_dict(self) -> dict:
        """The engine's layout a resume must rebuild (saved in trainer_state.json): the Adam step count each
        carried parameter brought in and the revived parameters (its parameter groups), and the step of the rebuild
        that built it."""
        return {"adam_counts": self.counts, "rewarm_start": self.rewarm_start, "revived": sorted(self.revived),
                "group_steps": moments.group_steps(self.engine.optimizer)}

    def frozen_state(self, rank: int) -> FP32State:
        """The exact fp32 values of the frozen parameters, for a checkpoint (rank 0 writes them): the kept copy
        under bf16/fp16, else the module's own values. DeepSpeed's universal checkpoint (a resume on another
        world size) restores optimizer parameters only, so the frozen base must travel in this file."""
        state = {}
        for n, p in self.engine.module.named_parameters():
            key = canonical_name(n)
            if p.requires_grad or (rank != 0 and not zero.is_zero3(p)):
                continue
            value = self.frozen_fp32.get(key)  # the kept copy, or the module's (gathered under ZeRO-3: collective)
            state[key] = value if value is not None else zero.full_value(p)
        return state if rank == 0 else {}

    def after_load(self, frozen: FP32State, saved: dict, dormant: moments.Moments | None = None) -> None:
        """After a checkpoint load: the saved fp32 base replaces the module's values (rounded ones under bf16,
        freshly initialised ones after a universal load; kept beside the engine only under bf16/fp16), and each
        optimizer group gets its saved Adam step count back (`moments.restore_group_steps`)."""
        if saved.get("group_steps"):
            moments.restore_group_steps(self.engine.optimizer, saved["group_steps"])
        self.dormant = dict(dormant or {})
        if frozen:
            load_fp32_state(self.engine.module, frozen)
        self.frozen_fp32 = frozen if self.keep_fp32 else {}

    def revived_lr_scale(self, step: int) -> float:
        """The revived base's LR factor at optimizer step `step` (`policy.revived_lr_scale`)."""
        return policy.revived_lr_scale(step, self.rewarm_start, self.cfg.relora, self.warmup_phase_steps)

    def _attach_scheduler(self, step: int) -> None:
        self.scheduler = build_scheduler(self.engine.optimizer, self.total_steps, self.lr_warmup_steps,
                                         self.cfg.train.min_lr)
        set_lr(self.scheduler, step)

    # ----------------------------------------------------------------- use
    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    @property
    def dtype(self) -> torch.dtype:
        if self.engine.bfloat16_enabled():
            return torch.bfloat16
        if self.engine.fp16_enabled():
            return torch.float16
        return torch.float32

    def set_lr(self, step: int, factor: float = 1.0) -> float:
        """The schedule's LR for optimizer step `step` (times `factor`); the groups whose Adam state started fresh
        at this engine's rebuild ramp up over `prelora.switch_rewarmup_steps`; the revived base's groups take their
        factor for this step (`relora.warmup_base_lr_ramp`). Returns the schedule's value."""
        if self.revived:  # timm's scheduler multiplies each group's LR by its `lr_scale`
            scale = self.revived_lr_scale(step)
            for group in moments.revived_groups(self.engine.optimizer):
                group["lr_scale"] = scale
        lr = set_lr(self.scheduler, step, factor)
        ramp = policy.rewarmup_factor(step, self.rewarm_start, self.cfg.prelora.switch_rewarmup_steps)
        if ramp != 1.0:
            for group in moments.fresh_groups(self.engine.optimizer):
                group["lr"] *= ramp
        return lr

    def count_params(self) -> tuple[int, int]:
        return count_params(self.engine.module)

    def merge_relora(self, seed: int, merge_index: int) -> tuple[dict[str, float], float]:
        """ReLoRA's merge-and-reinitialise in place: W += s B A, fresh A, B = 0, Adam first moment pruned.
        Returns ({layer: ||s B A||}, share of first-moment entries zeroed). Collective."""
        r = self.cfg.relora
        deltas = relora.merge_and_reinit(self.engine.module, self.frozen_fp32, seed, merge_index)
        moments.link_state(self.engine.optimizer)
        pruned = relora.prune_optimizer_state(self.engine.module, r.prune_ratio, r.reset == "full")
        return deltas, pruned

    def fp32_state(self) -> FP32State:
        """Every parameter's exact fp32 value on CPU by canonical name (collective: all ranks call it)."""
        return gather_fp32_state(self.engine, self.frozen_fp32)

    def destroy(self) -> None:
        if self.engine is not None:
            engine, self.engine, self.scheduler = self.engine, None, None
            release(engine)

