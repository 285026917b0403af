"""tools/profile_phases.py's pure parts: the analytic GEMM count against torch.profiler's own FLOP count of a tiny
ViT's forward and backward, in every phase and LoRA layer kind; the shape matching of the measured GEMM ops; the
reading of profiler events into parts and communication; the accounting arithmetic."""

from __future__ import annotations

import pytest

from prelora_ds.testing.harness import load_tool

pp = load_tool("profile_phases")
RANGE = pp.RANGE
RANKS = {"attn.qkv": 4, "attn.proj": 8, "mlp.fc1": 2, "mlp.fc2": 6}  # a different rank per module


def tiny(phase: str, lora_layer: str, fused: bool):
    """A 2-block ViT (embed 64, 2 heads, 16 px, 4 px patches: 17 tokens) in `phase`'s structure."""
    import timm
    import torch

    from prelora_ds.config.sections import PreLoRAConfig
    from prelora_ds.lora.inject import PHASES, build_structure

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=16, patch_size=4, depth=2,
                              embed_dim=64, num_heads=2)  # fmt: skip
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = fused  # unfused: timm's q @ k^T and attn @ v, bmm ops the profiler counts
    ranks = {f"blocks.{b}.{k}": r for b in range(2) for k, r in RANKS.items()}
    return build_structure(model, PHASES[phase], ranks if phase != "full" else None,
                           PreLoRAConfig(lora_layer=lora_layer))  # fmt: skip


def profiled_step(model):
    """One forward and backward under the profiler (shapes and FLOPs), inside the tool's ranges; the layer shapes."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 3, 16, 16, generator=gen), torch.randint(0, 10, (4,), generator=gen)
    recorder = pp.ShapeRecorder(model)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True, with_flops=True) as prof:
        with record_function(RANGE + "step"):
            with record_function(RANGE + "forward"):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            with record_function(RANGE + "backward"):
                loss.backward()
    recorder.remove()
    return pp.events_of(prof, device=False), pp.merge_counts(recorder.gemms)


CASES = [("full", "merged", False), ("warmup", "merged", False), ("lora", "merged", False),
         ("warmup", "peft", False), ("lora", "peft", False), ("relora", "merged", False), ("lora", "merged", True)]


@pytest.mark.parametrize(("phase", "lora_layer", "fused"), CASES)
def test_the_analytic_count_is_the_profilers(phase, lora_layer, fused):
    """Exact agreement on aten::mm/addmm/bmm (the profiler counts 2 m n k per product, as the count does). The fused
    attention op and the convolution's backward are not counted by the profiler, so they are left out of the sum;
    the convolution's forward it counts under aten::conv2d, which the patch-embedding formula must equal."""
    events, gemms = profiled_step(tiny(phase, lora_layer, fused))
    profiler = sum(e.flops for e in events if e.name in pp.FLOP_OPS)
    assert profiler == pp.profiler_comparable_flops(gemms) > 0
    assert pp.profiler_flops(events) == profiler  # all of them inside the forward and backward ranges
    conv = sum(e.flops for e in events if e.name == "aten::conv2d")
    assert conv == sum(g.flops for g in gemms if g.op == "conv_fwd") > 0
    # merged: M = W + s B A built per call (addmm with a matrix bias); peft: the factor products only
    assert any(g.op == "addmm_full" for g in gemms) == (phase != "full" and lora_layer == "merged")
    by_cat = pp.flops_by_category(gemms)
    assert (by_cat["lora_fwd"] > 0) == (phase != "full")
    assert (by_cat["base_wgrad"] > 0) == (phase in ("full", "warmup"))  # the base trains
    assert by_cat["attn_bwd"] == (5 if fused else 4) * by_cat["attn_fwd"] / 2
    # every GEMM op the profiler saw matches a counted product by its shapes
    measured = pp.measured_by_category(events, gemms)
    assert measured["unmatched"] == 0 and sum(measured.values()) > 0
    step = pp.analyse_steps(events)
    assert len(step) == 1 and step[0]["gemm_ms"] == pytest.approx(sum(measured.values()))


def test_the_lora_formulas_by_hand():
    """One layer, T = 10 rows, 6 -> 4 features, rank 2: the products the docstring lists."""
    T, i, o, r = 10, 6, 4, 2
    peft = pp.peft_lora_gemms(T, i, o, r, x_grad=True)
    assert sum(g.flops for g in peft) == 2 * T * r * (i + o) + 2 * T * r * (2 * o + i) + 2 * T * r * i
    frozen = pp.merged_lora_gemms(T, i, o, r, bias=True, x_grad=True, w_grad=False)
    lora = [g for g in frozen if g.category.startswith("lora")]
    assert sum(g.flops for g in lora) == 2 * o * r * i * 2 + 2 * T * r * (2 * i + 2 * o)
    assert {g.category for g in frozen} == {"base_fwd", "base_dgrad", "lora_fwd", "lora_bwd"}
    warm = pp.merged_lora_gemms(T, i, o, r, bias=True, x_grad=False, w_grad=True)
    assert sum(g.flops for g in warm if g.category == "lora_bwd") == 2 * 2 * o * r * i  # dB, dA from dW
    assert sum(g.flops for g in warm if g.category == "base_wgrad") == 2 * T * i * o


def ev(name, start, end, self_us=None, thread=1, parent=None):
    return pp.Ev(name, thread, start, end, end - start if self_us is None else self_us, parent)


def test_events_into_parts_and_communication():
    """A step 0-100 us: forward 0-30, backward 30-70, optimizer 70-95. A GEMM with a copy inside it; a collective
    on gloo's thread spanning 60-80 (10 us in backward, 10 in the optimizer) with an op of its own; a c10d op on
    the caller's thread whose child is communication too."""
    events = [
        ev(RANGE + "step", 0, 100), ev(RANGE + "forward", 0, 30), ev(RANGE + "backward", 30, 70),
        ev(RANGE + "optimizer", 70, 95),
        ev("aten::addmm", 1, 21, self_us=15), ev("aten::copy_", 5, 10, parent=4),  # 4: the addmm
        ev("aten::gelu", 22, 28),
        ev("aten::mm", 31, 51),
        ev("c10d::allreduce_", 55, 58), ev("aten::chunk", 56, 57, parent=8),  # 8: the c10d op
        ev("gloo:all_reduce", 60, 80, thread=7), ev("aten::copy_", 61, 79, thread=7),
        ev("aten::add_", 71, 90),  # the optimizer's: in its wall, not in the op sums
    ]  # fmt: skip
    (r,) = pp.analyse_steps(events)
    assert r["gemm_ms"] == pytest.approx((15 + 20) / 1e3)
    assert r["non_gemm_ms"] == pytest.approx((5 + 6) / 1e3)
    assert dict(r["non_gemm_ops"]) == pytest.approx({"aten::copy_": 5e-3, "aten::gelu": 6e-3})
    assert r["comm_forward_ms"] == 0
    assert r["comm_backward_ms"] == pytest.approx((3 + 10) / 1e3)  # the c10d op and gloo's 60-70
    assert r["comm_optimizer_ms"] == pytest.approx(10 / 1e3)
    assert r["comm_loop_ms"] == pytest.approx(0, abs=1e-12)
    assert r["comm_ms"] == pytest.approx(23 / 1e3)
    assert pp.union_length([(0, 10), (5, 20), (30, 40)], 8, 35) == 17


def test_the_accounting_arithmetic():
    m = {"step": 200.0, "forward": 60.0, "backward": 110.0, "optimizer": 25.0, "loop": 5.0, "gemm_measured": 100.0,
         "gemm_predicted": 90.0, "non_gemm": 40.0, "comm_forward": 0.0, "comm_backward": 12.0, "comm_optimizer": 8.0,
         "comm_loop": 1.0, "between_ops": 9.0}  # fmt: skip
    a = pp.account(m)
    assert a["comm"] == 21.0
    assert (a["optimizer_excl_comm"], a["loop_excl_comm"]) == (17.0, 4.0)
    assert a["accounted"] == 90.0 + 40.0 + 21.0 + 17.0 + 4.0  # each interval once
    assert a["accounted_pct"] == pytest.approx(86.0) and a["diff_pct"] == pytest.approx(-14.0)
    assert a["with_between_ops_pct"] == pytest.approx(90.5)
    assert a["gemm_prediction_error_pct"] == pytest.approx(-10.0)
    # the predicted GEMM time: count x seconds per call, per category
    gemms = [pp.Gemm("base_fwd", "mm", (2, 3, 4), count=3), pp.Gemm("head", "mm", (2, 3, 4))]
    assert pp.predict(gemms, {("mm", (2, 3, 4), "nn"): 0.002})["base_fwd"] == pytest.approx(6.0)


def test_the_rounds_account_for_every_phase(tmp_path):
    """The tool itself, world size 1, on a 2-block ViT: two phases' Trainers in one process (a trainable base and a
    frozen one; `warmup`'s count is checked above), two rounds. What is exact whatever the machine: every round of
    every phase is there, each round's accounting is the sum of its parts, the count equals the profiler's FLOPs,
    every GEMM op the profiled steps ran matched a counted product, and only `full` has weight gradients."""
    import json
    import subprocess
    import sys

    from prelora_ds.testing.harness import REPO, job_env

    out = tmp_path / "profile.json"
    kwargs = "{img_size: 32, patch_size: 8, depth: 2, embed_dim: 64, num_heads: 2}"
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "profile_phases.py"), "--model-kwargs", kwargs,
                           "--batch-size", "4", "--rank", "4", "--phases", "full", "lora", "--steps", "2",
                           "--warmup", "0", "--threads", "1", "--tmp", str(tmp_path / "tmp"), "--out", str(out)],
                          cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert list(result["phases"]) == ["full", "lora"] and result["world"] == 1
    assert "| lora |" in proc.stdout  # the table printed
    for name, p in result["phases"].items():
        assert len(p["rounds"]) == 2
        for r in p["rounds"]:
            m, acc = r["m"], r["acc"]
            comm = m["comm_forward"] + m["comm_backward"] + m["comm_optimizer"] + m["comm_loop"]
            optimizer, loop = m["optimizer"] - m["comm_optimizer"], m["loop"] - m["comm_loop"]
            assert acc["accounted"] == m["gemm_predicted"] + m["non_gemm"] + comm + optimizer + loop
            assert m["step"] == pytest.approx(m["forward"] + m["backward"] + m["optimizer"] + m["loop"])
        assert p["flops_check"]["equal"]
        assert p["gemm_measured_ms"]["unmatched"] == 0 and p["gemm_measured_ms"]["base_fwd"] > 0
        assert (p["gemm_gflop"]["base_wgrad"] > 0) == (name == "full")
        assert all(g["ms_per_call"] > 0 for g in p["products"])
        assert (p["lora_ranks"] is None) == (name == "full")
        assert p["saved_for_backward"]["activation_bytes"] > 0
