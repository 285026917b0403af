"""Run recipe: typed dataclass sections (loaded from YAML and overridden as ``--section.field value`` by
``recipe.py``).

Everything PreLoRA- and training-specific lives here; DeepSpeed's own settings stay in DeepSpeed's
JSON (read and checked by ``prelora_ds/config/deepspeed.py``). Each ``__post_init__`` raises ``ConfigError`` saying
what is wrong and what to write instead, so a typo fails in the first second, before any process group starts.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from prelora_ds.errors import ConfigError

DATASETS = ("imagefolder", "digits", "synthetic", "shards")
LOADERS = ("torch", "device")


def _require(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@dataclass
class DataConfig:
    dataset: str = "digits"
    """'imagefolder' (ImageNet train/val layout under `root`), 'shards' (tar shards of an ImageFolder written by
    `prelora pack-shards`), 'digits' (scikit-learn's embedded handwritten digits: real data, no download) or
    'synthetic' (random tensors, for benchmarks)."""
    root: str | None = None
    """For imagefolder: a folder holding `train/` and `val/`, one sub-folder per class. For shards: the folder
    `prelora pack-shards` wrote (index.json and the .tar shards)."""
    loader: str = "torch"
    """'torch': decode (PIL) and augment (timm) in `num_workers` DataLoader processes per rank. 'device': the
    workers only read the encoded bytes; JPEG decode (nvJPEG) and the augmentations (torchvision v2) run on the
    rank's GPU, or on the CPU without one. imagefolder and shards only (docs/data.md)."""
    val_fraction: float = 0.2
    """For digits: share of the images held out for validation (a fixed, seeded split)."""
    synthetic_train_size: int = 1024
    synthetic_val_size: int = 256
    synthetic_num_classes: int = 1000
    num_workers: int = 2
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    """timm auto-augment policy string (RandAugment by default); null disables it."""
    hflip: float = 0.5
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    """RandomResizedCrop area range."""
    crop_pct: float = 1.0
    """Evaluation: resize the shorter side to img_size / crop_pct, then center-crop img_size (ImageNet
    convention 0.875: 256 -> 224, the paper authors' evaluation; timm's ViT configs use 0.9)."""
    mixup: float = 0.8
    cutmix: float = 1.0
    label_smoothing: float = 0.1

    def __post_init__(self) -> None:
        _require(
            self.dataset in DATASETS,
            f"data.dataset={self.dataset!r} is unknown; write one of {', '.join(DATASETS)}.",
        )
        _require(self.loader in LOADERS, f"data.loader={self.loader!r} is unknown; write one of {', '.join(LOADERS)}.")
        _require(
            self.loader == "torch" or self.dataset in ("imagefolder", "shards"),
            f"data.loader=device decodes image files, but data.dataset={self.dataset!r} holds none; use "
            "data.dataset imagefolder or shards, or data.loader torch.",
        )
        _require(0 < self.crop_pct <= 1, f"data.crop_pct must be in (0, 1], got {self.crop_pct}; 0.875 is ImageNet's.")
        _require(
            self.dataset not in ("imagefolder", "shards") or bool(self.root),
            f"data.dataset={self.dataset} needs data.root: "
            + ("the folder `prelora pack-shards` wrote (e.g. --data.root /datasets/imagenet_shards)."
               if self.dataset == "shards" else
               "a folder with train/ and val/ class folders (e.g. --data.root /datasets/imagenet)."),
        )
        _require(0.0 < self.val_fraction < 1.0, f"data.val_fraction must be in (0, 1), got {self.val_fraction}.")
        _require(self.num_workers >= 0, f"data.num_workers must be >= 0, got {self.num_workers}.")
        _require(
            len(self.scale) == 2 and 0 < self.scale[0] <= self.scale[1] <= 1,
            f"data.scale must be [min, max] with 0 < min <= max <= 1, got {self.scale}.",
        )
        for name in ("hflip", "mixup", "cutmix", "label_smoothing"):
            value = getattr(self, name)
            _require(value >= 0, f"data.{name} must be >= 0, got {value}.")
        _require(self.synthetic_num_classes >= 2, "data.synthetic_num_classes must be >= 2.")


QKV_LAYOUTS = ("fused", "split")
# The paper's six targets on `model.qkv: split` (q, k, v, output projection, fc1, fc2 of every block)
SPLIT_TARGETS = r"blocks\.\d+\.(attn\.(q_proj|k_proj|v_proj|proj)|mlp\.fc[12])"


@dataclass
class ModelConfig:
    name: str = "vit_large_patch16_224"
    """Any timm ViT (`timm.list_models('vit_*')`)."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Passed to `timm.create_model` (img_size, patch_size, depth, embed_dim, drop_path_rate, ...)."""
    qkv: str = "fused"
    """'fused': timm's one `attn.qkv` Linear. 'split': separate `attn.q_proj`, `attn.k_proj`, `attn.v_proj`
    (the paper's model; timm's own split attention), the same function; exports stay fused timm state dicts."""

    def __post_init__(self) -> None:
        _require(bool(self.name), "model.name is empty; write a timm model name such as vit_large_patch16_224.")
        _require(self.qkv in QKV_LAYOUTS, f"model.qkv={self.qkv!r} is unknown; write one of {', '.join(QKV_LAYOUTS)}.")
        _require(
            self.qkv == "fused" or "attn_layer" not in self.kwargs,
            "model.qkv=split sets timm's attn_layer itself; remove attn_layer from model.kwargs.",
        )
        _require(
            "num_classes" not in self.kwargs,
            "model.kwargs.num_classes is set by the dataset; remove it from the recipe.",
        )


@dataclass
class TrainConfig:
    epochs: int = 300
    max_steps: int | None = None
    """Stop after this many optimizer steps (overrides `epochs` when smaller)."""
    seed: int = 0
    lr_warmup_steps: int | None = None
    lr_warmup_epochs: float = 10.0
    """Linear LR warmup from 0; the peak LR is the DeepSpeed optimizer's `lr`."""
    min_lr: float = 1e-6
    """Floor of the cosine decay."""
    stop_at_step: int | None = None
    """Checkpoint and exit once this step is reached, schedule unchanged (time-sliced jobs); then --resume."""
    checkpoint_every_steps: int = 0
    """Save a DeepSpeed checkpoint every N optimizer steps (0: only at the end of each epoch and run)."""
    keep_checkpoints: int = 2
    log_every_steps: int = 10
    eval_every_epochs: int = 1
    collective_timeout_s: float = 1800.0
    """A collective waiting longer than this (e.g. on a dead rank) fails instead of hanging."""
    rendezvous_timeout_s: float = 600.0
    """Every rank stops, naming MASTER_ADDR and GLOO_SOCKET_IFNAME, when the process group has not started after
    this long (a node that cannot reach the others, or one that never started); allow for the slowest node's
    dataset scan."""
    max_bad_steps: int = 5
    """Stop after this many consecutive steps with a non-finite loss or gradient (each is skipped by DeepSpeed)."""
    deepspeed_config: str | None = None
    """DeepSpeed JSON; `--deepspeed_config` on the command line wins."""
    output_dir: str = "runs/default"

    def __post_init__(self) -> None:
        _require(self.epochs >= 1, f"train.epochs must be >= 1, got {self.epochs}.")
        _require(
            self.max_steps is None or self.max_steps >= 1,
            f"train.max_steps must be >= 1 or null, got {self.max_steps}.",
        )
        _require(
            self.stop_at_step is None or self.stop_at_step >= 1,
            f"train.stop_at_step must be >= 1 or null, got {self.stop_at_step}.",
        )
        _require(self.lr_warmup_epochs >= 0, "train.lr_warmup_epochs must be >= 0.")
        _require(self.lr_warmup_steps is None or self.lr_warmup_steps >= 0, "train.lr_warmup_steps must be >= 0.")
        _require(self.min_lr >= 0, "train.min_lr must be >= 0.")
        _require(self.checkpoint_every_steps >= 0, "train.checkpoint_every_steps must be >= 0 (0 disables it).")
        _require(self.keep_checkpoints >= 1, f"train.keep_checkpoints must be >= 1, got {self.keep_checkpoints}.")
        _require(self.log_every_steps >= 1, "train.log_every_steps must be >= 1.")
        _require(self.collective_timeout_s > 0, "train.collective_timeout_s must be > 0 (seconds).")
        _require(self.rendezvous_timeout_s > 0, "train.rendezvous_timeout_s must be > 0 (seconds).")
        _require(self.eval_every_epochs >= 1, "train.eval_every_epochs must be >= 1.")
        _require(self.max_bad_steps >= 1, f"train.max_bad_steps must be >= 1, got {self.max_bad_steps}.")


@dataclass
class PreLoRAConfig:
    enabled: bool = True
    """False: plain full-parameter training (the baseline)."""
    target_modules: str = r"blocks\.\d+\.(attn\.(qkv|proj)|mlp\.fc[12])"
    """Regex, matched in full against module names; never matches `patch_embed.proj`."""
    window_epochs: int = 5
    """Window size E in epochs (the paper's unit)."""
    window_steps: int | None = None
    """Window size S in optimizer steps; when set it replaces `window_epochs` (short runs)."""
    sample_every_steps: int | None = None
    """Norm sampling interval in steps, with window_steps only; null: every window_steps // 4 steps (at least 1).
    Windows of epochs sample once at the end of every epoch."""
    num_windows: int = 3
    """N: the test compares the last N windows (N-1 consecutive pairs)."""
    window_value: str = "mean"
    """A window's norm W^k: 'mean' of its samples, or 'last' (the sample at the window's end: the authors'
    code, with one sample per window of 1000 steps)."""
    delta_w: float = 1.0
    """Threshold on the per-module mean weight-norm change, in percent."""
    delta_l: float = 5.0
    """Threshold on the loss change between windows, in percent."""
    min_epochs: int | None = None
    """No switch before this many epochs are done, even when the test passes."""
    max_epochs: int | None = None
    """Switch at the end of this epoch even if the test has not passed (with windows of steps or epochs)."""
    warmup_epochs: int = 10
    """Epochs of base + LoRA training after the switch before the base is frozen."""
    warmup_steps: int | None = None
    """The same in optimizer steps; replaces `warmup_epochs` when set."""
    r_min: int = 8
    r_max: int = 64
    rank_reference_width: int | None = None
    """When set, r_min and r_max are the ranks of a layer this wide (min of its in and out features), and each
    module's bounds scale with its own width to the nearest power of two (at least 1): with 1024, the paper's 8..64
    stay 8..64 on ViT-L and become 2..16 on a 192-wide ViT-Tiny. null: r_min..r_max as written, at every width."""
    switch_optimizer: str = "carry"
    """At every engine rebuild (the switch, the freeze, relora's start and end): 'carry' Adam's moments of each
    parameter that trains on, with its own step count; 'reset' gives the new engine a fresh optimizer (the paper's
    and the authors' code; docs/fidelity.md)."""
    switch_rewarmup_steps: int = 0
    """After a rebuild, the LR of the parameters whose Adam state starts fresh ramps linearly from 0 back to the
    schedule over this many steps (with 'reset' every parameter: the authors' restart with a re-warmup)."""
    lora_lr_scale: float = 1.0
    """LR factor of the base-frozen `lora` phase (on top of the schedule; the authors' hybrid used 0.1)."""
    alpha_ratio: float = 2.0
    """lora_alpha = alpha_ratio * rank, so the LoRA scale alpha/r is the same for every layer."""
    lora_dropout: float = 0.0
    lora_layer: str = "merged"
    """How a LoRA layer is computed: 'merged' (one product with W + s B A, the factors' gradients from skinny
    products; prelora_ds/lora/merged.py) or 'peft' (PEFT's x W^T + s (x A^T) B^T). The same function and adapters."""
    trainable_extra: str = r"head|fc_norm|norm|blocks\.\d+\.norm[12]"
    """Regex (full match on module names) of the non-LoRA modules that stay trainable in `lora`."""

    def __post_init__(self) -> None:
        try:
            re.compile(self.target_modules)
            re.compile(self.trainable_extra)
        except re.error as exc:
            raise ConfigError(f"prelora.target_modules / trainable_extra is not a valid regex: {exc}.") from exc
        _require(self.window_epochs >= 1, f"prelora.window_epochs must be >= 1, got {self.window_epochs}.")
        _require(
            self.window_value in ("mean", "last"),
            f"prelora.window_value={self.window_value!r} is unknown; write mean or last.",
        )
        _require(
            self.switch_optimizer in ("carry", "reset"),
            f"prelora.switch_optimizer={self.switch_optimizer!r} is unknown; write carry or reset.",
        )
        _require(self.switch_rewarmup_steps >= 0, "prelora.switch_rewarmup_steps must be >= 0.")
        _require(self.lora_lr_scale > 0, f"prelora.lora_lr_scale must be > 0, got {self.lora_lr_scale}.")
        _require(
            self.window_steps is None or self.window_steps >= 1,
            f"prelora.window_steps must be >= 1 or null, got {self.window_steps}.",
        )
        _require(
            self.sample_every_steps is None or self.sample_every_steps >= 1,
            "prelora.sample_every_steps must be >= 1 or null.",
        )
        _require(
            self.sample_every_steps is None or self.window_steps is not None,
            f"prelora.sample_every_steps={self.sample_every_steps} needs windows of steps, but prelora.window_steps "
            "is null: windows of epochs close at an epoch's end, where step-based samples never fall, so no window "
            "would ever close. Remove sample_every_steps (windows of epochs sample once per epoch) or set "
            "prelora.window_steps.",
        )
        _require(
            self.num_windows >= 2,
            f"prelora.num_windows must be >= 2 (the test compares consecutive windows), got {self.num_windows}.",
        )
        _require(self.delta_w > 0, f"prelora.delta_w must be > 0 (a percentage), got {self.delta_w}.")
        _require(self.delta_l > 0, f"prelora.delta_l must be > 0 (a percentage), got {self.delta_l}.")
        _require(self.warmup_epochs >= 0, "prelora.warmup_epochs must be >= 0.")
        _require(self.warmup_steps is None or self.warmup_steps >= 0, "prelora.warmup_steps must be >= 0.")
        for name in ("r_min", "r_max"):
            value = getattr(self, name)
            _require(
                _is_pow2(value),
                f"prelora.{name}={value} is not a power of two; write one of 4, 8, 16, 32, 64, 128.",
            )
        _require(
            self.r_min <= self.r_max,
            f"prelora.r_min={self.r_min} is larger than prelora.r_max={self.r_max}; swap them.",
        )
        _require(
            self.rank_reference_width is None or self.rank_reference_width >= 1,
            f"prelora.rank_reference_width must be a layer width >= 1 (e.g. 1024, the paper's ViT-L) or null, got "
            f"{self.rank_reference_width}.",
        )
        _require(self.alpha_ratio > 0, f"prelora.alpha_ratio must be > 0, got {self.alpha_ratio}.")
        _require(0 <= self.lora_dropout < 1, "prelora.lora_dropout must be in [0, 1).")
        _require(
            self.lora_layer in ("merged", "peft"),
            f"prelora.lora_layer={self.lora_layer!r} is unknown; write merged (one product with the merged weight) "
            "or peft (PEFT's own LoRA layer).",
        )
        if self.min_epochs is not None and self.max_epochs is not None:
            _require(
                self.min_epochs <= self.max_epochs,
                f"prelora.min_epochs={self.min_epochs} > prelora.max_epochs={self.max_epochs}.",
            )


@dataclass
class ReLoRAConfig:
    enabled: bool = False
    start_epoch: int | None = None
    start_step: int | None = None
    rank: int = 256
    merge_every_steps: int = 1000
    prune_ratio: float = 0.9
    reset: str = "magnitude"
    """The Adam first moment of the LoRA weights at a merge: 'magnitude' (zero its `prune_ratio` smallest
    entries) or 'full' (zero all of it). The second moment is kept in both (docs/relora.md)."""
    restart_warmup_steps: int = 50
    """After each merge the LR restarts from 0 and ramps linearly back to the cosine over this many steps."""
    warmup_base_lr_scale: float = 0.1
    """LR factor (on the schedule) of the base weights at the first step of the `warmup` that follows `relora`
    (frozen through it; LoRA factors, head and norms always train at the schedule's LR). `relora` leaves the base
    at Adam's stability edge, where full training only touches it (`prelora sharpness`), so full-rank steps at the
    schedule's LR raise the loss through `warmup` (1.0, no ramp, the paper's: top-1 one epoch after the switch
    1.4 to 10.6 points under the validation before it, demo, 4 seeds); 0.1 throughout: no rise, 0.6 points lower at
    the end, the base learning less (docs/study.md)."""
    warmup_base_lr_ramp: bool = True
    """Raise that factor linearly from `warmup_base_lr_scale` at the switch to 1.0 at the end of `warmup`
    (`prelora.warmup_steps`, or `warmup_epochs` x the steps of an epoch). With 0.1 (the defaults), demo, 4 seeds:
    one epoch after the switch 0.3 to 3.3 points under the validation before it, but part of the drop comes later,
    as the factor nears 1 (the worst validation of `warmup` -5.3 on average against -7.6 at 1.0); the end level with
    1.0 (docs/study.md)."""

    def __post_init__(self) -> None:
        _require(self.rank >= 1, f"relora.rank must be >= 1, got {self.rank}.")
        _require(
            not self.enabled or self.start_step is not None or self.start_epoch is not None,
            "relora.enabled needs relora.start_epoch or relora.start_step (full-parameter training before it).",
        )
        _require(
            self.start_step is None or self.start_epoch is None,
            "set one of relora.start_step and relora.start_epoch, not both.",
        )
        _require(self.merge_every_steps >= 1, "relora.merge_every_steps must be >= 1.")
        _require(0 <= self.prune_ratio <= 1, f"relora.prune_ratio must be in [0, 1], got {self.prune_ratio}.")
        _require(self.reset in ("magnitude", "full"), f"relora.reset={self.reset!r}: write 'magnitude' or 'full'.")
        _require(self.restart_warmup_steps >= 0, "relora.restart_warmup_steps must be >= 0.")
        _require(
            0 < self.warmup_base_lr_scale <= 1,
            f"relora.warmup_base_lr_scale must be in (0, 1], got {self.warmup_base_lr_scale}: it scales the LR of "
            "the base weights in the warmup after relora (1.0: the schedule's LR).",
        )


# What a phase's rebuild may change in the DeepSpeed config (config/deepspeed.py `phase_ds_config`)
PHASE_ENGINE_KEYS: dict[str, type] = {"zero_stage": int, "offload_optimizer": bool, "micro_batch": int,
                                      "activation_checkpointing": bool}
FROZEN_BASE_PHASES = ("relora", "warmup", "lora")  # the phases a rebuild starts: `full` runs on the config itself


@dataclass
class EngineConfig:
    """The engine each phase runs on. `full` runs on the DeepSpeed config as written; the phases a switch rebuilds
    into may change what the switch made cheaper: the ZeRO stage, optimizer offload, the micro batch (the global
    batch stays: DeepSpeed derives the accumulation) and activation checkpointing (docs/usage.md, engine)."""

    activation_checkpointing: bool = False
    """timm's `set_grad_checkpointing` in `full` (recompute each block's activations in the backward: the memory of
    one block instead of all), and in every other phase that does not set it."""
    relora: dict[str, Any] = field(default_factory=dict)
    """e.g. {zero_stage: 2, micro_batch: 64, offload_optimizer: false, activation_checkpointing: false}"""
    warmup: dict[str, Any] = field(default_factory=dict)
    lora: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for phase in FROZEN_BASE_PHASES:
            for key, value in getattr(self, phase).items():
                _require(key in PHASE_ENGINE_KEYS,
                         f"engine.{phase}.{key} is not a per-phase engine setting; write any of "
                         f"{', '.join(PHASE_ENGINE_KEYS)}, e.g. --engine.{phase} '{{zero_stage: 2, micro_batch: 64}}'.")
                kind = PHASE_ENGINE_KEYS[key]
                _require(isinstance(value, kind) and (kind is bool or not isinstance(value, bool)),
                         f"engine.{phase}.{key}={value!r} must be {'true or false' if kind is bool else 'an integer'}.")
            stage = getattr(self, phase).get("zero_stage")
            _require(stage in (None, 0, 1, 2, 3), f"engine.{phase}.zero_stage={stage}: DeepSpeed has stages 0-3.")
            micro = getattr(self, phase).get("micro_batch")
            _require(micro is None or micro >= 1, f"engine.{phase}.micro_batch={micro} must be >= 1.")

    def settings(self, phase: str) -> dict[str, Any]:
        """`phase`'s engine settings ({} for `full`), activation checkpointing filled in from the run's default."""
        own = dict(getattr(self, phase)) if phase in FROZEN_BASE_PHASES else {}
        own.setdefault("activation_checkpointing", self.activation_checkpointing)
        return own


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    prelora: PreLoRAConfig = field(default_factory=PreLoRAConfig)
    relora: ReLoRAConfig = field(default_factory=ReLoRAConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)
