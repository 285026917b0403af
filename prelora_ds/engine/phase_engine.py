"""The DeepSpeed engine of the current phase, with what belongs to it: the frozen base's fp32 copy, the LR
scheduler and the compute dtype. A phase change is `rebuild` (the traps it avoids: `switch.py`, docs/design.md).

The fp32 copy of a frozen base exists because under bf16/fp16 DeepSpeed casts the module down and keeps
fp32 masters of trainable parameters only: without the copy a frozen base would lose its low bits at the
switch and every ReLoRA merge would round. In an fp32 engine the module already holds the exact values, so
no copy is kept (it would double the base's memory).
"""

from __future__ import annotations

import time

import torch

from prelora_ds.algorithm import policy
from prelora_ds.config.deepspeed import compute_dtype, weight_decay, zero_stage
from prelora_ds.config.sections import RunConfig
from prelora_ds.distributed import collectives
from prelora_ds.engine import moments, norms, zero
from prelora_ds.engine.model import count_params, create_model
from prelora_ds.engine.schedule import build_scheduler, set_lr
from prelora_ds.engine.switch import FP32State, build_engine, gather_fp32_state, load_fp32_state, rebuild
from prelora_ds.lora import relora
from prelora_ds.lora.inject import PHASES, build_structure, canonical_name, target_layers
from prelora_ds.lora.merge import lora_scales
from prelora_ds.lora.merge import merge_lora as merge_lora_state
from prelora_ds.metrics.monitor import reset_peak_memory


def low_precision(ds_config: dict) -> bool:
    """Whether DeepSpeed computes in bf16/fp16 (and so keeps no exact copy of frozen weights itself)."""
    return compute_dtype(ds_config) != torch.float32


class PhaseEngine:
    """Builds and rebuilds the engine for a phase; `engine` is None until `build`."""

    def __init__(self, cfg: RunConfig, ds_config: dict, num_classes: int, total_steps: int, lr_warmup_steps: int):
        self.cfg, self.ds_config, self.num_classes = cfg, ds_config, num_classes
        self.total_steps, self.lr_warmup_steps = total_steps, lr_warmup_steps
        self.wd = weight_decay(ds_config)
        self.keep_fp32 = low_precision(ds_config)
        self.engine = None
        self.scheduler = None
        self.frozen_fp32: FP32State = {}
        self.layout: norms.NormLayout | None = None
        self.phase = "full"
        self.ranks: dict[str, int] = {}
        self.built_elements: tuple[int, int] | None = None  # ZeRO-3: (elements this rank allocated, whole model)
        self.counts: dict[str, int] = {}  # name -> the Adam step count its moments carried into this engine
        self.dormant: moments.Moments = {}  # in relora: the frozen base's Adam state from `full`, for `warmup`
        self.rewarm_start: int | None = None  # the step this engine was built at by a rebuild (fresh groups ramp)

    # ----------------------------------------------------------------- build
    def make_model(self, state: FP32State | None, ds_config: dict | None = None) -> torch.nn.Module:
        """A fresh timm model with the phase's structure (and `state` loaded when given).

        With a `state`, every base weight is overwritten, so the model is allocated without timm's random
        init (meta device, then `to_empty`): seconds saved per switch on ViT-L. Under ZeRO-3 the model is
        built partitioned (`_make_partitioned`). Collective under ZeRO-3.
        """
        if zero_stage(ds_config or self.ds_config) == 3:
            return self._make_partitioned(state, ds_config or self.ds_config)
        if state is None:
            model = create_model(self.cfg.model, self.num_classes)
        else:
            with torch.device("meta"):
                model = create_model(self.cfg.model, self.num_classes, init=False)
            if any(True for _ in model.buffers()):  # buffers are not in `state`: keep timm's values
                model = create_model(self.cfg.model, self.num_classes)
            else:
                model = model.to_empty(device="cpu")
        model = self._structure(model)
        if state is not None:
            self._load(model, state)
        return model

    def _make_partitioned(self, state: FP32State | None, ds_config: dict) -> torch.nn.Module:
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
        model = self._structure(model)
        if state is not None:
            self._load(model, state)
        dtype = compute_dtype(ds_config)
        if dtype != torch.float32:
            zero.cast_unpartitioned(model, dtype)
        return model

    def _structure(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.layout is None:
            self.layout = norms.NormLayout.from_layers(target_layers(model, self.cfg.prelora.target_modules))
        return build_structure(model, PHASES[self.phase], self.ranks or None, self.cfg.prelora)

    @staticmethod
    def _load(model: torch.nn.Module, state: FP32State) -> None:
        missing = [k for k in load_fp32_state(model, state) if ".lora_" not in k]
        if missing:
            raise RuntimeError(f"the carried state has no value for {missing[:5]}")

    def build(self, phase: str, ranks: dict[str, int] | None, step: int, ds_config: dict | None = None,
              keep_frozen: bool = True, saved: dict | None = None) -> None:
        """An engine on a freshly initialised model of `phase` (a new run, or before a resume loads its
        checkpoint); the same initial weights on every rank and in every run. `ds_config`: this engine only;
        `keep_frozen`: keep the fp32 copy of a frozen base (not before a resume: the checkpoint has one);
        `saved`: the checkpoint's `state_dict()`, whose optimizer group layout the engine must have to load it."""
        self.phase, self.ranks = phase, dict(ranks or {})
        saved = saved or {}
        self.counts, self.rewarm_start = dict(saved.get("adam_counts", {})), saved.get("rewarm_start")
        torch.manual_seed(self.cfg.train.seed)
        model = self.make_model(None, ds_config)
        self.frozen_fp32 = {  # under ZeRO-3 gathered from the partitions (collective): the values the module holds
            canonical_name(n): zero.full_value(p)
            for n, p in model.named_parameters()
            if not p.requires_grad and self.keep_fp32 and keep_frozen
        }
        self.engine = build_engine(model, ds_config or self.ds_config, self.wd, self.counts)
        self._attach_scheduler(step)

    def rebuild(self, phase: str, ranks: dict[str, int] | None, step: int, merge_lora: bool = False) -> float:
        """Switch to `phase` in-process (fp32 masters carried exactly); returns the seconds it took.

        `merge_lora`: fold the current LoRA deltas into the base (in fp32) first, for a new rank layout."""
        t0 = time.perf_counter()
        scales = lora_scales(self.engine.module) if merge_lora else {}
        self.phase = phase
        if ranks is not None:
            self.ranks = dict(ranks)
        old, self.engine = self.engine, None
        self.engine, frozen, self.counts, left = rebuild(
            old,
            self.frozen_fp32,
            self.make_model,
            self.ds_config,
            self.wd,
            transform=(lambda state: merge_lora_state(state, scales)) if merge_lora else None,
            carry_moments=self.cfg.prelora.switch_optimizer == "carry",
            dormant=self.dormant,
        )
        # `relora` freezes the base until `warmup`: keep its moments for then (measured best, docs/study.md)
        self.dormant = left if phase == "relora" else {}
        self.rewarm_start = step
        del old
        self.frozen_fp32 = frozen if self.keep_fp32 else {}
        reset_peak_memory()  # each phase's peak is its own (the rebuild's transient peak counts in neither)
        self._attach_scheduler(step)
        return time.perf_counter() - t0

    def state_dict(self) -> dict:
        """The engine's layout a resume must rebuild (saved in trainer_state.json): the Adam step count each
        carried parameter brought in (its parameter group), and the step of the rebuild that built it."""
        return {"adam_counts": self.counts, "rewarm_start": self.rewarm_start,
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
        at this engine's rebuild ramp up over `prelora.switch_rewarmup_steps`. Returns the schedule's value."""
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
            self.engine.destroy()
            self.engine = None

