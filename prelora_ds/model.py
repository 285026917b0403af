"""timm ViT factory and optimizer parameter groups."""

from __future__ import annotations

import timm
import torch
from timm.optim import param_groups_weight_decay

from prelora_ds.config import ConfigError, ModelConfig


def create_model(cfg: ModelConfig, num_classes: int) -> torch.nn.Module:
    """A fresh fp32 timm model; called again at every engine rebuild (reusing a module leaks, SPEC §4)."""
    try:
        return timm.create_model(cfg.name, pretrained=False, num_classes=num_classes, **cfg.kwargs)
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
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total
