"""The loop state owns the phase (the last phase record) and the ranks; its checkpoint form reads back, also from
checkpoints written before the phase record was typed."""

from __future__ import annotations

from prelora_ds.training.loop_state import LoopState, PhaseRecord


def test_the_phase_is_the_last_record_and_ranks_carry_over():
    state = LoopState()
    assert state.phase == "full" and state.relora_start() is None
    state.start_phase("full", None, 0)
    state.step = 12
    state.start_phase("warmup", {"blocks.0.attn.qkv": 16}, 1)
    state.step = 20
    state.start_phase("lora", None, 2)
    assert state.phase == "lora" and state.ranks == {"blocks.0.attn.qkv": 16}
    assert [(h.name, h.start_step, h.end_step) for h in state.history] == [("full", 0, 12), ("warmup", 12, 20),
                                                                           ("lora", 20, None)]


def test_checkpoint_form_round_trips_and_names_the_phase():
    state = LoopState(step=7, ranks={"a": 8})
    state.start_phase("relora", {"a": 8}, 0)
    state.current.trainable_params = 5
    saved = state.to_dict()
    assert saved["phase"] == "relora" and saved["history"][0]["trainable_params"] == 5
    back = LoopState.from_dict(saved | {"windows": {"loss_windows": []}})  # the trainer adds the windows beside
    assert back == state and back.relora_start() == 7


def test_a_checkpoint_from_before_the_typed_record_loads():
    old = {"step": 30, "epoch": 1, "batch_in_epoch": 8, "phase": "warmup", "ranks": {"a": 32}, "windows": {},
           "history": [{"name": "full", "start_step": 0, "start_epoch": 0, "end_step": 22, "trainable_params": 10,
                        "total_params": 10}, {"name": "warmup", "start_step": 22, "start_epoch": 1}]}
    state = LoopState.from_dict(old)
    assert state.phase == "warmup" and state.step == 30 and state.ranks == {"a": 32}
    assert state.history[1] == PhaseRecord("warmup", 22, 1)
