"""`headend commission` against the simulators of every protocol: a clean site passes; each
injected fault gives exactly the expected fail or warn, with the measured value, and no
traceback; a full Modbus scan keeps its time box; the HTML report renders."""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import subprocess
import time
import tomllib
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from headend.commission.checks import Options
from headend.commission.report import FoundMeter, Report
from headend.commission.run import RegisterConflict, Target, commission, register, resolve
from headend.config import Config, DlmsSettings, parse_config
from headend.localservers import MosquittoServer, free_port
from headend.protocols.modbus_maps import shipped_maps
from headend.switching.journal import CommandJournal
from simulators.clock import Clock
from simulators.dlms_meter import DEFAULT_KEYS, HdlcBus, SimulatedDlmsMeter
from simulators.modbus_meter import ModbusSimulator, SimulatedMeter
from simulators.mqtt_concentrator import SimulatedConcentrator
from simulators.ptypair import NullModem

# Screenshots a person can look at after the run (CI keeps the directory).
ARTIFACTS = Path(os.environ.get("HEADEND_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "build" / "artifacts"))


@pytest.fixture(autouse=True)
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Commissioning keeps DLMS invocation counters in ./var/state by default: keep it in tmp."""
    monkeypatch.chdir(tmp_path)


def problems(report: Report) -> set[tuple[str | None, str, str]]:
    """(meter, check, status) of everything that is not a pass or info."""
    return {(c.meter, c.name, c.status) for c in report.checks if c.status in ("warn", "fail")}


def measured(report: Report, meter: str | None, name: str) -> str:
    (check,) = [c for c in report.checks if c.meter == meter and c.name == name]
    return check.measured


async def run(target: Target, cfg: Config | None, auth: DlmsSettings | None = None, **options: Any) -> Report:
    opts = Options(engineer="Ada", site="Substation 7", **{"probe_timeout": 0.3, **options})
    quiet = Console(file=io.StringIO(), width=160)
    return await commission(target, cfg, opts, auth=auth or DlmsSettings(), console=quiet)


# -- DLMS: an HDLC bus over TCP with three meters --------------------------------------------


@pytest.fixture
async def hdlc_site(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[dict[int, SimulatedDlmsMeter], int]]:
    monkeypatch.setenv("BUS_PASSWORD", "12345678")
    clock = Clock()
    meters = {a: SimulatedDlmsMeter(f"H{a}", clock, seed=a, serial=f"LGZ{a:05d}", ct=(200, 5)) for a in (16, 17, 18)}
    bus = HdlcBus(meters)
    port = await bus.start_tcp()
    yield meters, port
    await bus.stop()


def hdlc_config(port: int, **overrides: dict[str, Any]) -> Config:
    meters = []
    for a in (16, 17, 18):
        dlms = {"authentication": "lls", "password_env": "BUS_PASSWORD", "physical": a}
        m: dict[str, Any] = {"id": f"M{a}", "link": "bus", "serial": f"LGZ{a:05d}", "customer": f"C-{a}",
                             "ct": {"primary": 200, "secondary": 5}, "dlms": dlms}  # fmt: skip
        meters.append({**m, **overrides.get(f"M{a}", {})})
    return parse_config({"links": [{"id": "bus", "kind": "tcp", "protocol": "dlms-hdlc", "host": "127.0.0.1",
                                    "port": port, "timeout": "2s"}], "meters": meters})  # fmt: skip


async def test_a_clean_dlms_bus_passes(hdlc_site: tuple[dict[int, SimulatedDlmsMeter], int]) -> None:
    _meters, port = hdlc_site
    cfg = hdlc_config(port)
    report = await run(resolve("bus", cfg), cfg, addresses=list(range(16, 20)))
    assert problems(report) == set() and report.verdict == "pass"
    assert {m.address for m in report.meters} == {"hdlc:16", "hdlc:17", "hdlc:18"}
    assert {m.registry_id for m in report.meters} == {"M16", "M17", "M18"}
    assert measured(report, "M17", "identity") == "serial LGZ00017"
    assert measured(report, "M17", "ct_pt") == "meter programmed x40"
    assert "intervals (100%)" in measured(report, "M17", "profile")
    assert measured(report, None, "discovery").startswith("3 meter(s) at HDLC address(es) 16, 17, 18")


async def test_dlms_faults_each_give_their_failure(hdlc_site: tuple[dict[int, SimulatedDlmsMeter], int]) -> None:
    meters, port = hdlc_site
    meters[16].password = b"something-else"  # the registry's password no longer opens it
    meters[17].serial, meters[18].serial = "LGZ00018", "LGZ00017"  # the two meters were swapped on site
    meters[18].ct = (400, 5)  # programmed x80, registry says x40
    meters[17].faults.clock_offset_s = 7200
    cfg = hdlc_config(port)
    report = await run(resolve("bus", cfg), cfg, addresses=list(range(16, 20)))
    assert problems(report) == {
        ("M16", "handshake", "fail"),
        ("M17", "identity", "fail"), ("M18", "identity", "fail"),
        ("M18", "ct_pt", "fail"),
        ("M17", "clock", "fail"),
    }  # fmt: skip
    handshake = next(c for c in report.checks if c.meter == "M16" and c.name == "handshake")
    assert "wrong password" in handshake.hint
    swap = next(c for c in report.checks if c.meter == "M17" and c.name == "identity")
    assert swap.measured == "serial LGZ00018 answers at hdlc:17" and "booked to meter M18 (customer C-18)" in swap.hint
    assert measured(report, "M18", "ct_pt") == "meter programmed x80"
    assert measured(report, "M17", "clock").startswith("+720")  # +7200 s, give or take the read


async def test_sync_clock_sets_a_meter_that_is_off(hdlc_site: tuple[dict[int, SimulatedDlmsMeter], int]) -> None:
    meters, port = hdlc_site
    meters[17].faults.clock_offset_s = -7200
    cfg = hdlc_config(port)
    report = await run(resolve("bus", cfg), cfg, addresses=[17], sync_clock=True)
    assert problems(report) == set()
    assert measured(report, "M17", "clock").startswith("-7200 s, synced to ")
    assert abs(meters[17].faults.clock_offset_s) < 5


async def test_relay_test_opens_closes_and_leaves_the_relay_as_found(
    hdlc_site: tuple[dict[int, SimulatedDlmsMeter], int],
) -> None:
    meters, port = hdlc_site
    cfg = hdlc_config(port)
    untouched = await run(resolve("bus", cfg), cfg, addresses=[16])
    assert meters[16].actions == 0  # safe by default: no relay operated
    report = await run(resolve("bus", cfg), cfg, addresses=[16], test_relay=True)
    assert ("M16", "relay_test", "pass") in {(c.meter, c.name, c.status) for c in report.checks}
    assert meters[16].actions == 2 and meters[16].control_state == 1  # opened, closed, connected again
    assert not [c for c in untouched.checks if c.name == "relay_test"]


async def test_relay_test_goes_through_the_journal_and_spares_protected_and_swapped_meters(
    hdlc_site: tuple[dict[int, SimulatedDlmsMeter], int],
) -> None:
    meters, port = hdlc_site
    meters[17].serial, meters[18].serial = "LGZ00018", "LGZ00017"  # swapped on site: identity fails for both
    cfg = hdlc_config(port, M16={"protected": True, "protection": "hospital"})
    cfg.meters.append(cfg.meters[0].model_copy(update={"id": "M19", "serial": "LGZ00019", "protected": False,
                                                       "dlms": cfg.meters[0].dlms.model_copy(update={"physical": 19})}))
    meters[19] = SimulatedDlmsMeter("H19", Clock(), seed=19, serial="LGZ00019", ct=(200, 5))
    report = await run(resolve("bus", cfg), cfg, addresses=[16, 17, 18, 19], test_relay=True)
    tests = {c.meter: c for c in report.checks if c.name == "relay_test"}
    assert tests["M16"].status == "warn" and "protected customer (hospital)" in tests["M16"].measured
    assert tests["M17"].status == "warn" and "identity check failed" in tests["M17"].measured
    assert tests["M18"].status == "warn" and "identity check failed" in tests["M18"].measured
    assert tests["M19"].status == "pass"
    assert [meters[a].actions for a in (16, 17, 18, 19)] == [0, 0, 0, 2]
    journal = CommandJournal(Path("var/state/journal.sqlite"))
    logged = journal.find()
    journal.close()
    assert [(c.meter, c.action.value, c.state.value, c.who, c.why) for c in logged] == [
        ("M19", "disconnect", "confirmed", "commissioning:Ada", "commissioning test"),
        ("M19", "reconnect", "confirmed", "commissioning:Ada", "commissioning test"),
    ]
    overridden = await run(resolve("bus", cfg), cfg, addresses=[16], test_relay=True, override="new feeder test")
    assert ("M16", "relay_test", "pass") in {(c.meter, c.name, c.status) for c in overridden.checks}
    assert meters[16].actions == 2


async def test_a_protected_meter_left_ready_for_reconnection_fails_the_relay_test(
    hdlc_site: tuple[dict[int, SimulatedDlmsMeter], int],
) -> None:
    meters, port = hdlc_site
    meters[16].control_mode = 1  # a reconnect arms the relay; the customer must press the button
    cfg = hdlc_config(port, M16={"protected": True, "protection": "water"})
    report = await run(resolve("bus", cfg), cfg, addresses=[16], test_relay=True, override="pump station test")
    (check,) = [c for c in report.checks if c.meter == "M16" and c.name == "relay_test"]
    assert check.status == "fail" and "ready_for_reconnection" in check.hint


async def test_an_hls_gmac_meter_not_in_the_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EK", DEFAULT_KEYS.encryption.hex())
    monkeypatch.setenv("AK", DEFAULT_KEYS.authentication.hex())
    meter = SimulatedDlmsMeter("G1", Clock(), keys=DEFAULT_KEYS)
    port = await meter.start()
    target = resolve(f"tcp:127.0.0.1:{port}", None, protocol="dlms-wrapper", timeout=2)
    hls = DlmsSettings(authentication="hls-gmac", encryption_key_env="EK", authentication_key_env="AK")
    try:
        first = await run(target, None, hls)
        second = await run(target, None, hls)  # the counters survived: the meter accepts the next session
    finally:
        await meter.stop()
    for report in (first, second):
        assert problems(report) == {("target", "identity", "warn")}  # only: not in a registry
        assert measured(report, "target", "handshake").startswith("associated (hls-gmac)")
    assert (Path("var/state") / "invocation_counters.sqlite").exists()


async def test_an_unreachable_link_says_where_and_why() -> None:
    port = free_port()
    target = resolve(f"tcp:127.0.0.1:{port}", None, protocol="dlms-wrapper", timeout=1)
    report = await run(target, None)
    (check,) = report.checks
    assert (check.name, check.status) == ("connect", "fail") and "Connect" in check.measured
    assert "check the IP/port" in check.hint


async def test_an_hdlc_bus_on_a_serial_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BUS_PW", "12345678")
    clock = Clock()
    bus = HdlcBus({a: SimulatedDlmsMeter(f"S{a}", clock, seed=a, require_lls=True) for a in (20, 21)})
    with NullModem() as line:
        await bus.start_serial(line.a, 9600)
        target = resolve(f"serial:{line.b}", None, protocol="dlms-hdlc", baud=9600, timeout=2)
        lls = DlmsSettings(authentication="lls", password_env="BUS_PW")
        try:
            report = await run(target, None, lls, addresses=[19, 20, 21])
            wrong = await run(target, None, addresses=[20])  # no password given: the meter refuses
        finally:
            await bus.stop()
    assert measured(report, None, "discovery").startswith("2 meter(s) at HDLC address(es) 20, 21")
    assert problems(report) == {("target@20", "identity", "warn"), ("target@21", "identity", "warn")}  # unregistered
    assert measured(report, "target@21", "energy").endswith("kWh")
    assert problems(wrong) == {("target@20", "handshake", "fail")}
    assert "wrong password" in next(c.hint for c in wrong.checks if c.name == "handshake")


# -- Modbus: an RS-485 line on a pty, and a gateway -----------------------------------------


@pytest.fixture
def modem() -> Iterator[NullModem]:
    with NullModem() as m:
        yield m


def modbus_config(device: str, units: list[int]) -> Config:
    return parse_config({
        "links": [{"id": "rs485", "kind": "serial", "protocol": "modbus-rtu", "device": device, "baudrate": 19200,
                   "timeout": "500ms"}],
        "meters": [{"id": f"U{u}", "link": "rs485", "address": u, "map": "eastron-sdm630",
                    "serial": str(70_000_000 + u)} for u in units],
    })  # fmt: skip


async def test_a_clean_rs485_line_passes(modem: NullModem) -> None:
    sdm = shipped_maps()["eastron-sdm630"]
    sim = ModbusSimulator([SimulatedMeter(u, sdm, Clock()) for u in (1, 2)])
    await sim.start_rtu(modem.a, 19200)
    try:
        cfg = modbus_config(modem.b, [1, 2])
        report = await run(resolve("rs485", cfg), cfg, addresses=[1, 2, 3], probe_timeout=0.2)
    finally:
        await sim.stop()
    assert problems(report) == set() and report.verdict == "pass"
    assert {(m.address, m.registry_id) for m in report.meters} == {("unit:1", "U1"), ("unit:2", "U2")}
    assert measured(report, "U2", "energy").endswith("kWh")


async def test_a_dead_unit_on_the_line_is_named(modem: NullModem) -> None:
    sdm = shipped_maps()["eastron-sdm630"]
    sim = ModbusSimulator([SimulatedMeter(u, sdm, Clock()) for u in (1, 3)])  # unit 2 is dead
    await sim.start_rtu(modem.a, 19200)
    try:
        cfg = modbus_config(modem.b, [1, 2, 3])
        report = await run(resolve("rs485", cfg), cfg, addresses=[1, 2, 3, 4], probe_timeout=0.2)
    finally:
        await sim.stop()
    assert problems(report) == {("U2", "discovery", "fail")}
    assert measured(report, "U2", "discovery") == "no answer at unit 2"
    assert measured(report, "U1", "identity") == "serial 70000001"
    assert {m.map for m in report.meters} == {"eastron-sdm630"}


async def test_a_unit_that_answers_only_exceptions_is_there_but_unidentified(modem: NullModem) -> None:
    sdm = shipped_maps()["eastron-sdm630"]
    meters = [SimulatedMeter(u, sdm, Clock()) for u in (1, 2)]
    for m in meters:
        m.faults.exception = 2  # illegal data address: the registers asked for are not this device's
    sim = ModbusSimulator(meters)
    await sim.start_rtu(modem.a, 19200)
    try:
        cfg = modbus_config(modem.b, [1])
        report = await run(resolve("rs485", cfg), cfg, addresses=[1, 2, 3], probe_timeout=0.2)
    finally:
        await sim.stop()
    assert problems(report) == {("U1", "discovery", "fail"), (None, "discovery", "warn"), (None, "discovery", "fail")}
    assert measured(report, "U1", "discovery") == "unit 1 answers, but not to the eastron-sdm630 map"
    warn = next(c for c in report.checks if c.status == "warn")
    assert warn.measured == "unit 2 answers, but to none of the shipped maps" and "add a map" in warn.hint


async def test_a_247_address_scan_finishes_inside_its_time_box(modem: NullModem) -> None:
    sdm = shipped_maps()["eastron-sdm630"]
    sim = ModbusSimulator([SimulatedMeter(u, sdm, Clock()) for u in (5, 120, 247)])
    await sim.start_rtu(modem.a, 19200)
    target = resolve(f"serial:{modem.b}", None, protocol="modbus-rtu", baud=19200, timeout=0.5)
    started = time.monotonic()
    try:
        report = await run(target, None, probe_timeout=0.05, time_box=40)
    finally:
        await sim.stop()
    took = time.monotonic() - started
    assert took < 40 + 5  # the scan itself stops at the box; the three meters' checks follow
    assert {m.address for m in report.meters} == {"unit:5", "unit:120", "unit:247"}
    assert not any("time box" in c.measured for c in report.checks)
    # Not in any registry: each is a warning saying how to add it, not a failure.
    assert {(c.name, c.status) for c in report.checks if c.status in ("warn", "fail")} == {("identity", "warn")}


# -- MQTT concentrators ----------------------------------------------------------------------


def mqtt_config(broker: MosquittoServer, concentrator: str, meters: int) -> Config:
    return parse_config({
        "links": [{"id": "broker", "kind": "mqtt", "host": "127.0.0.1", "port": broker.port, "timeout": "5s"}],
        "concentrators": [{"id": concentrator, "link": "broker"}],
        "meters": [{"id": f"{concentrator}-m{i}", "concentrator": concentrator, "serial": f"SN{i + 1:08d}"}
                   for i in range(meters)],
    })  # fmt: skip


async def test_a_clean_concentrator_passes(mosquitto_server: MosquittoServer) -> None:
    clock = Clock()
    meters = [f"dc-ok-m{i}" for i in range(3)]
    sim = SimulatedConcentrator("dc-ok", "127.0.0.1", mosquitto_server.port, meters, clock, backlog=timedelta(hours=3))
    await sim.start()
    await sim.publish_until(clock.datetime())
    try:
        cfg = mqtt_config(mosquitto_server, "dc-ok", 3)
        report = await run(resolve("dc-ok", cfg), cfg, birth_timeout=10)
    finally:
        await sim.stop()
    assert problems(report) == set(), report.checks
    assert "3 meter(s) in its inventory" in measured(report, None, "birth")
    assert measured(report, "dc-ok-m1", "identity") == "serial SN00000002"


async def test_a_concentrator_that_never_sends_birth_fails_at_that_step(mosquitto_server: MosquittoServer) -> None:
    cfg = mqtt_config(mosquitto_server, "dc-silent", 2)
    started = time.monotonic()
    report = await run(resolve("dc-silent", cfg), cfg, birth_timeout=1.0)
    assert time.monotonic() - started < 10
    assert problems(report) == {(None, "birth", "fail")}
    assert measured(report, None, "birth") == "no birth within 1 s"
    assert "not connected to this broker" in next(c.hint for c in report.checks if c.name == "birth")


# -- report, registration, CLI -------------------------------------------------------------


async def test_the_report_is_saved_and_renders_in_chromium(
    hdlc_site: tuple[dict[int, SimulatedDlmsMeter], int], tmp_path: Path,
) -> None:
    meters, port = hdlc_site
    meters[18].ct = (400, 5)
    cfg = hdlc_config(port)
    report = await run(resolve("bus", cfg), cfg, addresses=[16, 17, 18])
    json_path, html_path = report.save(tmp_path)
    assert '"verdict": "fail"' in json_path.read_text() and "Substation 7" in html_path.read_text()
    shot, dom = await asyncio.to_thread(render_in_chromium, html_path, tmp_path)
    assert shot.stat().st_size > 20_000  # a page with tables, not a blank or an error page
    assert "Commissioning report: Substation 7" in dom and "meter programmed x80" in dom


def render_in_chromium(page: Path, tmp: Path) -> tuple[Path, str]:
    """Screenshot (kept as a test artifact) and the DOM as headless Chromium renders it."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Debian's chromium package is needed to check the report renders (scripts/test installs it)"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "commission-report.png"
    shot.unlink(missing_ok=True)
    common = [chromium, "--headless", "--no-sandbox", "--disable-gpu"]
    subprocess.run([*common, f"--user-data-dir={tmp / 'p1'}", f"--screenshot={shot}", "--window-size=1280,1600",
                    page.as_uri()], capture_output=True, timeout=60, check=True)  # fmt: skip
    dom = subprocess.run([*common, f"--user-data-dir={tmp / 'p2'}", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    return shot, dom.stdout


async def test_register_adds_found_meters_and_refuses_conflicts(modem: NullModem, tmp_path: Path) -> None:
    sdm = shipped_maps()["eastron-sdm630"]
    sim = ModbusSimulator([SimulatedMeter(u, sdm, Clock()) for u in (1, 2)])
    await sim.start_rtu(modem.a, 19200)
    target = resolve(f"serial:{modem.b}", None, protocol="modbus-rtu", baud=19200, timeout=0.5)
    try:
        report = await run(target, None, addresses=[1, 2], probe_timeout=0.2)
    finally:
        await sim.stop()
    registry = tmp_path / "meters.toml"
    registry.write_text("""# Substation 7, feeder 2: hand-kept notes stay
[[meters]]
id = "OLD"
link = "target"
address = 2
serial = "123"
customer = "Hospital St. Anna"  # must never be cut off automatically
protected = true
groups = ["feeder-2", "critical"]
""")
    with pytest.raises(RegisterConflict, match="conflicts with OLD"):
        register(report, target, registry)
    assert "SN70000001" not in registry.read_text()  # nothing written when anything conflicts
    added = register(report, target, registry, force=True)
    assert added == ["SN70000001", "OLD"]
    text = registry.read_text()
    assert "# Substation 7, feeder 2: hand-kept notes stay" in text and "# must never be cut off" in text
    meters = {m["id"]: m for m in tomllib.loads(text)["meters"]}
    assert meters["OLD"] == {"id": "OLD", "link": "target", "address": 2, "serial": "70000002",
                             "customer": "Hospital St. Anna", "protected": True, "groups": ["feeder-2", "critical"],
                             "map": "eastron-sdm630", "model": meters["OLD"]["model"]}, "a new meter in the point"
    assert meters["SN70000001"]["map"] == "eastron-sdm630"
    assert register(report, target, registry) == []  # the same again: nothing new, no conflict


def test_the_cli_exits_1_on_a_failed_check_and_writes_both_reports(tmp_path: Path) -> None:
    from headend.cli import main

    port = free_port()
    code = main(["commission", f"tcp:127.0.0.1:{port}", "--protocol", "modbus-tcp", "--timeout", "0.5",
                 "--report-dir", str(tmp_path), "--site", "Yard", "--engineer", "Ada"])  # fmt: skip
    assert code == 1
    assert len(list(tmp_path.glob("commission-Yard-*.json"))) == 1
    assert len(list(tmp_path.glob("commission-Yard-*.html"))) == 1
    assert main(["commission", "nowhere", "--protocol", "modbus-tcp"]) == 2
    assert main(["commission", f"tcp:127.0.0.1:{port}", "--protocol", "dlms-wrapper", "--auth", "lls"]) == 2


async def test_a_scan_that_runs_out_of_its_time_box_stops_and_says_how_far_it_got(modem: NullModem) -> None:
    sim = ModbusSimulator([SimulatedMeter(2, shipped_maps()["eastron-sdm630"], Clock())])
    await sim.start_rtu(modem.a, 19200)
    target = resolve(f"serial:{modem.b}", None, protocol="modbus-rtu", baud=19200, timeout=0.5)
    started = time.monotonic()
    try:
        report = await run(target, None, probe_timeout=0.05, time_box=0.5)
    finally:
        await sim.stop()
    assert time.monotonic() - started < 10
    (boxed,) = [c for c in report.checks if "time box" in c.measured]
    assert boxed.status == "warn" and boxed.measured.endswith("of 247 unit ids") and "--time-box" in boxed.hint
    assert [m.address for m in report.meters] == ["unit:2"]  # what it found before the box closed is checked


def test_register_writes_any_serial_as_valid_toml(tmp_path: Path) -> None:
    """A serial with a newline, quotes or control characters (a meter's answer is input) is
    escaped: the file still parses and says exactly what the meter said."""
    serial = 'A"1\n[[meters]]\nid = "X"\x07\\'
    report = Report(site="s", engineer="e", target="tcp:h:1", protocol="modbus-tcp")
    report.meters.append(FoundMeter(address="unit:9", protocol="modbus-tcp", serial=serial, map="eastron-sdm630"))
    target = resolve("tcp:127.0.0.1:1502", None, protocol="modbus-tcp", baud=9600, timeout=0.5)
    registry = tmp_path / "meters.toml"
    register(report, target, registry)
    (meter,) = tomllib.loads(registry.read_text(encoding="utf-8"))["meters"]
    assert meter["serial"] == serial and meter["address"] == 9
