"""`headend demo` runs on embedded defaults on a machine with nothing but the package."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from headend.cli import main


def test_demo_reads_simulated_meters_of_every_protocol(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], mosquitto_server: object
) -> None:
    # mosquitto_server makes sure the Debian package is there, so the demo includes MQTT.
    assert main(["demo", "--duration", "6", "--dir", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "Readings are in" in out and "readings.sqlite" in out
    assert "Billing view of DLMS-001, last 6 h" in out and "100.0 % actual" in out
    db = sqlite3.connect(tmp_path / "demo" / "readings.sqlite")
    rows = dict(db.execute("SELECT substr(meter, 1, 2), count(*) FROM readings GROUP BY 1").fetchall())
    db.close()
    assert rows["DL"] >= 3 * 96 * 4  # a day of load profile from each DLMS meter
    assert rows["MB"] >= 3 * 3  # register reads from each Modbus meter
    assert rows["DC"] >= 6 * 24  # six hours of intervals from the concentrators' meters


def test_check_config_accepts_the_example(capsys: pytest.CaptureFixture[str]) -> None:
    example = Path(__file__).resolve().parent.parent / "config" / "example.toml"
    assert main(["check-config", str(example)]) == 0
    assert "3 meters, 2 plans" in capsys.readouterr().out
