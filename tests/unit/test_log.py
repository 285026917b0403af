"""The package logger decides what each rank shows: info on rank 0 (stdout), warnings and errors on every rank
(stderr, prefixed), EVERY_RANK and RANK_ZERO as the exceptions."""

from __future__ import annotations

import pytest

from prelora_ds.log import EVERY_RANK, RANK_ZERO, logger, setup_logging


@pytest.fixture(autouse=True)
def _restore():
    yield
    setup_logging()


def emit_all() -> None:
    logger.info("note")
    logger.info("per node", extra=EVERY_RANK)
    logger.warning("careful")
    logger.warning("disk", extra=RANK_ZERO)
    logger.error("broken")


def test_rank_zero_shows_everything(capsys):
    setup_logging(0)
    emit_all()
    out, err = capsys.readouterr()
    assert out.splitlines() == ["note", "per node"]
    assert err.splitlines() == ["prelora-train: warning: careful", "prelora-train: warning: disk",
                                "prelora-train: error: broken"]


def test_other_ranks_show_their_own_trouble_only(capsys):
    setup_logging(3)
    emit_all()
    out, err = capsys.readouterr()
    assert out.splitlines() == ["per node"]
    assert err.splitlines() == ["prelora-train: warning: careful", "prelora-train: error: broken"]


def test_the_rank_comes_from_the_launchers_variables(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    setup_logging()
    logger.info("hidden")
    monkeypatch.delenv("RANK")
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "0")
    setup_logging()
    logger.info("shown")
    assert capsys.readouterr().out.splitlines() == ["shown"]
