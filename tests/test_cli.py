"""`headend demo` runs on embedded defaults on a machine with nothing but the package."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from headend.cli import main


def test_demo_writes_sample_reads_through_the_pipeline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--meters", "3", "--days", "2"]) == 0
    out = capsys.readouterr().out
    assert "accepted 576 interval reads" in out
    assert "outbox depth now 0" in out
    db = sqlite3.connect(tmp_path / "var/demo/readings.sqlite")
    assert db.execute("SELECT count(*) FROM readings").fetchone()[0] == 576
    assert db.execute("SELECT count(*) FROM readings WHERE value IS NULL AND quality = '2.5.259'").fetchone()[0] == 1
    db.close()


def test_demo_refuses_a_second_writer_on_the_same_outbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from headend.storage.outbox import Outbox

    monkeypatch.chdir(tmp_path)
    holder = Outbox(tmp_path / "var/demo/outbox.sqlite")
    holder.lock_for_writer()
    assert main(["demo"]) == 2
    holder.close()


def test_check_config_accepts_the_example(capsys: pytest.CaptureFixture[str]) -> None:
    example = Path(__file__).resolve().parent.parent / "config" / "example.toml"
    assert main(["check-config", str(example)]) == 0
    assert "3 meters, 2 plans" in capsys.readouterr().out
