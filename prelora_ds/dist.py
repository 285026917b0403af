"""Public contract (docs/design.md §7): the package's collectives under their historical import path; the code is
`distributed.collectives`."""

from prelora_ds.distributed.collectives import agree, all_reduce_sum

__all__ = ["agree", "all_reduce_sum"]
