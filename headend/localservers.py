"""Start real `influxd` and `mosquitto` on free loopback ports in a directory of their own.

Used by the test fixtures, the benchmarks and the demo. Each server gets its own config so
instances never collide (influxd's RPC port included) and its data lives in `workdir`, so
stopping and starting again on the same ports keeps the data, like a real restart.
"""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Self


class ServerNotAvailable(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_binary(name: str) -> str:
    path = shutil.which(name) or next(
        (str(p) for d in ("/usr/sbin", "/usr/bin", "/usr/local/bin") if (p := Path(d, name)).exists()), None
    )
    if path is None:
        raise ServerNotAvailable(f"{name} is not installed (Debian: apt-get install -y {name})")
    return path


class LocalServer:
    """A child process serving on loopback; `start()` returns once it answers."""

    name = "server"
    startup_timeout = 60.0

    def __init__(self, workdir: str | Path) -> None:
        self.workdir = Path(workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    def start(self) -> None:
        if self.running:
            return
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            self.command(), stdout=self._log, stderr=subprocess.STDOUT, cwd=self.workdir, start_new_session=True
        )
        deadline = time.monotonic() + self.startup_timeout
        while not self.ready():
            if self.process.poll() is not None:
                raise ServerNotAvailable(f"{self.name} exited with {self.process.returncode}: {self.tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise ServerNotAvailable(f"{self.name} not ready after {self.startup_timeout}s: {self.tail()}")
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(sig)
                try:
                    self.process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
            self.process = None
        if self._log is not None:
            self._log.close()
            self._log = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_bytes()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class InfluxServer(LocalServer):
    """InfluxDB 1.x (`influxd` from Debian's `influxdb` package)."""

    name = "influxd"

    def __init__(self, workdir: str | Path, *, auth: bool = False) -> None:
        """`auth`: HTTP authentication on; until its first admin user is created (which
        InfluxDB allows without credentials) nothing else is possible."""
        super().__init__(workdir)
        self.binary = find_binary("influxd")
        self.http_port = free_port()
        self.rpc_port = free_port()
        self.config_path = self.workdir / "influxdb.conf"
        d = self.workdir
        self.config_path.write_text(
            f"""reporting-disabled = true
bind-address = "127.0.0.1:{self.rpc_port}"
[meta]
  dir = "{d / "meta"}"
[data]
  dir = "{d / "data"}"
  wal-dir = "{d / "wal"}"
  query-log-enabled = false
[http]
  bind-address = "127.0.0.1:{self.http_port}"
  log-enabled = false
  auth-enabled = {"true" if auth else "false"}
[monitor]
  store-enabled = false
[continuous_queries]
  enabled = false
[logging]
  level = "warn"
"""
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def command(self) -> list[str]:
        return [self.binary, "-config", str(self.config_path)]

    def ready(self) -> bool:
        conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=1)
        try:
            conn.request("GET", "/ping")
            return conn.getresponse().status == 204
        except OSError:
            return False
        finally:
            conn.close()


class MosquittoServer(LocalServer):
    """Mosquitto 2.x with persistence, so a broker restart keeps QoS 1 sessions."""

    name = "mosquitto"

    def __init__(self, workdir: str | Path, *, tls: tuple[Path, Path] | None = None, acl_file: Path | None = None,
                 users: dict[str, str] | None = None) -> None:  # fmt: skip
        """`tls`: (certificate, key) PEM files: the listener speaks MQTT over TLS only.
        `users` (name -> password): no anonymous clients; with `acl_file`, that ACL applies."""
        super().__init__(workdir)
        self.binary = find_binary("mosquitto")
        self.port = free_port()
        self.config_path = self.workdir / "mosquitto.conf"
        tls_lines = f"certfile {tls[0]}\nkeyfile {tls[1]}\n" if tls else ""
        auth = "allow_anonymous true\n"
        if users:
            self.workdir.mkdir(parents=True, exist_ok=True)
            passwords = self.workdir / "passwd"
            passwords.touch(mode=0o600)
            tool = find_binary("mosquitto_passwd")
            for name, password in users.items():
                subprocess.run([tool, "-b", str(passwords), name, password], check=True, capture_output=True)
            # As in config/mosquitto/mosquitto.conf: a client id is its user name, so no account
            # can take over another client's id (and kick it off, or take its session).
            auth = f"allow_anonymous false\npassword_file {passwords}\nuse_username_as_clientid true\n"
        if acl_file is not None:
            auth += f"acl_file {acl_file}\n"
        self.config_path.write_text(
            f"""listener {self.port} 127.0.0.1
{tls_lines}{auth}
persistence true
persistence_location {self.workdir}/
# Mosquitto drops QoS 1 messages beyond 1000 queued per client by default: a head-end that
# falls behind a burst would see sequence gaps (which it backfills, but should not need to).
max_queued_messages 1000000
log_dest stderr
log_type error
log_type warning
"""
        )
        if os.geteuid() == 0:
            # As root, mosquitto drops to the 'mosquitto' user, which must own its data dir.
            with open(self.config_path, "a") as f:
                f.write("user root\n")

    def command(self) -> list[str]:
        return [self.binary, "-c", str(self.config_path)]

    def ready(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False
