"""PEFT's LoRA `Linear` computed as one product with the merged weight `W + s B A` (`prelora.lora_layer: merged`).

PEFT computes `x W^T + b + s (x A^T) B^T`: the base product, then two more passes over the activations, an
`out`-wide intermediate, a scale and an add. On narrow layers those passes, not their FLOPs, are what the LoRA
phases pay (issue 35, docs/benchmarks.md#lora-layer). `MergedLinear` computes the same function as

    forward:  y = x M^T + b,  M = W + s B A            (M: out x in, built per call, never stored)
    backward: dx = g M
              base frozen (`lora`):   dB = s g^T (x A^T),  dA = s (g B)^T x     (skinny: tokens x r)
              base trainable (`warmup`): dW = g^T x,  dB = s dW A^T,  dA = s B^T dW   (no extra token pass)

It saves only `x` for backward (PEFT also keeps `x A^T`), and a call that PEFT's own path must serve (dropout in
training, several or disabled adapters, a merged layer, autocast, DoRA and other variants) goes to `lora.Linear.forward`
unchanged. It is a subclass of PEFT's LoRA `Linear`, registered through `LoraConfig._register_custom_module`, so PEFT
still injects, names, saves, merges and unloads the adapters.

By count, per layer and step (T tokens, base frozen): PEFT's six token-sized factor products (x A^T, its B product,
and four in backward) cost 3 T r (in + out); here four remain, 2 T r (in + out), and building M twice (forward and
backward) costs 2 out in r. At ViT-L (T = 64 x 197, r <= 64) M is under 1 % of the layer's product, so the saving
is a third of the adapters' FLOPs plus PEFT's three elementwise passes over the T x out output (writing the B
product, scaling it, adding it: six T x out reads and writes, 0.46 GB in bf16 for ViT-L's qkv, ~0.14 ms at an
H100's 3.35 TB/s against ~0.11 ms for that layer's 79 GFLOP forward product; by count, not measured on a GPU). With
the base trainable the factors' gradients come from dW: 4 out in r in place of 3 T r (in + out).
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora import Linear as LoraLinear


def merged_weight(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """`W + s B A` in the weight's dtype; a 16-bit weight's sum is formed in fp32 and rounded once."""
    if weight.dtype.itemsize >= 4:
        return torch.addmm(weight, lora_b, lora_a, alpha=scaling)
    return torch.addmm(weight.float(), lora_b.float(), lora_a.float(), alpha=scaling).to(weight.dtype)


class MergedLoRAFunction(torch.autograd.Function):
    """y = x (W + s B A)^T + b with the gradients above; `bias` may be None."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float):
        ctx.save_for_backward(x, weight, lora_a, lora_b)
        ctx.scaling = scaling
        ctx.has_bias = bias is not None
        return torch.nn.functional.linear(x, merged_weight(weight, lora_a, lora_b, scaling), bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight, lora_a, lora_b = ctx.saved_tensors
        s = ctx.scaling
        need_x, need_w, need_bias, need_a, need_b, _ = ctx.needs_input_grad
        g2 = grad.reshape(-1, grad.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        dx = dw = dbias = da = db = None
        if need_x:
            dx = (g2 @ merged_weight(weight, lora_a, lora_b, s)).view(*grad.shape[:-1], x.shape[-1])
        if need_w:  # the full weight gradient is computed anyway: the factors' follow from it without the tokens
            dw = g2.t() @ x2
            if need_b:
                db = (dw @ lora_a.t()).mul_(s)
            if need_a:
                da = (lora_b.t() @ dw).mul_(s)
        else:
            if need_b:
                db = (g2.t() @ (x2 @ lora_a.t())).mul_(s)
            if need_a:
                da = ((g2 @ lora_b).t() @ x2).mul_(s)
        if need_bias and ctx.has_bias:
            dbias = g2.sum(0)
        return dx, dw, dbias, da, db, None


class MergedLinear(LoraLinear):
    """PEFT's LoRA Linear whose plain forward (one adapter, no dropout in training) is `MergedLoRAFunction`."""

    def _merged_path(self, x: torch.Tensor, args: tuple, kwargs: dict[str, Any]) -> str | None:
        """The adapter to compute merged, or None when PEFT's own forward must run."""
        if args or kwargs or self.disable_adapters or self.merged or self.fan_in_fan_out:
            return None
        if torch.is_autocast_enabled(x.device.type):  # the Function's backward would not run under autocast
            return None
        active = [a for a in self.active_adapters if a in self.lora_A]
        if len(active) != 1 or active[0] in self.lora_variant:
            return None
        name = active[0]
        dropout = self.lora_dropout[name]
        if self.training and not isinstance(dropout, torch.nn.Identity) and dropout.p > 0:
            return None
        base = self.get_base_layer()
        if type(base) is not torch.nn.Linear or self.lora_A[name].weight.dtype != base.weight.dtype:
            return None
        return name

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        name = self._merged_path(x, args, kwargs)
        if name is None:
            return super().forward(x, *args, **kwargs)
        base = self.get_base_layer()
        a, b, s = self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name]
        if not torch.is_grad_enabled():
            return torch.nn.functional.linear(x, merged_weight(base.weight, a, b, s), base.bias)
        return MergedLoRAFunction.apply(x, base.weight, base.bias, a, b, s)

    def __repr__(self) -> str:
        return "merged_" + super().__repr__()


def register(lora_config) -> None:
    """Make PEFT inject `MergedLinear` for every targeted `torch.nn.Linear` of this config."""
    lora_config._register_custom_module({torch.nn.Linear: MergedLinear})


def mark_zero3_leaves(model: torch.nn.Module) -> int:
    """ZeRO-3 gathers a module's own parameters before its forward; `MergedLinear` reads its children's (base,
    A, B) without calling them, so each is made a ZeRO-3 leaf: its whole subtree is gathered at its forward and
    backward. Returns the number marked; harmless under ZeRO-1/2 (only stage 3 reads the flag)."""
    from deepspeed.utils import set_z3_leaf_modules

    if not any(isinstance(m, MergedLinear) for m in model.modules()):
        return 0
    return len(set_z3_leaf_modules(model, [MergedLinear]))
