"""A bad config fails before anything starts, naming the file, the key path and the reason."""

from __future__ import annotations

import shutil
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from headend.config import ConfigError, load_config, parse_config, parse_duration
from headend.model import Obis

ROOT = Path(__file__).resolve().parent.parent

BASE = """
[[links]]
id = "tcp1"
kind = "tcp"
protocol = "dlms-wrapper"
host = "127.0.0.1"
port = 4059

[[links]]
id = "broker"
kind = "mqtt"
host = "127.0.0.1"

[[concentrators]]
id = "dc1"
link = "broker"

[[meters]]
id = "M-1"
link = "tcp1"
groups = ["res"]
"""


def load(tmp_path: Path, extra: str, base: str = BASE) -> ConfigError:
    path = tmp_path / "site.toml"
    path.write_text(base + extra)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)
    return info.value


def test_the_shipped_configs_load() -> None:
    cfg = load_config(ROOT / "config" / "example.toml")
    hospital = cfg.meters[0]
    assert hospital.protected and hospital.protection == "hospital"
    assert hospital.multiplier == 40.0
    assert cfg.plans[1].channels == [Obis(1, 0, 1, 8, 0), Obis(1, 0, 2, 8, 0)]
    assert cfg.plans[0].every == timedelta(minutes=15)
    assert load_config(ROOT / "config" / "demo.toml").storage.backend == "sqlite"


def test_the_base_of_these_tests_is_valid(tmp_path: Path) -> None:
    (tmp_path / "ok.toml").write_text(BASE)
    assert load_config(tmp_path / "ok.toml").meters[0].id == "M-1"


BAD_CONFIGS = [
    pytest.param("[storage\nbackend = 'x'", "", "not valid TOML", id="toml-syntax"),
    pytest.param("[storage]\nbakend = 'sqlite'", "storage.bakend", "unknown key", id="misspelt-key"),
    pytest.param(
        '[[meters]]\nid = "M-2"\nlink = "tcp1"\nct = { primary = -200, secondary = 5 }',
        'meters[1].ct.primary (id "M-2")',
        "greater than 0",
        id="negative-ct",
    ),
    pytest.param('[[meters]]\nid = "M-1"\nlink = "tcp1"', 'meters[1] (id "M-1")', "duplicate id", id="duplicate-meter"),
    pytest.param(
        '[[meters]]\nid = "M-2"\nlink = "tcp9"',
        'meters[1] (id "M-2").link',
        "no link with id 'tcp9'",
        id="unknown-link",
    ),
    pytest.param(
        '[[plans]]\nid = "p"\nread = ["registers"]\nchannels = ["1-0:1.8"]\nevery = "15m"',
        'plans[0].channels[0] (id "p")',
        "not an OBIS code",
        id="bad-obis",
    ),
    pytest.param(
        '[[meters]]\nid = "M-2"\nlink = "tcp1"\nprotected = true',
        'meters[1] (id "M-2")',
        "needs 'protection'",
        id="protected-without-category",
    ),
    pytest.param(
        '[[plans]]\nid = "p"\nread = ["profile"]\nevery = "15 minutes"',
        'plans[0].every (id "p")',
        "not a duration",
        id="bad-duration",
    ),
    pytest.param(
        '[[links]]\nid = "tcp2"\nkind = "tcp"\nprotocol = "dlms-wrapper"\nhost = "h"\nport = 70000',
        'links[2].port (id "tcp2")',
        "less than or equal to 65535",
        id="port-out-of-range",
    ),
    pytest.param(
        '[[links]]\nid = "rs485"\nkind = "serial"\nprotocol = "modbus-rtu"\ndevice = "/dev/ttyS0"\nbaudrate = 9601',
        'links[2].baudrate (id "rs485")',
        "not a standard baud rate",
        id="bad-baud",
    ),
    pytest.param(
        '[[links]]\nid = "x"\nkind = "carrier-pigeon"',
        'links[2].kind (id "x")',
        "does not match any",
        id="unknown-kind",
    ),
    pytest.param(
        '[[links]]\nid = "s"\nkind = "serial"\nprotocol = "modbus-rtu"',
        'links[2].device (id "s")',
        "Field required",
        id="missing-required",
    ),
    pytest.param(
        '[storage]\nbackend = "influx"\n[storage.influx]\nurl = "localhost:8086"',
        "storage.influx.url",
        "not an http(s) URL",
        id="bad-url",
    ),
    pytest.param(
        '[storage]\nbackend = "influx"', "storage", "needs a [storage.influx] section", id="influx-no-section"
    ),
    pytest.param(
        '[[plans]]\nid = "p"\nselect = { group = "nope" }\nread = ["profile"]\nevery = "15m"',
        'plans[0] (id "p").select.group',
        "no meter is in group 'nope'",
        id="plan-selects-nothing",
    ),
    pytest.param(
        '[[meters]]\nid = "M 2\\u0007"\nlink = "tcp1"',
        'meters[1].id (id "M 2\\u0007")',
        "control character",
        id="meter-id-control-char",
    ),
    pytest.param(
        '[[meters]]\nid = "M-2"\nlink = "broker"',
        'meters[1] (id "M-2").link',
        "attached with 'concentrator'",
        id="meter-on-mqtt-link",
    ),
    pytest.param(
        '[[plans]]\nid = "p"\nread = ["profile"]', 'plans[0] (id "p")', "exactly one of 'every' or 'cron'", id="no-when"
    ),
    pytest.param(
        '[[links]]\nid = "rs485"\nkind = "serial"\nprotocol = "modbus-rtu"\ndevice = "/dev/ttyS0"\n'
        '[[meters]]\nid = "M-2"\nlink = "rs485"\naddress = 2\nmap = "eastron-sdm999"',
        'meters[1] (id "M-2").map',
        "no meter map 'eastron-sdm999'",
        id="unknown-modbus-map",
    ),
    pytest.param(
        '[[links]]\nid = "rs485"\nkind = "serial"\nprotocol = "modbus-rtu"\ndevice = "/dev/ttyS0"\n'
        '[[meters]]\nid = "M-2"\nlink = "rs485"\naddress = 2',
        'meters[1] (id "M-2").map',
        "needs a register map",
        id="modbus-meter-without-map",
    ),
]


@pytest.mark.parametrize(("extra", "key", "reason"), BAD_CONFIGS)
def test_bad_config_names_file_key_and_reason(tmp_path: Path, extra: str, key: str, reason: str) -> None:
    err = load(tmp_path, "\n" + extra + "\n")
    assert any(path == key and reason in why for path, why in err.problems), err.problems
    assert key in str(err) and reason in str(err)


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    err = load(
        tmp_path,
        '\n[[meters]]\nid = "M-2"\nlink = "nope"\n[[meters]]\nid = "M-3"\nconcentrator = "dc9"\n',
    )
    assert [p for p, _ in err.problems] == ['meters[1] (id "M-2").link', 'meters[2] (id "M-3").concentrator']


def test_a_broken_map_file_fails_the_config_that_uses_it(tmp_path: Path) -> None:
    bad_map = tmp_path / "my-meter.toml"
    bad_map.write_text(
        'model = "X"\nmanufacturer = "Y"\nsource = "t"\n[[channels]]\nobis = "1-0:1.8.0.255"\nname = "e"\n'
        'function = "input"\naddress = 0\ntype = "float24"\n'
    )
    err = load(
        tmp_path,
        f'\n[[links]]\nid = "rs485"\nkind = "serial"\nprotocol = "modbus-rtu"\ndevice = "/dev/ttyS0"\n'
        f'[[meters]]\nid = "M-2"\nlink = "rs485"\naddress = 2\nmap = "{bad_map}"\n',
    )
    ((key, reason),) = err.problems
    assert key == 'meters[1] (id "M-2").map'
    assert f"{bad_map}: channels[0].type: Input should be" in reason


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nowhere\.toml: file not found"):
        load_config(tmp_path / "nowhere.toml")


@pytest.mark.parametrize(
    ("text", "seconds"), [("90s", 90), ("15m", 900), ("1h30m", 5400), ("500ms", 0.5), (30, 30), ("1d", 86400)]
)
def test_durations(text: str | int, seconds: float) -> None:
    assert parse_duration(text).total_seconds() == seconds


def test_check_config_command_exits_2_with_the_reason(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(BASE + '\n[[meters]]\nid = "M-9"\nlink = "tcp1"\npt = { primary = 0, secondary = 100 }\n')
    headend = shutil.which("headend") or ""
    cmd = [headend] if headend else [sys.executable, "-m", "headend.cli"]
    result = subprocess.run([*cmd, "check-config", str(path)], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2
    assert f'{path}: meters[1].pt.primary (id "M-9"): Input should be greater than 0' in result.stderr


def test_api_tls_needs_both_files_and_they_must_exist(tmp_path: Path) -> None:
    cert = tmp_path / "api.crt"
    cert.write_text("-----BEGIN CERTIFICATE-----\n")
    with pytest.raises(ConfigError, match=r"api: set both tls_cert and tls_key, or neither"):
        parse_config({"api": {"tls_cert": str(cert)}})
    with pytest.raises(ConfigError, match=r"api: tls_key '.*nope.key' is not a readable file"):
        parse_config({"api": {"tls_cert": str(cert), "tls_key": str(tmp_path / "nope.key")}})


def test_an_mqtt_ca_file_needs_tls_and_must_exist(tmp_path: Path) -> None:
    link = {"id": "b", "kind": "mqtt", "host": "broker"}
    with pytest.raises(ConfigError, match=r"links\[0\] \(id \"b\"\): ca_file is set but tls = false"):
        parse_config({"links": [{**link, "ca_file": str(tmp_path / "ca.pem")}]})
    with pytest.raises(ConfigError, match=r"ca_file '.*ca.pem' is not a readable file"):
        parse_config({"links": [{**link, "tls": True, "ca_file": str(tmp_path / "ca.pem")}]})


def test_two_meters_with_one_serial_are_refused_at_load() -> None:
    link = {"id": "l", "kind": "tcp", "protocol": "dlms-wrapper", "host": "h", "port": 1}
    meters = [{"id": "A", "link": "l", "serial": "LGZ123"}, {"id": "B", "link": "l", "serial": "LGZ9"},
              {"id": "C", "link": "l", "serial": "LGZ123"}]  # fmt: skip
    with pytest.raises(ConfigError) as err:
        parse_config({"links": [link], "meters": meters})
    assert "meters[2] (id \"C\").serial: serial 'LGZ123' is also the serial of meter 'A' (meters[0])" in str(err.value)


@pytest.mark.parametrize(("when", "refused"), [
    ({"every": "30s"}, False), ({"every": "5m"}, False), ({"every": "15m"}, False), ({"cron": "*/15 * * * *"}, False),
    ({"every": "7m"}, True), ({"every": "1h"}, True), ({"cron": "0 * * * *"}, True),
    ({"cron": "2-59/15 * * * *"}, True),
])  # fmt: skip
def test_a_plan_that_cannot_give_boundary_reads_to_modbus_meters_is_refused(when: dict[str, str],
                                                                            refused: bool) -> None:  # fmt: skip
    link = {"id": "gw", "kind": "tcp", "protocol": "modbus-tcp", "host": "h", "port": 502}
    meter = {"id": "MB", "link": "gw", "address": 1, "map": "sim-relay-meter"}
    raw = {"links": [link], "meters": [meter], "plans": [{"id": "p", "read": ["profile"], **when}]}
    if not refused:
        parse_config(raw)
        return
    with pytest.raises(ConfigError, match=r"plans\[0\] \(id \"p\"\)\.(every|cron): reads Modbus meters' intervals"):
        parse_config(raw)
