"""Public contract (docs/design.md §7): Algorithm 1 under its historical import path; the code is
`algorithm.convergence`."""

from prelora_ds.algorithm.convergence import partial_convergence, percent_change

__all__ = ["partial_convergence", "percent_change"]
