"""`headend demo` runs on embedded defaults on a machine with nothing but the package."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from headend.cli import main
from headend.storage.outbox import Outbox, Pending
from tests.factories import intervals


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


def test_quarantine_list_and_requeue_from_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    site = tmp_path / "site.toml"
    site.write_text(f'[storage]\nbackend = "sqlite"\noutbox = "{tmp_path / "outbox.sqlite"}"\n'
                    f'[storage.sqlite]\npath = "{tmp_path / "readings.sqlite"}"\n')  # fmt: skip
    outbox = Outbox(tmp_path / "outbox.sqlite")
    asyncio.run(outbox.accept(list(intervals(1, 0, 2))))
    outbox.quarantine_sync(outbox.take_sync(10), "store said no")
    outbox.quarantine_sync([Pending(-1, None, "mqtt/dc-1 ff00", 0)], "does not parse")
    assert main(["quarantine", "list", "--config", str(site)]) == 0
    listing = capsys.readouterr().out
    assert "2 reading(s)" in listing and "raw message" in listing and "store said no" in listing
    assert main(["quarantine", "requeue", "--config", str(site)]) == 0
    assert "requeued 2 reading(s)" in capsys.readouterr().out
    assert outbox.depth() == 2 and len(outbox.quarantine_rows()) == 1
    outbox.close()
