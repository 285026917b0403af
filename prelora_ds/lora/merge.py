"""Merged plain-timm export: W_fp32 + s B A per LoRA layer, computed in fp32 (docs/design.md §4)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from prelora_ds.engine.model import fuse_qkv

LORA_A = ".lora_A.default.weight"
LORA_B = ".lora_B.default.weight"


def merge_lora(state: dict[str, torch.Tensor], scales: dict[str, float]) -> dict[str, torch.Tensor]:
    """Canonical fp32 state (LoRA keys included) -> timm state dict with the deltas merged.

    `scales[layer]` is alpha / r of that layer, the factor PEFT's `merge_and_unload()` applies.
    """
    merged = {k: v.float().clone() for k, v in state.items() if ".lora_" not in k}
    for layer, scale in scales.items():
        a, b = state[layer + LORA_A].float(), state[layer + LORA_B].float()
        merged[layer + ".weight"] += scale * (b @ a)
    return merged


def lora_scales(module: torch.nn.Module) -> dict[str, float]:
    """{layer name (timm naming): alpha / r} for every LoRA layer of a PEFT model (empty otherwise)."""
    inner = getattr(getattr(module, "base_model", None), "model", None)
    if inner is None:
        return {}
    return {
        name: float(m.scaling["default"])
        for name, m in inner.named_modules()
        if hasattr(m, "lora_A") and "default" in getattr(m, "scaling", {})
    }


def save_merged(path: Path, state: dict[str, torch.Tensor], scales: dict[str, float]) -> dict[str, torch.Tensor]:
    """The merged model as a plain fused timm state dict, whichever q/k/v layout trained (`model.qkv`)."""
    merged = {k: v.contiguous() for k, v in fuse_qkv(merge_lora(state, scales)).items()}
    save_file(merged, str(path), metadata={"format": "pt", "producer": "prelora_ds"})
    os.chmod(path, 0o666 & ~_umask())  # safetensors creates its file 0600; the run's other files follow the umask
    return merged


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask
