"""Algorithm 2 of the PreLoRA paper: per-layer LoRA rank assignment (docs/design.md §3).

Pure functions on plain numbers. Input: for each target module, the percent change of each layer's weight
norm between the last two windows (``convergence.layer_changes``). Layers that still move get higher
ranks: min-max scale the changes of a module to ``[0, 1]``, then pick
``R[min(floor(x * |R|), |R| - 1)]`` from the candidate ranks ``R`` (powers of two, ``r_min..r_max``).
If every layer of a module changed equally, all get the middle rank ``R[(|R| - 1) // 2]``.

Infinite changes (a norm that was exactly 0 in the previous window, see ``convergence``) follow the
formula's limit: with ``max = inf`` and a finite ``min``, infinite layers get ``x = 1`` (``r_max``) and
finite ones ``x = 0`` (``r_min``); if all are infinite, ``max == min`` and all get the middle rank.
NaN or negative changes raise ``ValueError``.

The result becomes PEFT ``rank_pattern`` / ``alpha_pattern`` keys ``"^" + re.escape(name) + "$"``, so
``blocks.1.attn.qkv`` cannot match ``blocks.11.attn.qkv``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

__all__ = ["assign_ranks", "candidate_ranks", "module_bounds", "rank_pattern", "ranks_by_module_name", "scaled_rank"]


def _is_pow2(n: object) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n > 0 and n & (n - 1) == 0


def candidate_ranks(r_min: int = 8, r_max: int = 64) -> list[int]:
    """Every power of two from ``r_min`` to ``r_max`` inclusive (defaults: ``[8, 16, 32, 64]``)."""
    for name, value in (("r_min", r_min), ("r_max", r_max)):
        if not _is_pow2(value):
            raise ValueError(f"{name}={value!r} is not a power of two (e.g. 4, 8, 16, 32, 64).")
    if r_min > r_max:
        raise ValueError(f"r_min={r_min} is larger than r_max={r_max}.")
    out = [r_min]
    while out[-1] < r_max:
        out.append(out[-1] * 2)
    return out


def scaled_rank(rank: int, width: int, reference_width: int) -> int:
    """``rank`` stated for a layer ``reference_width`` wide, for a layer ``width`` wide: the power of two nearest
    (in log2, halves up) to ``rank * width / reference_width``, at least 1. 8 and 64 at 1024 (the paper's ViT-L)
    are 2 and 16 at 192 (ViT-Tiny), 4 and 32 at 384, 6 and 48 would not be powers of two at 768: 8 and 64."""
    if width <= 0 or reference_width <= 0:
        raise ValueError(f"widths must be positive, got width={width}, reference_width={reference_width}.")
    return 2 ** max(0, math.floor(math.log2(rank * width / reference_width) + 0.5))


def module_bounds(
    r_min: int, r_max: int, widths: Mapping[str, int], reference_width: int | None
) -> dict[str, tuple[int, int]]:
    """Each module's candidate-rank bounds: ``(r_min, r_max)`` as written when ``reference_width`` is None, else
    both scaled to the module's width (``scaled_rank``). ``widths[module]``: min(in, out features) of its layers."""
    if reference_width is None:
        return {m: (r_min, r_max) for m in widths}
    return {m: (scaled_rank(r_min, w, reference_width), scaled_rank(r_max, w, reference_width))
            for m, w in widths.items()}  # fmt: skip


def _scaled(values: Sequence[float]) -> list[float] | None:
    """Min-max scale to [0, 1]; None when max == min (the caller gives the middle rank)."""
    lo, hi = min(values), max(values)
    if lo == hi:
        return None
    if math.isinf(hi):  # limit of (v - lo) / (hi - lo) as hi -> inf
        return [1.0 if math.isinf(v) else 0.0 for v in values]
    return [(v - lo) / (hi - lo) for v in values]


def assign_ranks(
    changes: Mapping[str, Sequence[float]], r_min: int = 8, r_max: int = 64,
    bounds: Mapping[str, tuple[int, int]] | None = None,
) -> dict[str, list[int]]:
    """Algorithm 2. changes[module][l] = percent change of layer l between the last two windows. ``bounds``: a
    module's own (r_min, r_max) (``module_bounds``), in place of the shared pair."""
    out: dict[str, list[int]] = {}
    for m, raw in changes.items():
        ranks = candidate_ranks(*(bounds[m] if bounds is not None else (r_min, r_max)))
        n = len(ranks)
        values = [float(v) for v in raw]
        if not values:
            raise ValueError(f"module {m!r} has no layers to assign ranks to.")
        bad = [v for v in values if math.isnan(v) or v < 0]
        if bad:
            raise ValueError(f"module {m!r}: changes must be non-negative percentages, got {bad[0]}.")
        xs = _scaled(values)
        if xs is None:
            out[m] = [ranks[(n - 1) // 2]] * len(values)
        else:
            out[m] = [ranks[min(math.floor(x * n), n - 1)] for x in xs]
    return out


def ranks_by_module_name(
    layer_names: Mapping[str, Sequence[str]], ranks: Mapping[str, Sequence[int]]
) -> dict[str, int]:
    """Full module name (e.g. ``blocks.3.attn.qkv``) -> rank: the content of ``ranks.json``.

    ``layer_names[module][l]`` is the full name of layer ``l`` of module key ``module`` (e.g. ``attn.qkv``),
    in the same order as ``ranks[module]``. Raises ``ValueError`` on mismatched keys, lengths or duplicates.
    """
    if set(layer_names) != set(ranks):
        raise ValueError(f"module keys differ: names for {sorted(layer_names)}, ranks for {sorted(ranks)}.")
    out: dict[str, int] = {}
    for m, names in layer_names.items():
        rs = ranks[m]
        if len(names) != len(rs):
            raise ValueError(f"module {m!r}: {len(names)} layer names but {len(rs)} ranks.")
        for name, r in zip(names, rs, strict=True):
            if name in out:
                raise ValueError(f"module name {name!r} appears twice.")
            if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
                raise ValueError(f"rank of {name!r} must be a positive int, got {r!r}.")
            out[name] = r
    return out


def rank_pattern(
    layer_names: Mapping[str, Sequence[str]], ranks: Mapping[str, Sequence[int]], alpha_ratio: float
) -> tuple[dict[str, int], dict[str, float]]:
    """PEFT ``LoraConfig(rank_pattern=..., alpha_pattern=...)`` for per-layer ranks.

    Keys are ``"^" + re.escape(full_name) + "$"``: PEFT matches pattern keys as regexes against module
    names (as a suffix), so an unanchored ``blocks.1.attn.qkv`` would also hit ``blocks.11.attn.qkv``.
    ``alpha = alpha_ratio * rank`` keeps the LoRA scale ``alpha / r`` the same for every layer.
    """
    if not (math.isfinite(alpha_ratio) and alpha_ratio > 0):
        raise ValueError(f"alpha_ratio must be a positive number, got {alpha_ratio}.")
    by_name = ranks_by_module_name(layer_names, ranks)
    r_pat = {"^" + re.escape(name) + "$": r for name, r in by_name.items()}
    a_pat = {key: float(alpha_ratio * r) for key, r in r_pat.items()}
    return r_pat, a_pat
