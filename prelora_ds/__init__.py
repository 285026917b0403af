"""prelora_ds: PreLoRA pre-training of Vision Transformers on DeepSpeed ZeRO (stage 2 by default, every stage runs).

Full-parameter training until a partial-convergence test on per-module weight norms passes, then an
in-process switch to per-layer-rank LoRA (PEFT), a joint warmup, and LoRA-only training.
"""

__version__ = "0.1.0"
