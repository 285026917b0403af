"""What a new user of tools/ sees: every script's `--help` runs (without importing torch) and states each option's
default; `--img-size` sizes the model, not only the inputs (a timm ViT built at 224 px rejects a 112 px image)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from prelora_ds.testing.harness import REPO, load_tool

TOOLS = sorted(p.name for p in (REPO / "tools").glob("*.py"))
OPTION = re.compile(r"^  (-{1,2}[\w-]+)")  # an option's first line in the options section


def option_helps(text: str) -> dict[str, str]:
    """Each option's help block in `--help` output (its first line and the wrapped lines under it)."""
    helps: dict[str, str] = {}
    current = None
    lines = text.splitlines()
    for line in lines[lines.index("options:") + 1:]:
        if not line.startswith(" "):  # a blank line or the next section
            current = None
        elif match := OPTION.match(line):
            current = match.group(1)
            helps[current] = line.strip()
        elif current is not None:
            helps[current] += " " + line.strip()
    return helps


def test_the_tools_are_found():
    assert {"bench_phases.py", "bench_zero.py", "gpu_check.py", "run_study.py"} <= set(TOOLS)


@pytest.mark.parametrize("name", TOOLS)
def test_help_states_every_default_without_torch(name):
    env = {**os.environ, "COLUMNS": "120"}
    proc = subprocess.run([sys.executable, "-X", "importtime", f"tools/{name}", "--help"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    helps = option_helps(proc.stdout)
    helps.pop("-h")
    assert helps, proc.stdout
    missing = {opt: text for opt, text in helps.items() if "default" not in text}
    assert not missing, f"{name}: options whose --help does not say their default: {missing}"
    assert "(default: None)" not in proc.stdout  # a default computed later is said in words
    assert "--worker" not in helps  # the internal options stay hidden
    imported = {line.rpartition("|")[2].strip() for line in proc.stderr.splitlines() if line.startswith("import time")}
    assert "torch" not in imported, f"{name} --help imports torch (seconds before the help shows)"


@pytest.fixture(scope="module")
def tiny_vit():
    """vit_tiny at --img-size 112 checked on the meta device: built at that size and taking a 112 px batch."""
    import torch

    def check(model) -> None:
        assert tuple(model.patch_embed.img_size) == (112, 112)
        with torch.device("meta"):
            assert tuple(model(torch.empty(2, 3, 112, 112)).shape) == (2, 10)

    return check


def test_bench_phases_sizes_both_models_by_img_size(monkeypatch, tiny_vit):
    import torch

    from prelora_ds.config.sections import ModelConfig
    from prelora_ds.engine.model import create_model
    from prelora_ds.testing import harness

    bench = load_tool("bench_phases")
    args = bench.build_parser().parse_args(["--model", "vit_tiny_patch16_224", "--img-size", "112",
                                            "--ds-config", str(REPO / "ds_configs" / "cpu_zero2_fp32.json")])
    seen = {}
    monkeypatch.setattr(harness, "synthetic_trainer", lambda out_dir, **kw: seen.update(kw))
    bench.ours_trainer(args)  # what `ours` hands the package's Trainer
    assert seen["img_size"] == 112
    with torch.device("meta"):
        tiny_vit(create_model(ModelConfig(name=seen["model"], kwargs=seen["model_kwargs"]), 10, init=False))
        tiny_vit(bench.ours_model(args, init=False))  # the layers `ours` puts LoRA on
        tiny_vit(bench.bare_model(args))


def test_gpu_check_sizes_the_model_by_img_size(tiny_vit):
    import timm
    import torch

    check = load_tool("gpu_check")
    assert check.sized_kwargs("{}", 112) == {"img_size": 112}
    assert check.sized_kwargs("{depth: 4, img_size: 112}", 112) == {"depth": 4, "img_size": 112}
    for bad in ("{img_size: 32}", "[1, 2]"):
        with pytest.raises(ValueError, match="--model-kwargs"):
            check.sized_kwargs(bad, 112)
    with torch.device("meta"):  # the model export_top1 loads the export into, as the run's model.kwargs built it
        tiny_vit(timm.create_model("vit_tiny_patch16_224", num_classes=10, **check.sized_kwargs("{}", 112)))
