"""Public contract (docs/design.md §7): Algorithm 2 under its historical import path; the code is `algorithm.ranks`."""

from prelora_ds.algorithm.ranks import assign_ranks

__all__ = ["assign_ranks"]
