"""model.qkv: the split q/k/v layout is timm's own split attention, the same function as the fused one, and
its merged export is a plain fused timm state dict."""

from __future__ import annotations

import timm
import torch

from prelora_ds.config.sections import SPLIT_TARGETS, ModelConfig, PreLoRAConfig
from prelora_ds.engine.model import create_model, fuse_qkv, split_qkv
from prelora_ds.lora.inject import PHASES, build_structure, canonical_name, target_layers
from prelora_ds.lora.merge import lora_scales, save_merged

KWARGS = {"img_size": 16, "patch_size": 4, "depth": 2, "embed_dim": 64, "num_heads": 2}


def model(qkv: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model(ModelConfig(name="vit_tiny_patch16_224", kwargs=KWARGS, qkv=qkv), 10).eval()


def test_split_layout_is_the_fused_function_at_the_same_seed():
    fused, split = model("fused"), model("split")
    names = {n for n, _ in split.named_modules()}
    assert {"blocks.0.attn.q_proj", "blocks.0.attn.k_proj", "blocks.0.attn.v_proj"} <= names
    assert "blocks.0.attn.qkv" not in names
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(split(x), fused(x), rtol=1e-5, atol=1e-5)
    assert model("split", seed=1).state_dict()["blocks.0.attn.q_proj.weight"].ne(
        split.state_dict()["blocks.0.attn.q_proj.weight"]).any()  # the seed matters


def test_fused_and_split_state_dicts_convert_both_ways():
    fused = model("fused").state_dict()
    split = split_qkv(fused)
    assert split["blocks.1.attn.k_proj.weight"].shape == (64, 64) and "blocks.1.attn.qkv.bias" not in split
    torch.testing.assert_close(split["blocks.1.attn.v_proj.bias"], fused["blocks.1.attn.qkv.bias"][128:])
    back = fuse_qkv(split)
    assert back.keys() == fused.keys() and all(torch.equal(back[k], fused[k]) for k in fused)
    model("split").load_state_dict(split)  # fused timm weights load into the split layout


def test_merged_export_of_a_split_lora_model_is_a_plain_fused_timm_model(tmp_path):
    """Per-layer LoRA on q, k, v, proj, fc1, fc2 (B made non-zero), merged in fp32 and fused: a timm model that
    `timm.create_model(name).load_state_dict` takes computes what the trained PEFT model computes."""
    split = model("split")
    layers = target_layers(split, SPLIT_TARGETS)
    ranks = {n: (8 if "q_proj" in n else 16) for n in layers}
    peft = build_structure(split, PHASES["warmup"], ranks, PreLoRAConfig(target_modules=SPLIT_TARGETS)).eval()
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
    state = {canonical_name(n): p.detach().float() for n, p in peft.named_parameters()}
    save_merged(tmp_path / "m.safetensors", state, lora_scales(peft))
    from safetensors.torch import load_file

    plain = timm.create_model("vit_tiny_patch16_224", num_classes=10, **KWARGS).eval()
    plain.load_state_dict(load_file(str(tmp_path / "m.safetensors")))  # strict
    x = torch.randn(4, 3, 16, 16, generator=gen)
    with torch.no_grad():
        trained, exported = peft(x), plain(x)
    assert (trained - model("split")(x)).abs().max() > 1e-3  # the LoRA deltas change the function
    torch.testing.assert_close(exported, trained, rtol=1e-4, atol=1e-5)


def test_layout_only_model_has_the_initialised_models_names_and_shapes_and_draws_nothing():
    """`init=False` (for the meta device and ZeRO-3's partitioned build) gives the same parameters by name and shape
    in either qkv layout, and on the meta device draws no random numbers."""
    for qkv in ("fused", "split"):
        cfg = ModelConfig(name="vit_tiny_patch16_224", kwargs=KWARGS, qkv=qkv)
        state = torch.get_rng_state()
        with torch.device("meta"):
            layout = create_model(cfg, 10, init=False)
        assert torch.equal(torch.get_rng_state(), state)
        full = {n: p.shape for n, p in create_model(cfg, 10).named_parameters()}
        assert {n: p.shape for n, p in layout.named_parameters()} == full


def test_compute_dtype_and_the_cast_of_unpartitioned_tensors():
    from prelora_ds.config.deepspeed import compute_dtype
    from prelora_ds.engine.phase_engine import low_precision
    from prelora_ds.engine.zero import cast_unpartitioned, local_elements

    assert compute_dtype({"bf16": {"enabled": True}}) == torch.bfloat16
    assert compute_dtype({"fp16": {"enabled": True}}) == torch.float16
    assert compute_dtype({"bf16": {"enabled": False}}) == torch.float32 and not low_precision({})
    m = model("fused")
    m.register_buffer("steps", torch.zeros(2, dtype=torch.long))  # integer buffers keep their dtype
    cast_unpartitioned(m, torch.bfloat16)  # no ZeRO-3 parameter here: every floating tensor is cast
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16} and m.steps.dtype == torch.long
    n = sum(p.numel() for p in m.parameters())
    assert local_elements(m) == (n, n)  # unpartitioned: a rank holds every element
