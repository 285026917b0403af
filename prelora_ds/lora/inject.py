"""The phases of a PreLoRA run as data: which structure the model has and what is trainable.

| phase  | LoRA adapters                  | trainable                                  |
|--------|--------------------------------|--------------------------------------------|
| full   | none                           | everything                                 |
| relora | uniform `relora.rank`          | LoRA + `prelora.trainable_extra`           |
| warmup | per-layer ranks (Algorithm 2)  | everything (base + LoRA)                   |
| lora   | per-layer ranks (Algorithm 2)  | LoRA + `prelora.trainable_extra`           |

One training loop runs every phase; a phase change rebuilds the engine (`switch`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from prelora_ds.algorithm.ranks import rank_pattern
from prelora_ds.config.sections import PreLoRAConfig
from prelora_ds.errors import ConfigError
from prelora_ds.lora import merged


@dataclass(frozen=True)
class PhaseSpec:
    name: str
    has_lora: bool
    base_trainable: bool


PHASES: dict[str, PhaseSpec] = {
    "full": PhaseSpec("full", has_lora=False, base_trainable=True),
    "relora": PhaseSpec("relora", has_lora=True, base_trainable=False),
    "warmup": PhaseSpec("warmup", has_lora=True, base_trainable=True),
    "lora": PhaseSpec("lora", has_lora=True, base_trainable=False),
}

PEFT_PREFIX = "base_model.model."


def canonical_name(name: str) -> str:
    """Parameter name independent of PEFT wrapping: the timm name for base weights.

    `base_model.model.blocks.0.attn.qkv.base_layer.weight` -> `blocks.0.attn.qkv.weight`;
    LoRA parameters keep their `lora_A.default` part.
    """
    if name.startswith(PEFT_PREFIX):
        name = name[len(PEFT_PREFIX) :]
    return name.replace(".base_layer.", ".")


def is_lora_param(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def target_layers(model: torch.nn.Module, pattern: str) -> list[str]:
    """Names of the Linear modules the PreLoRA target regex selects (full match), in model order."""
    regex = re.compile(pattern)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and regex.fullmatch(n)]
    if not names:
        linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)][:6]
        raise ConfigError(
            f"prelora.target_modules={pattern!r} matches no Linear module of this model; module names look "
            f"like {linear}. The default for timm ViTs is blocks\\.\\d+\\.(attn\\.(qkv|proj)|mlp\\.fc[12])."
        )
    return names


def module_key(layer_name: str) -> str:
    """`blocks.3.attn.qkv` -> `attn.qkv`: the module m of the paper, shared by all layers l."""
    match = re.match(r"^(?:.*\.)?blocks\.\d+\.(.+)$", layer_name)
    return match.group(1) if match else layer_name


def layer_index(layer_name: str) -> int:
    match = re.search(r"blocks\.(\d+)\.", layer_name)
    return int(match.group(1)) if match else 0


def inject_lora(
    model: torch.nn.Module, ranks: dict[str, int], cfg: PreLoRAConfig, alpha_ratio: float | None = None
) -> PeftModel:
    """Wrap `model` with PEFT LoRA, one rank per layer (keyed by exact module name), and verify it.

    PEFT silently ignores `rank_pattern` keys that match nothing, so every layer's rank is read back.
    `prelora.lora_layer: merged` injects `merged.MergedLinear` (the same function, one product), `peft` PEFT's own.
    """
    ratio = cfg.alpha_ratio if alpha_ratio is None else alpha_ratio
    default_r = max(set(ranks.values()), key=list(ranks.values()).count)
    r_pat, a_pat = rank_pattern({n: [n] for n in ranks}, {n: [r] for n, r in ranks.items()}, ratio)
    lora_cfg = LoraConfig(
        r=default_r,
        lora_alpha=ratio * default_r,
        target_modules=sorted(ranks),
        rank_pattern=r_pat,
        alpha_pattern=a_pat,
        lora_dropout=cfg.lora_dropout,
        bias="none",
    )
    if cfg.lora_layer == "merged":
        merged.register(lora_cfg)
    peft_model = get_peft_model(model, lora_cfg)
    merged.mark_zero3_leaves(peft_model)
    inner = peft_model.base_model.model
    for name, rank in ranks.items():
        layer = inner.get_submodule(name)
        got = getattr(layer, "r", {}).get("default")
        if got != rank or layer.lora_A["default"].out_features != rank:
            raise RuntimeError(f"LoRA injection gave {name} rank {got}, expected {rank}.")
        if abs(layer.scaling["default"] - ratio) > 1e-12:  # alpha / r with alpha = ratio * r
            raise RuntimeError(f"LoRA injection gave {name} scale {layer.scaling['default']}, expected {ratio}.")
    return peft_model


def trains(name: str, phase: PhaseSpec, extra_pattern: str) -> bool:
    """Whether parameter `name` (PEFT's or canonical) trains in `phase`."""
    owner = canonical_name(name).rpartition(".")[0]  # module that holds the parameter
    return is_lora_param(name) or phase.base_trainable or bool(re.fullmatch(extra_pattern, owner))


def set_trainable(model: torch.nn.Module, phase: PhaseSpec, extra_pattern: str) -> None:
    """requires_grad per phase. ZeRO-1/2 fix the trainable set at construction: call before building."""
    for name, p in model.named_parameters():
        p.requires_grad_(trains(name, phase, extra_pattern))


def build_structure(
    model: torch.nn.Module, phase: PhaseSpec, ranks: dict[str, int] | None, cfg: PreLoRAConfig
) -> torch.nn.Module:
    """Fresh timm model -> the phase's structure (LoRA injected when the phase has it), trainable set applied."""
    if phase.has_lora:
        if not ranks:
            raise RuntimeError(f"phase {phase.name} needs LoRA ranks")
        model = inject_lora(model, ranks, cfg)
    set_trainable(model, phase, cfg.trainable_extra)
    return model
