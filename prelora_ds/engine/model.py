"""timm ViT factory and optimizer parameter groups."""

from __future__ import annotations

import timm
import torch
from timm.layers import AttentionRope
from timm.optim import param_groups_weight_decay

from prelora_ds.config.sections import ModelConfig
from prelora_ds.errors import ConfigError

SPLIT = ("q_proj", "k_proj", "v_proj")


class SplitQKVAttention(AttentionRope):
    """timm's split-projection attention (`q_proj`, `k_proj`, `v_proj`, `proj`) without rope: the function of
    timm's fused `Attention`. A class, since timm's VisionTransformer takes `attn_layer` as a class."""

    def __init__(self, dim: int, **kwargs) -> None:
        super().__init__(dim, qkv_fused=False, **kwargs)


def create_model(cfg: ModelConfig, num_classes: int, init: bool = True) -> torch.nn.Module:
    """A fresh fp32 timm model; called again at every engine rebuild (reusing a module leaks, docs/design.md).

    `model.qkv: split` builds the same VisionTransformer with timm's split attention (`AttentionRope`, no rope:
    q, k, v as separate Linears) and gives it the fused model's initial weights, so a seed draws the same
    function in either layout. `init=False`: the layout only, for a caller that writes every weight itself and
    chose where the tensors live (the meta device, or ZeRO-3 partitions under `deepspeed.zero.Init`).
    """
    if cfg.qkv == "fused":
        return _timm_model(cfg, num_classes)
    if not init:
        return _timm_model(cfg, num_classes, attn_layer=SplitQKVAttention)
    fused = _timm_model(cfg, num_classes)  # draws the initial weights exactly as the fused layout does
    if next(fused.parameters()).is_meta:  # built on the meta device: there are no weights to carry over
        return _timm_model(cfg, num_classes, attn_layer=SplitQKVAttention)
    with torch.device("meta"):
        split = _timm_model(cfg, num_classes, attn_layer=SplitQKVAttention)
    split = split.to_empty(device="cpu")
    split.load_state_dict(split_qkv(fused.state_dict()))  # strict: every parameter and buffer is set
    return split


def _timm_model(cfg: ModelConfig, num_classes: int, **extra) -> torch.nn.Module:
    try:
        return timm.create_model(cfg.name, pretrained=False, num_classes=num_classes, **cfg.kwargs, **extra)
    except RuntimeError as exc:  # timm's "Unknown model" error
        raise ConfigError(f"model.name={cfg.name!r}: {exc}. See timm.list_models('vit_*').") from exc
    except TypeError as exc:
        raise ConfigError(f"model.kwargs={cfg.kwargs} are not accepted by {cfg.name}: {exc}.") from exc


def input_spec(model: torch.nn.Module) -> tuple[int, int, tuple[float, ...], tuple[float, ...]]:
    """(img_size, in_chans, mean, std) the model takes."""
    img_size = model.patch_embed.img_size
    img = img_size[0] if isinstance(img_size, tuple | list) else int(img_size)
    in_chans = model.patch_embed.proj.in_channels
    pcfg = getattr(model, "pretrained_cfg", {}) or {}
    mean = tuple(pcfg.get("mean", (0.485, 0.456, 0.406)))
    std = tuple(pcfg.get("std", (0.229, 0.224, 0.225)))
    if in_chans != len(mean):
        mean, std = (sum(mean) / len(mean),) * in_chans, (sum(std) / len(std),) * in_chans
    return img, in_chans, mean, std


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters, weight decay on weight matrices only (not biases, norms, pos_embed, cls_token)."""
    skip = set()
    inner = getattr(model, "base_model", None)
    inner = getattr(inner, "model", model)  # the timm model inside a PeftModel
    if hasattr(inner, "no_weight_decay"):
        prefix = "" if inner is model else "base_model.model."
        skip = {prefix + n for n in inner.no_weight_decay()}
    groups = param_groups_weight_decay(model, weight_decay, no_weight_decay_list=skip)
    return [g for g in groups if g["params"]]


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts (whole parameters, also under ZeRO-3's partitioning)."""
    from prelora_ds.engine.zero import numel

    total = sum(numel(p) for p in model.parameters())
    trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
    return trainable, total


def split_qkv(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A fused timm state dict (`attn.qkv.weight` [3D, D], rows q, k, v) -> the split layout's keys."""
    out = {}
    for key, value in state.items():
        prefix, dot, leaf = key.rpartition(".attn.qkv.")
        if not dot:
            out[key] = value
            continue
        for name, part in zip(SPLIT, value.chunk(3, dim=0), strict=True):
            out[f"{prefix}.attn.{name}.{leaf}"] = part
    return out


def fuse_qkv(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The split layout's state dict -> a plain fused timm state dict (what `timm.create_model` loads)."""
    out = {}
    for key, value in state.items():
        prefix, dot, leaf = key.rpartition(".attn.q_proj.")
        if dot:
            parts = [state[f"{prefix}.attn.{name}.{leaf}"] for name in SPLIT]
            out[f"{prefix}.attn.qkv.{leaf}"] = torch.cat(parts, dim=0)
        elif ".attn.k_proj." not in key and ".attn.v_proj." not in key:
            out[key] = value
    return out
