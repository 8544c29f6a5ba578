"""The server fixtures start real servers that answer their protocol."""

from __future__ import annotations

import socket

import httpx

from headend.localservers import InfluxServer, MosquittoServer

# MQTT 3.1.1 CONNECT, clean session, client id "t".
MQTT_CONNECT = bytes([0x10, 13, 0, 4, *b"MQTT", 4, 0x02, 0, 60, 0, 1, *b"t"])


def test_mosquitto_answers_connect_with_connack(mosquitto_server: MosquittoServer) -> None:
    with socket.create_connection(("127.0.0.1", mosquitto_server.port), timeout=5) as s:
        s.sendall(MQTT_CONNECT)
        assert s.recv(4) == bytes([0x20, 0x02, 0x00, 0x00])  # CONNACK, accepted


def test_influxd_answers_ping_and_runs_on_its_own_ports(influx_server: InfluxServer) -> None:
    assert httpx.get(f"{influx_server.url}/ping").status_code == 204
    assert influx_server.http_port != influx_server.rpc_port
    assert str(influx_server.workdir) in influx_server.config_path.read_text()
