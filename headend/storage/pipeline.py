"""Builds the storage pipeline (outbox -> batch writer -> store) from the config."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

from headend.config import StorageConfig
from headend.storage.base import ReadingStore, StoreUnavailable
from headend.storage.outbox import Outbox
from headend.storage.sqlite import SqliteStore
from headend.storage.writer import BatchWriter
from headend.storage.writer_process import WriterJob, WriterProcess
from headend.supervisor import Supervisor

log = logging.getLogger(__name__)


class MissingSecret(RuntimeError):
    pass


def _secret(env: Mapping[str, str], name: str | None, what: str) -> str | None:
    if name is None:
        return None
    try:
        return env[name]
    except KeyError:
        raise MissingSecret(f"{what} is read from the environment variable {name}, which is not set") from None


def build_store(cfg: StorageConfig, env: Mapping[str, str] | None = None) -> ReadingStore:
    env = os.environ if env is None else env
    if cfg.backend == "sqlite":
        return SqliteStore(cfg.sqlite.path)
    from headend.storage.influx import InfluxStore

    influx = cfg.influx
    assert influx is not None  # the config model guarantees it
    return InfluxStore(
        influx.url,
        influx.database,
        api=influx.api,
        username=influx.username,
        password=_secret(env, influx.password_env, "storage.influx password"),
        token=_secret(env, influx.token_env, "storage.influx token"),
        org=influx.org,
        bucket=influx.bucket,
        timeout=influx.timeout.total_seconds(),
    )


class Pipeline:
    """`async with Pipeline(cfg) as p: await p.outbox.accept(readings)`; the writer runs meanwhile.

    On exit the writer gets `flush_timeout` seconds to drain; whatever is left stays in the
    outbox for the next start.
    """

    def __init__(self, cfg: StorageConfig, *, store: ReadingStore | None = None, flush_timeout: float = 10.0,
                 supervisor: Supervisor | None = None, own_process: bool = False,
                 vee_versions: Path | None = None) -> None:  # fmt: skip
        """`own_process`: the writer runs in a process of its own (serve's default), checking
        for conflicts with stored values in `vee_versions` when given, with a store it builds
        from `cfg` (`store` is then this process's, for queries); otherwise it is a task of
        this event loop and its hooks are set on it."""
        self.cfg = cfg
        self.supervisor = supervisor or Supervisor()
        self.store = store or build_store(cfg)
        self.outbox = Outbox(cfg.outbox)
        self.writer: BatchWriter | WriterProcess
        if own_process:
            job = WriterJob(cfg, vee_versions, logging.getLogger().getEffectiveLevel())
            self.writer = WriterProcess(self.outbox, job,
                                        on_restart=lambda: self.supervisor.note_restart("outbox-writer"))  # fmt: skip
        else:
            self.writer = BatchWriter(
                self.outbox,
                self.store,
                batch_size=cfg.writer.batch_size,
                max_backoff=cfg.writer.max_backoff.total_seconds(),
                warn_depth=cfg.writer.warn_depth,
                linger=cfg.writer.linger.total_seconds(),
                in_flight=cfg.writer.in_flight,
            )
        self.flush_timeout = flush_timeout
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Pipeline:
        # A writer process of a serve killed a moment ago ends when it sees serve gone.
        await asyncio.to_thread(self.outbox.lock_for_writer, 5.0)
        try:
            await self.store.open()
        except StoreUnavailable as exc:
            # Reads go on into the outbox; the writer creates what is missing once it can
            # reach the store (a head-end restarted during a database outage must still read).
            log.warning("store not reachable at start (%s); readings wait in the outbox until it is", exc)
        self._task = self.supervisor.start("outbox-writer", self.writer.run)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._task is not None:
            if exc_type is None and not (isinstance(self.writer, WriterProcess) and not self.writer.alive):
                # (no writer process to wait for while one is being started again)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.flush_timeout):
                        await self.writer.wait_drained()
            self.writer.stop()
            await self._task
        await self.store.close()
        self.outbox.close()
