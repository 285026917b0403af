"""Where a training step's time goes, per PreLoRA phase: forward, backward, optimizer, communication, the loop, and
the matrix products in them (issue 35), measured on the package's Trainer.

  python tools/profile_phases.py --steps 10 --out profile.json                        # the demo model, world size 1
  python tools/profile_phases.py --ranks-json runs/demo/ranks.json --lora-layer peft  # a demo run's ranks
  deepspeed --num_gpus 2 tools/profile_phases.py --ranks-json runs/demo/ranks.json    # 2 ranks: + communication
  python tools/profile_phases.py --model vit_base_patch16_224 --batch-size 8          # ViT-B/16 at 224 px

Every phase asked for (full, warmup, lora; relora on request) gets its own Trainer, all built in this one process
on synthetic images (`harness.synthetic_trainer`, the ZeRO config --ds-config, LoRA ranks --rank on every target
layer or a ranks.json). Each runs `Trainer.train_step` on one fixed micro batch: --warmup steps untimed, one step
with shapes and hooks (each layer's input shape and which gradients it computes: the analytic FLOP count below,
checked against the profiler's own count of aten::mm/addmm/bmm, `flops_check`) and one with `saved_tensors_hooks`
(the bytes saved for backward: the distinct storages packed; `activation_bytes` without the parameters' own
storages, which are held anyway).

Then --steps rounds. In each, every phase in turn (the order rotated each round) runs an untimed step (its
engine's state back in the caches after the other phases' work), then

1. a timed step: the engine's `forward`, `backward` and `step` wrapped (perf_counter, and on a GPU a synchronize
   at each boundary); `loop` is the rest of `train_step` (learning rate, loss, bookkeeping);
2. the same step under torch.profiler (CPU activity; on a GPU also the device's, with shapes). Each op's self
   time, split by where it starts: GEMM ops (the set `GEMM_OPS`: mm, addmm, bmm, baddbmm, the fused attention
   kernels of scaled_dot_product_attention, whose softmax is inside them, and the convolution kernels), each
   matched by its shapes to a category of the count, and the rest (non-GEMM: elementwise, norms, copies, the
   autograd engine's own events, DeepSpeed's hooks' ops). Communication is the union of the intervals of the
   collectives' events (gloo:*, nccl:*, c10d::*), whatever thread runs them (gloo runs them on its own threads
   while the caller waits); ops on gloo's threads and inside a collective are not compute. `between ops`: the
   forward + backward walls less the ops and collectives in them (Python, module hooks, dispatch);

and then a microbenchmark times each distinct product of every phase's count (shape, transposition, op; the
same threads, dtype and device as the run), which predicts each phase's GEMM time as count x time per call. Each
round accounts for each phase's step as

    predicted GEMM + non-GEMM ops (forward, backward) + communication + optimizer + loop

(optimizer and loop less the communication inside them) against that round's timed step; the parts come from
within the same minute, so a machine whose rate drifts between minutes (a 2-core VM) still accounts. Reported:
the medians over the rounds. What the accounting leaves is named next to it: the time between ops, the GEMM
prediction's error (`gemm_prediction_error_pct`) and the profiler's overhead inside the op times
(`profiled_step_ms` against the step).

GEMM FLOPs, counted from the shapes one forward sees (2 FLOPs per multiply-add; T: rows a layer sees, micro batch
x tokens; i, o: in and out features; r: LoRA rank; "x needs grad": its input requires grad, "W trains": its weight
does):

  base linear (every nn.Linear but the head, and the base weight of a LoRA layer)
    forward   y = x W^T + b                                   2 T i o
    dgrad     dx = g W                                         2 T i o      x needs grad
    wgrad     dW = g^T x                                       2 T i o      W trains
  LoRA, lora_layer: peft  (y = base + s (x A^T) B^T)
    forward   u = x A^T, u B^T                                 2 T r i + 2 T r o
    backward  dB = (s g)^T u, du = (s g) B, dA = du^T x        2 T r o + 2 T r o + 2 T r i
              dx += du A                                       2 T r i      x needs grad
  LoRA, lora_layer: merged  (y = x M^T + b, M = W + s B A; the base products above run on M)
    forward   M                                                2 o r i
    backward  M again, for dx                                  2 o r i      x needs grad
              W trains (warmup):  dB = s dW A^T, dA = s B^T dW 2 o i r + 2 r o i   (dW: the base wgrad)
              W frozen (lora):    x A^T, g^T (x A^T), g B, (g B)^T x          2 T r (i + o + o + i)
  attention, per layer (B images, h heads, N tokens, d = head dim)
    forward   q k^T, P v                                       2 x 2 B h N^2 d
    backward  dq, dk, dP, dv                                   4 x 2 B h N^2 d
              the fused (flash) kernels of scaled_dot_product_attention also recompute q k^T: 5 x 2 B h N^2 d
  head (the classifier)          the base linear's three products on B rows
  patch embedding (the conv, kernel = stride = p; C channels, D = embed dim, Np patches per image)
    forward 2 B Np D C p^2; weight gradient the same when it trains; no input gradient (the images).

Run by a plain `python` the world is one process (--procs N: this tool launched again as N ranks through
deepspeed); under a launcher, the launcher's ranks run the rounds together. Rank 0 prints its markdown tables and
writes the JSON (--out) with every rank's medians.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from prelora_ds.cli import HelpFormatter

ROOT = Path(__file__).resolve().parents[1]
DEMO_RECIPE = ROOT / "recipes" / "demo.yaml"
DEMO_MODEL = "vit_tiny_patch16_224"
RANGE = "profile_phases::"  # the record_function ranges this tool puts around a step and its parts
PARTS = ("forward", "backward", "optimizer")
CATEGORIES = ("base_fwd", "base_dgrad", "base_wgrad", "lora_fwd", "lora_bwd", "attn_fwd", "attn_bwd", "head",
              "patch_embed")  # fmt: skip
# The matrix products as the profiler names their ops (self time: a composite op such as aten::linear or
# aten::matmul is the dispatch around its children, counted as non-GEMM)
GEMM_OPS = frozenset({
    "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm", "aten::_addmm_activation",
    "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
    "aten::_scaled_dot_product_flash_attention", "aten::_scaled_dot_product_flash_attention_backward",
    "aten::_scaled_dot_product_efficient_attention", "aten::_scaled_dot_product_efficient_attention_backward",
    "aten::_scaled_dot_product_cudnn_attention", "aten::_scaled_dot_product_cudnn_attention_backward",
    "aten::_flash_attention_forward", "aten::_flash_attention_backward",
    "aten::_efficient_attention_forward", "aten::_efficient_attention_backward",
    "aten::mkldnn_convolution", "aten::convolution_backward", "aten::cudnn_convolution",
    "aten::_slow_conv2d_forward", "aten::_slow_conv2d_backward",
})  # fmt: skip
COMM_PREFIXES = ("gloo:", "nccl:", "mpi:", "c10d::", "record_param_comms")
FLOP_OPS = ("aten::mm", "aten::addmm", "aten::bmm")  # what the profiler's with_flops counts of the products


# ---------------------------------------------------------------------------------------------- the analytic count
@dataclass(frozen=True)
class Gemm:
    """One matrix product, `count` times per step. op: mm | addmm (row bias, a linear) | addmm_full (matrix bias:
    merged's W + s B A) | bmm | sdpa_fwd | sdpa_bwd | conv_fwd | conv_wgrad. dims: (m, k, n) for C[m, n] = A[m, k]
    B[k, n] (bmm: (batch, m, k, n)); (B, h, N, d) for sdpa; (B, C, H, W, D, p) for conv. layout: which operand
    is a transposed view (`nt`: B, as x W^T; `tn`: A, as g^T x; `nn`: neither)."""

    category: str
    op: str
    dims: tuple[int, ...]
    layout: str = "nn"
    count: int = 1

    @property
    def flops(self) -> int:
        d = self.dims
        if self.op in ("mm", "addmm", "addmm_full"):
            per = 2 * d[0] * d[1] * d[2]
        elif self.op == "bmm":
            per = 2 * d[0] * d[1] * d[2] * d[3]
        elif self.op == "sdpa_fwd":  # q k^T and P v
            per = 2 * (2 * d[0] * d[1] * d[2] * d[2] * d[3])
        elif self.op == "sdpa_bwd":  # recomputed q k^T, dv, dP, dq, dk
            per = 5 * (2 * d[0] * d[1] * d[2] * d[2] * d[3])
        elif self.op in ("conv_fwd", "conv_wgrad"):
            b, c, h, w, out, p = d
            per = 2 * b * (h // p) * (w // p) * out * c * p * p
        else:
            raise ValueError(f"unknown product {self.op}")
        return per * self.count

    def key(self) -> tuple:
        """What the microbenchmark times: the same op, shape and layout cost the same whatever the category."""
        return (self.op, self.dims, self.layout)


def linear_gemms(rows: int, fan_in: int, fan_out: int, bias: bool, x_grad: bool, w_grad: bool,
                 head: bool = False) -> list[Gemm]:  # fmt: skip
    """A plain linear's forward (addmm with a bias, else mm), input gradient and weight gradient."""
    cat = ("head",) * 3 if head else ("base_fwd", "base_dgrad", "base_wgrad")
    out = [Gemm(cat[0], "addmm" if bias else "mm", (rows, fan_in, fan_out), "nt")]
    if x_grad:
        out.append(Gemm(cat[1], "mm", (rows, fan_out, fan_in), "nn"))
    if w_grad:
        out.append(Gemm(cat[2], "mm", (fan_out, rows, fan_in), "tn"))
    return out


def peft_lora_gemms(rows: int, fan_in: int, fan_out: int, rank: int, x_grad: bool) -> list[Gemm]:
    """PEFT's factor products, on top of the base layer's: u = x A^T, u B^T and their gradients."""
    out = [Gemm("lora_fwd", "mm", (rows, fan_in, rank), "nt"), Gemm("lora_fwd", "mm", (rows, rank, fan_out), "nt"),
           Gemm("lora_bwd", "mm", (fan_out, rows, rank), "tn"),  # dB = (s g)^T u
           Gemm("lora_bwd", "mm", (rows, fan_out, rank), "nn"),  # du = (s g) B
           Gemm("lora_bwd", "mm", (rank, rows, fan_in), "tn")]  # dA = du^T x  # fmt: skip
    if x_grad:
        out.append(Gemm("lora_bwd", "mm", (rows, rank, fan_in), "nn"))  # dx += du A
    return out


def merged_lora_gemms(rows: int, fan_in: int, fan_out: int, rank: int, bias: bool, x_grad: bool,
                      w_grad: bool) -> list[Gemm]:  # fmt: skip
    """`merged.MergedLoRAFunction`: the base products on M = W + s B A, M built per call, the factors' gradients."""
    build = Gemm("lora_fwd", "addmm_full", (fan_out, rank, fan_in), "nn")  # addmm(W, B, A)
    out = [build, *linear_gemms(rows, fan_in, fan_out, bias, x_grad, w_grad)]
    if x_grad:
        out.append(Gemm("lora_bwd", "addmm_full", (fan_out, rank, fan_in), "nn"))  # M again for dx = g M
    if w_grad:  # from dW, without the tokens
        out += [Gemm("lora_bwd", "mm", (fan_out, fan_in, rank), "nt"),  # dB = s dW A^T
                Gemm("lora_bwd", "mm", (rank, fan_out, fan_in), "tn")]  # dA = s B^T dW
    else:
        out += [Gemm("lora_bwd", "mm", (rows, fan_in, rank), "nt"),  # x A^T
                Gemm("lora_bwd", "mm", (fan_out, rows, rank), "tn"),  # dB = s g^T (x A^T)
                Gemm("lora_bwd", "mm", (rows, fan_out, rank), "nn"),  # g B
                Gemm("lora_bwd", "mm", (rank, rows, fan_in), "tn")]  # dA = s (g B)^T x
    return out


def attention_gemms(batch: int, heads: int, tokens: int, head_dim: int, fused: bool, grad: bool) -> list[Gemm]:
    """q k^T and P v (and their gradients): one fused op each way, or timm's unfused matmuls (bmm)."""
    if fused:
        out = [Gemm("attn_fwd", "sdpa_fwd", (batch, heads, tokens, head_dim))]
        return out + ([Gemm("attn_bwd", "sdpa_bwd", (batch, heads, tokens, head_dim))] if grad else [])
    bh = batch * heads
    qk = Gemm("attn_fwd", "bmm", (bh, tokens, head_dim, tokens))  # S = q k^T
    pv = Gemm("attn_fwd", "bmm", (bh, tokens, tokens, head_dim))  # O = P v
    out = [qk, pv]
    if grad:
        out += [Gemm("attn_bwd", "bmm", (bh, tokens, tokens, head_dim)),  # dq = dS k
                Gemm("attn_bwd", "bmm", (bh, head_dim, tokens, tokens)),  # dk^T = q^T dS
                Gemm("attn_bwd", "bmm", (bh, tokens, head_dim, tokens)),  # dP = dO v^T
                Gemm("attn_bwd", "bmm", (bh, tokens, tokens, head_dim))]  # dv = P^T dO
    return out


def conv_gemms(shape: tuple[int, int, int, int], out_channels: int, patch: int, w_grad: bool) -> list[Gemm]:
    dims = (*shape, out_channels, patch)
    return [Gemm("patch_embed", "conv_fwd", dims)] + ([Gemm("patch_embed", "conv_wgrad", dims)] if w_grad else [])


def merge_counts(gemms: Iterable[Gemm]) -> list[Gemm]:
    """The same product (category, op, shape, layout) once, with its count."""
    counts: dict[tuple, int] = defaultdict(int)
    for g in gemms:
        counts[(g.category, g.op, g.dims, g.layout)] += g.count
    return [Gemm(c, op, dims, layout, n) for (c, op, dims, layout), n in counts.items()]


def flops_by_category(gemms: Iterable[Gemm]) -> dict[str, int]:
    out = dict.fromkeys(CATEGORIES, 0)
    for g in gemms:
        out[g.category] += g.flops
    return out


def profiler_comparable_flops(gemms: Iterable[Gemm]) -> int:
    """The analytic FLOPs of the products the profiler counts (aten::mm/addmm/bmm; not the fused attention, not the
    convolution)."""
    return sum(g.flops for g in gemms if g.op in ("mm", "addmm", "addmm_full", "bmm"))


def classifier(model):
    """The model's head (timm's get_classifier), found under any wrappers (DeepSpeed, PEFT); None if it has none."""
    for m in model.modules():
        if hasattr(type(m), "get_classifier"):
            return m.get_classifier()
    return None


class ShapeRecorder:
    """Forward hooks that turn what each layer sees into its GEMMs (`gemms`, one entry per call)."""

    def __init__(self, model) -> None:
        import torch
        from peft.tuners.lora import Linear as LoraLinear

        from prelora_ds.lora.merged import MergedLinear

        self.gemms: list[Gemm] = []
        self.handles = []
        head = classifier(model)
        inside_lora = set()
        for m in model.modules():
            if isinstance(m, LoraLinear):
                inside_lora.update(id(c) for c in m.modules() if c is not m)
        for m in model.modules():
            if id(m) in inside_lora:
                continue
            if isinstance(m, LoraLinear):
                self.handles.append(m.register_forward_hook(self._lora(isinstance(m, MergedLinear))))
            elif isinstance(m, torch.nn.Linear):
                self.handles.append(m.register_forward_hook(self._linear(m is head)))
            elif isinstance(m, torch.nn.Conv2d):
                self.handles.append(m.register_forward_hook(self._conv))
            elif hasattr(m, "num_heads") and hasattr(m, "fused_attn"):  # timm's Attention, AttentionRope
                self.handles.append(m.register_forward_hook(self._attention))

    def _linear(self, head: bool):
        def hook(m, inputs, output):
            x = inputs[0]
            self.gemms += linear_gemms(x.numel() // x.shape[-1], m.in_features, m.out_features, m.bias is not None,
                                       x.requires_grad, m.weight.requires_grad, head)  # fmt: skip

        return hook

    def _lora(self, merged_kind: bool):
        def hook(m, inputs, output):
            x = inputs[0]
            base = m.get_base_layer()
            rows, fan_in, fan_out = x.numel() // x.shape[-1], base.in_features, base.out_features
            name = m._merged_path(x, (), {}) if merged_kind else None
            if name is not None:
                self.gemms += merged_lora_gemms(rows, fan_in, fan_out, m.r[name], base.bias is not None,
                                                x.requires_grad, base.weight.requires_grad)  # fmt: skip
                return
            self.gemms += linear_gemms(rows, fan_in, fan_out, base.bias is not None, x.requires_grad,
                                       base.weight.requires_grad)  # fmt: skip
            if not m.disable_adapters and not m.merged:
                for a in m.active_adapters:
                    if a in m.lora_A:
                        self.gemms += peft_lora_gemms(rows, fan_in, fan_out, m.r[a], x.requires_grad)

        return hook

    def _conv(self, m, inputs, output):
        x = inputs[0]
        if m.kernel_size != m.stride or m.padding not in ((0, 0), 0, "valid") or m.groups != 1:
            raise NotImplementedError(f"only a patch-embedding conv (kernel = stride) is counted, not {m}")
        if x.requires_grad:
            raise NotImplementedError("a conv whose input needs a gradient (not a patch embedding) is not counted")
        self.gemms += conv_gemms(tuple(x.shape), m.out_channels, m.kernel_size[0], m.weight.requires_grad)

    def _attention(self, m, inputs, output):
        x = inputs[0]
        heads = m.num_heads
        head_dim = getattr(m, "head_dim", x.shape[-1] // heads)
        # q, k, v need gradients when the input does or a parameter before the product trains (not the out proj's)
        grad = x.requires_grad or any(p.requires_grad for n, p in m.named_parameters() if not n.startswith("proj."))
        self.gemms += attention_gemms(x.shape[0], heads, x.shape[1], head_dim, bool(m.fused_attn), grad)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


# ---------------------------------------------------------------------------------------------- profiler events
@dataclass
class Ev:
    """What this tool reads of a profiler event (times in microseconds)."""

    name: str
    thread: int
    start: float
    end: float
    self_us: float
    parent: int | None = None  # index into the same list
    flops: int = 0
    shapes: tuple = ()  # the inputs' shapes (record_shapes)


def events_of(prof, device: bool) -> list[Ev]:
    """The profiler's events as `Ev`s; `device`: an op's time is its kernels' (self device time), else its CPU self
    time."""
    from torch.autograd import DeviceType

    # the host-side events only: a kernel's time is in its op's self device time, a kernel's own event would count it
    # again
    raw = [e for e in prof.events() if e.device_type == DeviceType.CPU]
    index = {id(e): i for i, e in enumerate(raw)}
    out = []
    for e in raw:
        own = getattr(e, "self_device_time_total", 0) if device else e.self_cpu_time_total
        parent = index.get(id(e.cpu_parent)) if e.cpu_parent is not None else None
        shapes = tuple(tuple(x) if isinstance(x, list | tuple) else () for x in (e.input_shapes or ()))
        out.append(Ev(e.name, e.thread, e.time_range.start, e.time_range.end, own, parent, int(e.flops or 0),
                      shapes))  # fmt: skip
    return out


def is_comm(name: str) -> bool:
    return name.startswith(COMM_PREFIXES)


def union_length(intervals: Iterable[tuple[float, float]], lo: float, hi: float) -> float:
    """The length of the union of `intervals` clipped to [lo, hi]."""
    total, end = 0.0, lo
    for a, b in sorted(intervals):
        a, b = max(a, end), min(b, hi)
        if b > a:
            total += b - a
            end = b
    return total


def compute_ops(events: list[Ev], lo: float, hi: float) -> list[tuple[Ev, str]]:
    """(op, part) for the ops that start in [lo, hi) inside a forward or backward range, the ranges themselves, ops
    on a collective's own threads and ops inside a collective's event left out."""
    main = {e.thread for e in events if e.name == RANGE + "step"}
    comm_threads = {e.thread for e in events if is_comm(e.name)} - main
    spans = [(e.start, e.end, e.name[len(RANGE):]) for e in events
             if e.name in (RANGE + "forward", RANGE + "backward") and lo <= e.start < hi]  # fmt: skip

    def in_comm(i: int | None) -> bool:
        while i is not None:
            if is_comm(events[i].name):
                return True
            i = events[i].parent
        return False

    out = []
    for i, e in enumerate(events):
        if not (lo <= e.start < hi) or e.name.startswith(RANGE) or e.thread in comm_threads:
            continue
        part = next((name for a, b, name in spans if a <= e.start < b), None)
        if part is not None and not in_comm(i):
            out.append((e, part))
    return out


def analyse_steps(events: list[Ev]) -> list[dict]:
    """Per profiled step (ms): GEMM and non-GEMM op time in forward + backward, communication in each part and in
    the loop, and the non-GEMM ops by name (forward + backward). Ops on a collective's own threads or inside a
    collective's event are communication, not compute."""
    steps = sorted((e for e in events if e.name == RANGE + "step"), key=lambda e: e.start)
    parts = [e for e in events if e.name.startswith(RANGE) and e.name != RANGE + "step"]
    comm = [e for e in events if is_comm(e.name)]
    out = []
    for s in steps:
        spans = {name: [] for name in PARTS}
        for p in parts:
            if s.start <= p.start < s.end:
                spans[p.name[len(RANGE):]].append((p.start, p.end))
        comm_iv = [(c.start, c.end) for c in comm if c.start < s.end and c.end > s.start]
        r = {"gemm_ms": 0.0, "non_gemm_ms": 0.0, "non_gemm_ops": defaultdict(float)}
        for name in PARTS:
            r[f"comm_{name}_ms"] = sum(union_length(comm_iv, a, b) for a, b in spans[name]) / 1e3
        r["comm_loop_ms"] = union_length(comm_iv, s.start, s.end) / 1e3 - sum(r[f"comm_{n}_ms"] for n in PARTS)
        for e, _ in compute_ops(events, s.start, s.end):
            if e.name in GEMM_OPS:
                r["gemm_ms"] += e.self_us / 1e3
            else:
                r["non_gemm_ms"] += e.self_us / 1e3
                r["non_gemm_ops"][e.name] += e.self_us / 1e3
        r["comm_ms"] = sum(r[f"comm_{n}_ms"] for n in (*PARTS, "loop"))
        out.append(r)
    return out


MM_FAMILY = ("mm", "addmm", "addmm_full")


def product_of(e: Ev) -> tuple[str, tuple] | None:
    """(family, dims) of a GEMM op event from its input shapes (record_shapes), as `Gemm` writes them."""
    sh = e.shapes
    try:
        if e.name == "aten::mm":
            return "mm", (sh[0][0], sh[0][1], sh[1][1])
        if e.name == "aten::addmm":
            return "mm", (sh[1][0], sh[1][1], sh[2][1])
        if e.name == "aten::bmm":
            return "bmm", (sh[0][0], sh[0][1], sh[0][2], sh[1][2])
        if "_attention" in e.name:
            return ("sdpa_bwd" if e.name.endswith("backward") else "sdpa_fwd"), tuple(sh[0])
        if e.name in ("aten::mkldnn_convolution", "aten::cudnn_convolution", "aten::_slow_conv2d_forward"):
            return "conv_fwd", (*sh[0], sh[1][0], sh[1][-1])
        if e.name in ("aten::convolution_backward", "aten::_slow_conv2d_backward"):
            return "conv_wgrad", (*sh[1], sh[2][0], sh[2][-1])
    except IndexError:
        return None
    return None


def measured_by_category(events: list[Ev], gemms: list[Gemm]) -> dict[str, float]:
    """GEMM op time (ms) of the profiled steps per category: each op event matched to the counted products of its
    shape, its time shared among them in proportion to their FLOPs (the same shape can serve two categories);
    `unmatched`: GEMM ops of no counted shape."""
    by_shape: dict[tuple, list[Gemm]] = defaultdict(list)
    for g in gemms:
        by_shape[("mm" if g.op in MM_FAMILY else g.op, g.dims)].append(g)
    out = dict.fromkeys((*CATEGORIES, "unmatched"), 0.0)
    steps = [e for e in events if e.name == RANGE + "step"]
    for s in steps:
        for e, _ in compute_ops(events, s.start, s.end):
            if e.name not in GEMM_OPS:
                continue
            match = by_shape.get(product_of(e) or ("", ()))
            if not match:
                out["unmatched"] += e.self_us / 1e3
                continue
            total = sum(g.flops for g in match)
            for g in match:
                out[g.category] += e.self_us / 1e3 * g.flops / total
    return {k: v / max(1, len(steps)) for k, v in out.items()}


def profiler_flops(events: list[Ev]) -> int:
    """The profiler's FLOPs of aten::mm/addmm/bmm in the steps' forward and backward (with_flops)."""
    spans = [(e.start, e.end) for e in events if e.name in (RANGE + "forward", RANGE + "backward")]
    return sum(e.flops for e in events if e.name in FLOP_OPS and any(a <= e.start < b for a, b in spans))


# ---------------------------------------------------------------------------------------------- accounting
def account(m: dict[str, float]) -> dict[str, float]:
    """The step accounted from its parts (ms). `m`: step, optimizer, loop (walls of the timed pass; loop: each step
    less its forward, backward and optimizer), gemm_measured, gemm_predicted, non_gemm (forward + backward ops),
    comm_forward, comm_backward, comm_optimizer, comm_loop, between_ops (the profiled pass's forward + backward
    walls less the ops and collectives in them).

    The optimizer and loop terms exclude their communication, so accounted = predicted GEMM + non-GEMM + all
    communication + optimizer + loop counts each interval once; with between_ops added, what is left of the step
    is the GEMM prediction's error, the profiler's overhead inside the ops and the noise between the passes."""
    comm = m["comm_forward"] + m["comm_backward"] + m["comm_optimizer"] + m["comm_loop"]
    optimizer_x, loop_x = m["optimizer"] - m["comm_optimizer"], m["loop"] - m["comm_loop"]
    accounted = m["gemm_predicted"] + m["non_gemm"] + comm + optimizer_x + loop_x
    return {
        "comm": comm, "optimizer_excl_comm": optimizer_x, "loop_excl_comm": loop_x,
        "accounted": accounted, "accounted_pct": 100.0 * accounted / m["step"],
        "diff_pct": 100.0 * (accounted - m["step"]) / m["step"],
        "between_ops": m["between_ops"],
        "with_between_ops_pct": 100.0 * (accounted + m["between_ops"]) / m["step"],
        "gemm_prediction_error_pct": (100.0 * (m["gemm_predicted"] - m["gemm_measured"]) / m["gemm_measured"]
                                      if m["gemm_measured"] else 0.0),
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------- microbenchmark
def time_per_call(fn: Callable[[], object], sync: Callable[[], None], min_s: float = 0.03, batches: int = 3) -> float:
    """Seconds per call: the median of `batches` batches of calls, each at least `min_s` long, after an untimed
    call."""
    fn()
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    one = time.perf_counter() - t0
    reps = max(1, min(2000, int(min_s / max(one, 1e-7))))
    samples = []
    for _ in range(batches):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        sync()
        samples.append((time.perf_counter() - t0) / reps)
    return statistics.median(samples)


def product_fn(key: tuple, dtype, device) -> Callable[[], object]:
    """A call of the product `key` (Gemm.key()) on random operands of its shape and layout."""
    import torch
    import torch.nn.functional as F

    op, dims, layout = key

    def rand(*shape):
        return torch.randn(*shape, dtype=dtype, device=device)

    if op in ("mm", "addmm", "addmm_full"):
        m, k, n = dims
        a = rand(k, m).t() if layout[0] == "t" else rand(m, k)
        b = rand(n, k).t() if layout[1] == "t" else rand(k, n)
        if op == "mm":
            return lambda: torch.mm(a, b)
        c = rand(n) if op == "addmm" else rand(m, n)
        return lambda: torch.addmm(c, a, b)
    if op == "bmm":
        bs, m, k, n = dims
        a, b = rand(bs, m, k), rand(bs, k, n)
        return lambda: torch.bmm(a, b)
    if op in ("sdpa_fwd", "sdpa_bwd"):
        q, k, v = (rand(*dims).requires_grad_(op == "sdpa_bwd") for _ in range(3))
        if op == "sdpa_fwd":
            return lambda: F.scaled_dot_product_attention(q, k, v)
        out = F.scaled_dot_product_attention(q, k, v)
        g = torch.randn_like(out)
        return lambda: torch.autograd.grad(out, (q, k, v), g, retain_graph=True)
    if op in ("conv_fwd", "conv_wgrad"):
        b, c, h, w, d, p = dims
        x, weight = rand(b, c, h, w), rand(d, c, p, p)
        if op == "conv_fwd":
            return lambda: F.conv2d(x, weight, stride=p)
        g = rand(b, d, h // p, w // p)
        return lambda: torch.ops.aten.convolution_backward(g, x, weight, None, [p, p], [0, 0], [1, 1], False, [0, 0],
                                                           1, [False, True, False])  # fmt: skip
    raise ValueError(f"unknown product {op}")



def bench_products(keys: Iterable[tuple], dtype, device) -> dict[tuple, float]:
    """Seconds per call of each product `key` (Gemm.key()) with this process's threads, `dtype` and `device`."""
    import torch

    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    return {key: time_per_call(product_fn(key, dtype, device), sync) for key in keys}


def predict(gemms: list[Gemm], per_call: dict[tuple, float]) -> dict[str, float]:
    """Predicted ms per category (count x seconds per call of each product)."""
    out = dict.fromkeys(CATEGORIES, 0.0)
    for g in gemms:
        out[g.category] += 1e3 * g.count * per_call[g.key()]
    return out


# ---------------------------------------------------------------------------------------------- the measured step
class PartTimer:
    """Wraps a DeepSpeed engine's forward, backward and step (on the instance) in perf_counter splits and profiler
    ranges; `restore()` puts the methods back."""

    def __init__(self, engine, sync: Callable[[], None]) -> None:
        self.engine, self.sync = engine, sync
        self.t = dict.fromkeys(PARTS, 0.0)
        for attr, part in (("forward", "forward"), ("backward", "backward"), ("step", "optimizer")):
            setattr(engine, attr, self._wrap(getattr(engine, attr), part))

    def _wrap(self, fn, part: str):
        from torch.profiler import record_function

        def wrapped(*args, **kwargs):
            self.sync()
            t0 = time.perf_counter()
            with record_function(RANGE + part):
                out = fn(*args, **kwargs)
                self.sync()
            self.t[part] += time.perf_counter() - t0
            return out

        return wrapped

    def run(self, step: Callable[[], object]) -> dict[str, float]:
        """One step: its wall and its parts', in ms."""
        from torch.profiler import record_function

        self.t = dict.fromkeys(PARTS, 0.0)
        self.sync()
        t0 = time.perf_counter()
        with record_function(RANGE + "step"):
            step()
            self.sync()
        wall = time.perf_counter() - t0
        return {"step": 1e3 * wall, **{k: 1e3 * v for k, v in self.t.items()}}

    def restore(self) -> None:
        for attr in ("forward", "backward", "step"):
            self.engine.__dict__.pop(attr, None)


def saved_for_backward(step: Callable[[], object], params) -> dict[str, int]:
    """Bytes of the distinct storages autograd saves during `step`; `activation_bytes` without the parameters'
    storages (ZeRO's flat buffers included), which are held whether or not backward needs them."""
    import torch

    seen: dict[int, int] = {}

    def pack(t):
        try:
            st = t.untyped_storage()
            seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        except (RuntimeError, NotImplementedError):  # a tensor without a storage (subclass, sparse)
            pass
        return t

    held = {p.untyped_storage().data_ptr() for p in params if p.numel()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return {"total_bytes": sum(seen.values()),
            "activation_bytes": sum(v for ptr, v in seen.items() if ptr not in held)}  # fmt: skip


def model_kwargs(args) -> dict:
    """timm kwargs: --model-kwargs (default: the demo recipe's for the demo model, else none), sized by --img-size."""
    import yaml

    if args.model_kwargs is not None:
        kwargs = yaml.safe_load(args.model_kwargs) or {}
    elif args.model == DEMO_MODEL:
        kwargs = dict(yaml.safe_load(DEMO_RECIPE.read_text())["model"]["kwargs"])
    else:
        kwargs = {}
    if args.img_size is not None:
        kwargs["img_size"] = args.img_size
    kwargs.setdefault("img_size", 224)
    return kwargs


def phase_ranks(args, phase: str, kwargs: dict) -> dict[str, int] | None:
    """{layer: rank} of a LoRA phase: --ranks-json (warmup, lora), else --rank on every target layer."""
    import torch

    from prelora_ds.config.sections import ModelConfig, PreLoRAConfig
    from prelora_ds.engine.model import create_model
    from prelora_ds.lora.inject import target_layers

    if phase == "full":
        return None
    with torch.device("meta"):
        model = create_model(ModelConfig(name=args.model, kwargs=kwargs), args.num_classes, init=False)
    layers = target_layers(model, PreLoRAConfig().target_modules)
    if args.ranks_json and phase != "relora":
        ranks = {k: int(v) for k, v in json.loads(Path(args.ranks_json).read_text()).items()}
        names = {n for n, _ in model.named_modules()}
        unknown = sorted(set(ranks) - names)
        if unknown:
            raise SystemExit(f"--ranks-json: {unknown[:4]} are not layers of {args.model} {kwargs}")
        return ranks
    return {n: args.rank for n in layers}


def local_ranks(world: int) -> int:
    """Ranks on this node (torchrun's LOCAL_WORLD_SIZE, the deepspeed launcher's LOCAL_SIZE, else the world)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or world)



@dataclass
class PhaseRun:
    """One phase's Trainer on its fixed micro batch, the products of its step (the count) and its rounds."""

    name: str
    trainer: object
    timer: PartTimer
    step: Callable[[], object]
    ranks: dict[str, int] | None
    gemms: list[Gemm]
    flops_check: dict
    saved: dict
    rounds: list[dict] = field(default_factory=list)


def build_phase(args, phase: str, threads: int | None) -> PhaseRun:
    """The Trainer built in `phase` on synthetic images, --warmup steps run, then one step with shapes (the count,
    checked against the profiler's FLOPs) and one with saved tensors."""
    import torch
    from torch.profiler import profile

    from prelora_ds.testing import harness

    kwargs = model_kwargs(args)
    ranks = phase_ranks(args, phase, kwargs)
    rank, _, world = harness.start_distributed()
    img = kwargs["img_size"]
    trainer = harness.synthetic_trainer(
        Path(args.tmp) / f"{phase}_rank{rank}", model=args.model, model_kwargs=kwargs, img_size=img,
        ds_config=Path(args.ds_config), ds_changes={"gradient_accumulation_steps": 1, "train_batch_size": None},
        micro_batch=args.batch_size, train_size=args.batch_size * world * 4, val_size=world,
        num_classes=args.num_classes, first_phase=phase, start_ranks=ranks, num_threads=threads,
        train={"lr_warmup_steps": 0, "epochs": 1000}, prelora={"lora_layer": args.lora_layer},
    )  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    batch = [(torch.randn(args.batch_size, 3, img, img, generator=gen),
              torch.randint(0, args.num_classes, (args.batch_size,), generator=gen))]  # fmt: skip

    def step():
        trainer.train_step(batch)

    timer = PartTimer(trainer.engine, torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None))
    for _ in range(args.warmup):
        timer.run(step)
    recorder = ShapeRecorder(trainer.engine.module)
    with profile(activities=activities(), record_shapes=True, with_flops=True) as prof:
        timer.run(step)
    recorder.remove()
    gemms = merge_counts(recorder.gemms)
    counted, analytic = profiler_flops(events_of(prof, torch.cuda.is_available())), profiler_comparable_flops(gemms)
    check = {"profiler_mm_addmm_bmm": counted, "analytic_mm_addmm_bmm": analytic, "equal": counted == analytic}
    saved = saved_for_backward(lambda: timer.run(step), list(trainer.engine.module.parameters()))
    return PhaseRun(phase, trainer, timer, step, ranks, gemms, check, saved)


def activities() -> list:
    """What the profiler records: the host, and on a GPU the device."""
    import torch
    from torch.profiler import ProfilerActivity

    return [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])


def measure_step(run: PhaseRun) -> dict:
    """An untimed step (the phase's engine back in the caches after the other phases' and the microbenchmark's
    work, as in training, where a phase's steps follow each other), one timed step, then the same step under the
    profiler (its ops, their shapes matched to the count's categories, the collectives, the time between ops).
    A barrier before each measured step: the ranks start it together, so no rank's step waits in a collective for
    another's bookkeeping or microbenchmark."""
    import torch
    from torch.profiler import profile

    from prelora_ds.distributed import collectives

    gc.collect()  # the profiler's events of the last step are garbage: no collection of them inside a step
    run.timer.run(run.step)
    collectives.barrier()
    timed = run.timer.run(run.step)
    timed["loop"] = timed["step"] - sum(timed[p] for p in PARTS)
    collectives.barrier()
    with profile(activities=activities(), record_shapes=True) as prof:
        walls = run.timer.run(run.step)
    events = events_of(prof, torch.cuda.is_available())
    (ops,) = analyse_steps(events)
    ops["between_ops_ms"] = (walls["forward"] + walls["backward"] - ops["gemm_ms"] - ops["non_gemm_ms"]
                             - ops["comm_forward_ms"] - ops["comm_backward_ms"])  # fmt: skip
    return {"timed": timed, "profiled_step": walls["step"], "ops": ops,
            "gemm_measured": measured_by_category(events, run.gemms)}  # fmt: skip


def round_row(measured: dict, gemms: list[Gemm], per_call: dict[tuple, float]) -> dict:
    """One round of one phase: its parts (ms), their accounting and its products' seconds per call."""
    t, ops, predicted = measured["timed"], measured["ops"], predict(gemms, per_call)
    m = {k: t[k] for k in ("step", *PARTS, "loop")}
    m.update(gemm_measured=ops["gemm_ms"], gemm_predicted=sum(predicted.values()), non_gemm=ops["non_gemm_ms"],
             between_ops=ops["between_ops_ms"])  # fmt: skip
    m.update({f"comm_{n}": ops[f"comm_{n}_ms"] for n in (*PARTS, "loop")})
    return {"m": m, "acc": account(m), "predicted": predicted, "measured": measured["gemm_measured"],
            "profiled_step": measured["profiled_step"], "non_gemm_ops": dict(ops["non_gemm_ops"]),
            "per_call": {g.key(): per_call[g.key()] for g in gemms}}  # fmt: skip


def medians(dicts: list[dict]) -> dict[str, float]:
    return {k: statistics.median(d[k] for d in dicts) for k in dicts[0]}


def summary(run: PhaseRun, rank: int, world: int) -> dict:
    """A phase's result: the median over rounds of every part, of its accounting and of each category's products."""
    import torch

    rows = run.rounds
    trainable, total = run.trainer.phases.count_params()
    flops = flops_by_category(run.gemms)
    predicted, ops = medians([r["predicted"] for r in rows]), defaultdict(float)
    for r in rows:
        for name, v in r["non_gemm_ops"].items():
            ops[name] += v / len(rows)
    return {
        "phase": run.name, "rank": rank, "world": world,
        "threads": None if torch.cuda.is_available() else torch.get_num_threads(),
        "dtype": str(run.trainer.phases.dtype), "trainable_params": trainable, "total_params": total,
        "lora_ranks": sorted(set(run.ranks.values())) if run.ranks else None,
        "median_ms": medians([r["m"] for r in rows]), "accounting_ms": medians([r["acc"] for r in rows]),
        "rounds": [{"m": r["m"], "acc": r["acc"]} for r in rows],
        "profiled_step_ms": statistics.median(r["profiled_step"] for r in rows),
        "top_non_gemm_ms": sorted(([k, round(v, 4)] for k, v in ops.items()), key=lambda kv: -kv[1])[:15],
        "gemm_gflop": {k: v / 1e9 for k, v in flops.items()}, "gemm_gflop_total": sum(flops.values()) / 1e9,
        "gemm_predicted_ms": predicted, "gemm_measured_ms": medians([r["measured"] for r in rows]),
        "gemm_rate_gflops": {k: flops[k] / 1e6 / predicted[k] for k in CATEGORIES if predicted[k]}
        | {"all": sum(flops.values()) / 1e6 / sum(predicted.values())},
        "products": [{**asdict(g), "flops": g.flops,
                      "ms_per_call": 1e3 * statistics.median(r["per_call"][g.key()] for r in rows)} for g in run.gemms],
        "flops_check": run.flops_check, "saved_for_backward": run.saved,
    }  # fmt: skip


def profile_phases(args) -> dict:
    """Every phase's Trainer built in this process, then --steps rounds: in each, every phase's timed and profiled
    step (the phases in an order rotated each round), then the microbenchmark of every phase's products. Each
    round accounts for each phase's step from parts measured within it; the result is their medians."""
    import torch

    from prelora_ds.distributed import collectives
    from prelora_ds.testing import harness

    rank, _, world = harness.start_distributed()
    threads = None if torch.cuda.is_available() else args.threads or max(1, (os.cpu_count() or 1) // local_ranks(world))
    runs = [build_phase(args, phase, threads) for phase in args.phases]
    dtype, device = runs[0].trainer.phases.dtype, runs[0].trainer.engine.device
    keys = sorted({g.key() for r in runs for g in r.gemms}, key=repr)  # the same product once for every phase
    for i in range(args.steps):
        order = runs[i % len(runs):] + runs[:i % len(runs)]  # no phase always runs right after the microbenchmark
        measured = {r.name: measure_step(r) for r in order}
        collectives.barrier()  # the ranks time their products together, as they ran the steps
        per_call = bench_products(keys, dtype, device)
        for r in runs:
            r.rounds.append(round_row(measured[r.name], r.gemms, per_call))
        if rank == 0:
            print(f"round {i + 1}/{args.steps}: " + ", ".join(f"{r.name} {r.rounds[-1]['m']['step']:.1f} ms"
                                                              for r in runs), file=sys.stderr, flush=True)  # fmt: skip
    result = header(args, world)
    result["rank"] = rank
    for r in runs:
        mine = summary(r, rank, world)
        r.timer.restore()
        r.trainer.close()
        gathered = collectives.all_gather_object(mine)
        result["phases"][r.name] = gathered[0]
        result["per_rank"][r.name] = [{"rank": g["rank"], "median_ms": g["median_ms"]} for g in gathered]
    return result


# ---------------------------------------------------------------------------------------------- runs and tables
def table(result: dict) -> str:
    """The markdown tables of a result: the step accounted per phase, then the GEMM FLOPs per category."""
    phases = result["phases"]
    full = phases.get("full", {}).get("median_ms", {}).get("step")
    rows = ["| phase | step ms | vs full | forward | backward | optimizer | comm | loop | GEMM ms | GEMM GFLOP | "
            "pred. GEMM ms | non-GEMM ms | accounted ms | % of step | between ops ms | % with it | saved MiB |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, p in phases.items():
        m, a = p["median_ms"], p["accounting_ms"]
        vs = f"{m['step'] / full:.2f}" if full else "-"
        rows.append(
            f"| {name} | {m['step']:.1f} | {vs} | {m['forward']:.1f} | {m['backward']:.1f} | "
            f"{a['optimizer_excl_comm']:.1f} | {a['comm']:.1f} | {a['loop_excl_comm']:.1f} | {m['gemm_measured']:.1f} "
            f"| {p['gemm_gflop_total']:.2f} | {m['gemm_predicted']:.1f} | {m['non_gemm']:.1f} | {a['accounted']:.1f} "
            f"| {a['accounted_pct']:.0f} | {a['between_ops']:.1f} | {a['with_between_ops_pct']:.0f} | "
            f"{p['saved_for_backward']['activation_bytes'] / 2**20:.1f} |"
        )
    overhead = ", ".join(f"{100 * (p['profiled_step_ms'] / p['median_ms']['step'] - 1):+.0f} %"
                         for p in phases.values())
    rows += ["", "Medians over the rounds, ms. optimizer and loop: less the communication inside them; comm: every "
             "collective of the step; accounted: pred. GEMM + non-GEMM + comm + optimizer + loop; between ops: forward "
             "+ backward outside every profiled op and collective (Python, hooks; in the profiled steps); saved: "
             "activations saved for backward (MiB). Under the profiler the steps took "
             + overhead + " (" + ", ".join(phases) + "): the op times carry part of that overhead.",
             "", "GEMM GFLOP per step by category (analytic count), the microbenchmark's rate over them, and whether "
             "the count of mm/addmm/bmm equals the profiler's:", "",
             "| phase | " + " | ".join(CATEGORIES) + " | GFLOP/s | = profiler |",
             "|---|" + "---|" * (len(CATEGORIES) + 2)]  # fmt: skip
    for name, p in phases.items():
        cells = " | ".join(f"{p['gemm_gflop'][c]:.3g}" for c in CATEGORIES)
        rows.append(f"| {name} | {cells} | {p['gemm_rate_gflops']['all']:.1f} | {p['flops_check']['equal']} |")
    return "\n".join(rows)


def write_result(args, result: dict) -> None:
    md = table(result)
    result["table_md"] = md
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    print(md, flush=True)


def header(args, world: int) -> dict:
    import torch

    return {"model": args.model, "model_kwargs": model_kwargs(args), "batch_size": args.batch_size,
            "lora_layer": args.lora_layer, "rank": args.rank, "ranks_json": args.ranks_json, "world": world,
            "steps": args.steps, "warmup": args.warmup, "ds_config": Path(args.ds_config).name,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, "phases": {}, "per_rank": {}}  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--model", default=DEMO_MODEL, help="timm model name")
    p.add_argument("--model-kwargs", default=None,
                   help="timm kwargs, YAML (default: recipes/demo.yaml's model.kwargs for the demo model, else none)")
    p.add_argument("--img-size", type=int, default=None, help="image side in px: sizes the model and the synthetic "
                   "inputs (default: the model kwargs' img_size, else 224)")
    p.add_argument("--batch-size", type=int, default=32, help="micro batch per rank (no accumulation)")
    p.add_argument("--num-classes", type=int, default=10, help="classes of the head")
    p.add_argument("--phases", nargs="+", default=["full", "warmup", "lora"],
                   choices=["full", "warmup", "lora", "relora"], help="phases to measure (default: full warmup lora)")
    p.add_argument("--rank", type=int, default=32, help="LoRA rank on every target layer (relora always; warmup and "
                   "lora unless --ranks-json)")
    p.add_argument("--ranks-json", default=None, help="a run's ranks.json ({layer: rank}) for warmup and lora "
                   "(default: none, --rank everywhere)")
    p.add_argument("--lora-layer", choices=["merged", "peft"], default="merged", help="prelora.lora_layer")
    p.add_argument("--steps", type=int, default=10, help="rounds: in each, every phase's timed step, its profiled "
                   "step and the microbenchmark of the products")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps of each phase first")
    p.add_argument("--ds-config", default=None, help="DeepSpeed config (default: ds_configs/cpu_zero2_fp32.json, the "
                   "demo's, on CPU; ds_configs/gpu_single_bf16.json on GPU); micro batch and accumulation replaced")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per rank on CPU (default: the cores divided by the ranks on this node)")
    p.add_argument("--procs", type=int, default=1, help="ranks, when run by python: more than 1 launches this tool "
                   "through deepspeed (gloo on CPU); under a launcher the launcher's world is used")
    p.add_argument("--out", default=None, help="also write the JSON result here (default: only the tables printed)")
    p.add_argument("--tmp", default="/tmp/prelora_profile", help="the Trainers' output folders")
    return p


def main() -> None:
    parser = build_parser()
    args, rest = parser.parse_known_args()  # the deepspeed launcher appends --local_rank
    unknown = [a for a in rest if not a.startswith("--local_rank")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if len(set(args.phases)) != len(args.phases):
        parser.error(f"--phases: each phase once, not {' '.join(args.phases)}")
    if args.procs > 1 and "LOCAL_RANK" not in os.environ:  # the whole tool again, as N launched ranks
        from prelora_ds.testing.harness import deepspeed_cmd, job_env

        cmd = deepspeed_cmd(*sys.argv[1:], "--procs", "1", ranks=args.procs, script=__file__)
        raise SystemExit(subprocess.run(cmd, cwd=ROOT, env=job_env()).returncode)
    if args.ds_config is None:
        import torch

        name = "gpu_single_bf16.json" if torch.cuda.is_available() else "cpu_zero2_fp32.json"
        args.ds_config = str(ROOT / "ds_configs" / name)
    args.ds_config, args.tmp = str(Path(args.ds_config).resolve()), str(Path(args.tmp).resolve())
    if args.ranks_json:
        args.ranks_json = str(Path(args.ranks_json).resolve())
    Path(args.tmp).mkdir(parents=True, exist_ok=True)
    result = profile_phases(args)
    if result.pop("rank") == 0:
        write_result(args, result)


if __name__ == "__main__":
    main()
    gc.freeze()  # no collections over every library's objects at exit (prelora_ds.train.cli)
