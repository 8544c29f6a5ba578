"""`headend serve`: plans, protocol links, the storage writer and the HTTP API in one process.

SIGTERM or SIGINT: stop taking new work, let running reads commit (what was accepted is
durable; a run cut short resumes from its watermark), leave switching commands journaled
(a `sent` one is confirmed by read-back at the next start), drain the outbox for a few
seconds, exit 0.
"""

import asyncio
import contextlib
import gc
import logging
import signal
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

import uvicorn
from fastapi import Depends, HTTPException
from fastapi.responses import PlainTextResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from headend.api.app import create_app
from headend.api.auth import Principal, TokenStore
from headend.api.billing import billing_router
from headend.api.limits import GuardedH11Protocol, RequestLimits
from headend.api.security import authenticated, require_roles
from headend.config import Config, Plan
from headend.installation import installation_id
from headend.looplag import watch_lag
from headend.protocols.dlms import client as dlms_client
from headend.registry import Registry, UnknownMeter
from headend.scheduler.admission import LinkAdmission
from headend.scheduler.engine import MeterResult, PlanReport, PollingEngine, single_meter_plan
from headend.scheduler.gate import Lane
from headend.scheduler.loop import PlanLoop
from headend.sessions import SessionFactory
from headend.storage.pipeline import Pipeline
from headend.storage.sqlite_db import StateFileError
from headend.storage.writer_process import WriterProcess
from headend.supervisor import Supervisor
from headend.switching.engine import SwitchingEngine
from headend.switching.journal import CommandJournal, CommandState
from headend.switching.policy import SwitchingPolicy
from headend.switching.ratelimit import LinkLimiter
from headend.switching.runner import CommandRunner
from headend.vee.arrival import ArrivalValidator
from headend.vee.collection import day_completeness
from headend.vee.service import VeeService
from headend.vee.store import VeeStore

log = logging.getLogger(__name__)


class LinkSeries(Collector):
    """The series per link (state, breaker, MQTT link events), from a snapshot taken on the
    event loop at each scrape: /metrics is rendered in a thread, off the loop (with a
    thousand links rendering took tens of ms), and the thread never reads live state."""

    def __init__(self) -> None:
        self.up: dict[str, int] = {}
        self.breaker_open: dict[str, int] = {}
        self.mqtt_events: dict[str, tuple[int, ...]] = {}
        self.trailing_ignored: dict[str, int] = {}

    def snapshot(self, sessions: SessionFactory, polling: PollingEngine) -> None:
        self.up = {link_id: int(state == "up") for link_id, state in sessions.link_states().items()}
        self.breaker_open = {link_id: int(b.is_open) for link_id, b in polling.breakers.items()}
        self.mqtt_events = {link_id: tuple(getattr(mqtt.stats, event) for event in MQTT_EVENTS)
                            for link_id, mqtt in sessions.mqtt.items()}  # fmt: skip
        self.trailing_ignored = dict(dlms_client.trailing_bytes_ignored)

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        up = GaugeMetricFamily("headend_link_up", "1 if the link is connected", labels=["link"])
        for link_id, value in self.up.items():
            up.add_metric([link_id], value)
        yield up
        breaker = GaugeMetricFamily("headend_link_breaker_open", "1 while the link's circuit breaker is open",
                                    labels=["link"])  # fmt: skip
        for link_id, value in self.breaker_open.items():
            breaker.add_metric([link_id], value)
        yield breaker
        events = CounterMetricFamily("headend_mqtt_link_events", "MQTT link events since start: connects, gaps, "
                                     "backfills, duplicates, bad_messages (unkept_: quarantine full), "
                                     "refused_answers, refused_messages", labels=["link", "event"])  # fmt: skip
        for link_id, counts in self.mqtt_events.items():
            for event, count in zip(MQTT_EVENTS, counts, strict=True):
                events.add_metric([link_id, event], count)
        yield events
        ignored = CounterMetricFamily("headend_dlms_trailing_bytes_ignored", "GET answers whose bytes after the "
                                      "value a lenient link passed over, per meter", labels=["meter"])  # fmt: skip
        for meter, count in self.trailing_ignored.items():
            ignored.add_metric([meter], count)
        yield ignored


#: LinkStats counters published as headend_mqtt_link_events_total{event}.
MQTT_EVENTS = ("connects", "gaps", "backfills", "duplicates", "bad_messages", "unkept_bad_messages",
               "refused_answers", "refused_messages", "dropped_qos0")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._lag_max = 0.0
        self.reads = Counter("headend_meter_reads", "Meter reads by plan and result (ok, failed, skipped: a "
                             "circuit breaker was open)",
                             ["plan", "result"], registry=self.registry)  # fmt: skip
        self.read_seconds = Histogram("headend_meter_read_seconds", "Duration of one meter's read",
                                      ["plan"], registry=self.registry)  # fmt: skip
        self.completeness = Gauge("headend_plan_completeness_ratio", "Received / expected intervals, last run",
                                  ["plan"], registry=self.registry)  # fmt: skip
        self.outbox_depth = Gauge("headend_outbox_depth", "Readings accepted, not yet in the store",
                                  registry=self.registry)  # fmt: skip
        self.links = LinkSeries()
        self.registry.register(self.links)
        self.loop_restarts = Counter("headend_plan_loop_restarts", "Plan loops restarted after an error",
                                     ["plan"], registry=self.registry)  # fmt: skip
        self.last_run = Gauge("headend_plan_last_run_finished_timestamp_seconds", "When the plan's last run ended",
                              ["plan"], registry=self.registry)  # fmt: skip
        self.last_run_started = Gauge("headend_plan_last_run_started_timestamp_seconds",
                                      "When the plan's last (finished) run started", ["plan"],
                                      registry=self.registry)  # fmt: skip
        self.vee_failing = Gauge("headend_vee_failing_intervals", "Intervals failing a rule in the latest validation",
                                 ["rule"], registry=self.registry)  # fmt: skip
        self.vee_conflicts = Gauge("headend_vee_conflicting_values", "Stored values replaced by a different one",
                                   registry=self.registry)  # fmt: skip
        self.task_restarts = Counter("headend_task_restarts", "Long-lived tasks restarted after an error",
                                     ["task"], registry=self.registry)  # fmt: skip
        self.hook_failures = Gauge("headend_writer_hook_failures", "Writer hooks (VEE) that raised, since start",
                                   registry=self.registry)  # fmt: skip
        self.written = Gauge("headend_writer_written_readings", "Readings the store confirmed, since start",
                             registry=self.registry)  # fmt: skip
        self.outbox_failures = Gauge("headend_outbox_failures", "Outbox database errors seen by the writer "
                                     "(disk full, I/O), since start", registry=self.registry)  # fmt: skip
        self.meter_breakers_open = Gauge("headend_meter_breakers_open", "Meters whose own circuit breaker is "
                                         "open (not asked until its cooldown)", registry=self.registry)  # fmt: skip
        self.collection = Gauge("headend_collection_completeness_ratio", "Share of the last complete UTC day's "
                                "intervals stored, per link or concentrator (every protocol)", ["link"],
                                registry=self.registry)  # fmt: skip
        self.collection_meters = Gauge("headend_collection_meters", "Meters per link by the last complete day's "
                                       "intervals: complete, partial, silent", ["link", "state"],
                                       registry=self.registry)  # fmt: skip
        self.commands = Gauge("headend_switching_commands", "Switching commands in the journal by action and state",
                              ["action", "state"], registry=self.registry)  # fmt: skip
        self.confirm_seconds = Histogram("headend_switching_confirmation_seconds",
                                         "From request to confirmed relay read-back", ["action"],
                                         buckets=(0.5, 1, 2, 5, 10, 30, 60, 300, 3600, 86400),
                                         registry=self.registry)  # fmt: skip
        self.deferred = Gauge("headend_switching_deferred", "Disconnects waiting for a window",
                              registry=self.registry)  # fmt: skip
        self.awaiting = Gauge("headend_switching_awaiting_approval", "Protected disconnects waiting for approval",
                              registry=self.registry)  # fmt: skip
        self.progress_age = Gauge("headend_engine_progress_age_seconds", "Seconds since a meter was last read",
                                  registry=self.registry)  # fmt: skip
        self.loop_lag = Histogram("headend_event_loop_lag_seconds", "How late the event loop ran a timer due "
                                  "every 50 ms", buckets=(0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
                                  registry=self.registry)  # fmt: skip
        self.loop_lag_max = Gauge("headend_event_loop_lag_max_seconds", "The longest event loop lag since start",
                                  registry=self.registry)  # fmt: skip

    def observe_lag(self, seconds: float) -> None:
        self.loop_lag.observe(seconds)
        if seconds > self._lag_max:
            self._lag_max = seconds
            self.loop_lag_max.set(seconds)

    def watch(self, plan: Plan, engine: PollingEngine) -> PlanLoop:
        """A plan loop whose meters, runs and restarts show in these metrics as they happen."""

        def on_result(result: MeterResult) -> None:
            self.reads.labels(plan.id, "ok" if result.ok else "skipped" if result.skipped else "failed").inc()
            self.read_seconds.labels(plan.id).observe(result.seconds)

        def on_report(report: PlanReport) -> None:
            expected = sum(r.expected_intervals for r in report.results)
            received = sum(r.received_intervals for r in report.results)
            self.completeness.labels(plan.id).set(received / expected if expected else 1.0)
            self.last_run.labels(plan.id).set(time.time())
            self.last_run_started.labels(plan.id).set(report.started.timestamp())

        loop = PlanLoop(plan, engine, on_result=on_result, on_report=on_report,
                        on_restart=lambda _exc: self.loop_restarts.labels(plan.id).inc())  # fmt: skip
        return loop


async def serve(cfg: Config, *, stop: asyncio.Event | None = None, ready: asyncio.Event | None = None) -> int:
    stop = stop or asyncio.Event()
    # Work handed to threads (journal fsyncs, VEE, SQLite reads) takes the GIL back several
    # times per step; at the default 5 ms a step waited up to 5 ms each time while the loop
    # ran, and a bulk of 1,000 admissions took 10 s instead of 1.5. 1 ms: 5.4 s for admitting
    # and confirming them all, event loop lag at most 12 ms (67 ms with the fsyncs on the loop).
    # The outbox's commits and the writer's steps are such work too: concentrator ingest went
    # from 53k to 60k values/s (benchmarks/serve_ingest.py, 8 days).
    sys.setswitchinterval(0.001)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    try:
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StateFileError(f"cannot make {cfg.state_dir}: {exc}") from exc
    headend_id = installation_id(cfg.state_dir)  # before any state file of this start exists
    metrics = Metrics()
    supervisor = Supervisor(on_restart=lambda task: metrics.task_restarts.labels(task).inc())
    pipeline = Pipeline(cfg.storage, flush_timeout=5, supervisor=supervisor, own_process=cfg.storage.writer.own_process,
                        vee_versions=cfg.state_dir / "vee.sqlite" if cfg.vee.on_arrival else None)  # fmt: skip
    registry = Registry(cfg)
    journal = CommandJournal(cfg.state_dir / "journal.sqlite")
    versions = VeeStore(cfg.state_dir / "vee.sqlite")

    async def reread(meter_id: str, start: datetime, end: datetime) -> None:
        """VEE's first estimation step: ask the meter again for the period, then let the
        writer store what came back before validation looks again."""
        meter, link = registry.meter(meter_id), registry.link_of(meter_id)
        if meter.concentrator is None and not link.protocol.startswith("dlms"):
            return  # no load profile to ask for (Modbus): boundary reads cannot be repeated
        now = datetime.now(UTC)
        plan = single_meter_plan("vee-reread", meter_id, ["profile"], max(timedelta(seconds=1), now - start))
        result = await polling.read_meter(meter_id, plan, now, Lane.BACKFILL, fresh=True)
        if result.ok and result.readings:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(pipeline.writer.wait_drained(), 30)

    vee = VeeService(pipeline.store, versions, registry, cfg.vee, journal=journal, reread=reread)
    arrival = ArrivalValidator(vee)
    if cfg.vee.on_arrival:
        # Given before the writer starts: what it drains from the outbox at start is checked too.
        if isinstance(pipeline.writer, WriterProcess):
            # The writer process checks for conflicts itself and tells which meter-days it stored.
            pipeline.writer.on_days = arrival.note_stored
        else:
            pipeline.writer.before_write, pipeline.writer.after_write = arrival.before_write, arrival.after_write

    def conflicts() -> int:
        """Values that arrived different from the one stored, wherever the check runs."""
        writer = pipeline.writer
        return arrival.conflicts + (writer.conflicts if isinstance(writer, WriterProcess) else 0)

    async with pipeline:
        sessions = SessionFactory(cfg, pipeline.outbox, state_dir=cfg.state_dir, headend_id=headend_id,
                                  supervisor=supervisor)  # fmt: skip
        await sessions.start()
        # One admission for polling, on-demand reads, VEE re-reads and switching.
        admission = LinkAdmission(registry, sessions)
        polling = PollingEngine(registry, pipeline.outbox, sessions, admission=admission)
        switching = SwitchingEngine(
            journal, SwitchingPolicy(cfg.switching), registry, admission=admission,
            confirm_timeout=cfg.switching.confirm_timeout.total_seconds(),
            poll_interval=cfg.switching.poll_interval.total_seconds(), attempts=cfg.switching.attempts,
            dry_run=cfg.switching.dry_run, deadline=cfg.switching.deadline.total_seconds(),
        )  # fmt: skip
        switching.on_confirmed = lambda c, seconds: metrics.confirm_seconds.labels(c.action.value).observe(seconds)
        runner = CommandRunner(switching, workers=cfg.switching.workers,
                               reconnect_workers=cfg.switching.reconnect_workers, supervisor=supervisor,
                               limiter=LinkLimiter(cfg.switching.disconnects_per_link_per_minute))  # fmt: skip
        await runner.start()
        tokens = TokenStore.load(cfg.api.tokens_file) if cfg.api.tokens_file else TokenStore({})
        app = create_app(switching, runner, tokens)
        app.include_router(billing_router(vee, tokens))
        reader = require_roles(tokens, "operator", "engineer", "billing", "override")

        @app.get("/metrics", response_class=PlainTextResponse)
        async def metrics_endpoint() -> str:
            metrics.outbox_depth.set(pipeline.outbox.depth())  # one row's lookup on its own connection
            metrics.written.set(pipeline.writer.stats.written)
            metrics.hook_failures.set(pipeline.writer.stats.hook_failures)
            metrics.outbox_failures.set(pipeline.writer.stats.outbox_failures)
            metrics.links.snapshot(sessions, polling)
            metrics.meter_breakers_open.set(sum(1 for b in polling.meter_breakers.values() if b.is_open))
            metrics.progress_age.set(time.monotonic() - polling.stats.last_progress)
            for rule, count in arrival.failing().items():
                metrics.vee_failing.labels(rule).set(count)
            metrics.vee_conflicts.set(conflicts())
            counts = await switching.off_loop(journal.counts)
            for (action, state), n in counts.items():
                metrics.commands.labels(action, state).set(n)
            metrics.deferred.set(sum(n for (_a, s), n in counts.items() if s == CommandState.DEFERRED))
            metrics.awaiting.set(sum(n for (_a, s), n in counts.items() if s == CommandState.AWAITING_APPROVAL))
            text = await asyncio.to_thread(generate_latest, metrics.registry)
            return text.decode()

        class ReadIn(BaseModel):
            model_config = ConfigDict(extra="forbid")
            read: list[Literal["profile", "registers", "events", "clock", "billing"]] = Field(min_length=1)
            channels: list[str] = []
            hours: float = Field(24.0, gt=0, le=24 * 31)

        @app.post("/meters/{meter_id}/read")
        async def read_now(meter_id: str, body: ReadIn, who: Annotated[Principal, Depends(reader)]) -> dict[str, Any]:
            """An on-demand read, ahead of bulk and backfill work on the meter's link."""
            try:
                meter = registry.meter(meter_id)
                plan = single_meter_plan("on-demand", meter.id, body.read, timedelta(hours=body.hours), body.channels)
            except UnknownMeter as exc:
                raise HTTPException(404, str(exc)) from None
            except ValidationError as exc:
                reasons = exc.errors(include_url=False, include_context=False, include_input=False)
                raise HTTPException(422, reasons) from None
            result = await polling.read_meter(meter.id, plan, datetime.now(UTC), Lane.ON_DEMAND, fresh=True)
            if not result.ok:
                # Asking a meter for what it does not have is the caller's mistake; the rest
                # (link down, timeout, refused, garbage) is the meter's side: bad gateway.
                raise HTTPException(422 if result.error_type == "Unsupported" else 502, f"{meter_id}: {result.error}")
            return {"meter": meter_id, "requested_by": who.name, "readings": result.readings,
                    "drift_s": result.drift_s, "events": result.events, "unsupported": result.unsupported,
                    "expected_intervals": result.expected_intervals,
                    "received_intervals": result.received_intervals,
                    "missing": [t.isoformat() for t in result.missing]}  # fmt: skip

        @app.get("/status")
        async def status(_who: Annotated[Principal, Depends(authenticated(tokens))]) -> dict[str, object]:
            return {
                "outbox_depth": pipeline.outbox.depth(),
                "writer": {"healthy": pipeline.writer.stats.healthy, "written": pipeline.writer.stats.written},
                "links": sessions.link_states(),
                "breakers": {k: b.state() for k, b in polling.breakers.items()},
                "vee": {"validated_on_arrival": arrival.validated, "conflicting_values": conflicts(),
                        "failing_intervals": dict(arrival.failing())},
            }  # fmt: skip

        tls = {"ssl_certfile": str(cfg.api.tls_cert), "ssl_keyfile": str(cfg.api.tls_key)} if cfg.api.tls_cert else {}
        if not tls and cfg.api.host not in ("127.0.0.1", "::1", "localhost"):
            log.warning("API on %s without TLS: bearer tokens cross the network in clear; set api.tls_cert "
                        "and api.tls_key", cfg.api.host)  # fmt: skip
        public = {"/health", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}
        if not cfg.api.metrics_auth:
            public.add("/metrics")
        guarded = RequestLimits(app, tokens, public=public, max_body=cfg.api.max_body,
                                body_timeout=cfg.api.body_timeout.total_seconds(),
                                max_in_flight=cfg.api.max_concurrency)  # fmt: skip
        protocol = type("SiteH11Protocol", (GuardedH11Protocol,),
                        {"header_timeout": cfg.api.header_timeout.total_seconds()})  # fmt: skip
        server = uvicorn.Server(uvicorn.Config(guarded, host=cfg.api.host, port=cfg.api.port, log_level="warning",
                                               http=protocol, timeout_keep_alive=5, **tls))  # type: ignore[arg-type]  # fmt: skip
        server.install_signal_handlers = lambda: None  # type: ignore[method-assign]  # ours handle SIGTERM
        # Plan loops have their own watchdog (headend_plan_loop_restarts_total); the supervisor
        # catches what escapes it.
        # The registry, config and app live as long as the process: out of the collector's sight,
        # so a full collection (set off by the garbage a plan run makes) never walks millions
        # of meter objects at once (a 100,000-meter site stalled the loop for 0.2-0.6 s each time).
        gc.freeze()
        tasks = [supervisor.start(f"plan-{p.id}", lambda p=p: metrics.watch(p, polling).run(stop)) for p in cfg.plans]
        http = asyncio.create_task(server.serve(), name="http")
        validating = supervisor.start("vee-on-arrival", lambda: arrival.run(stop))

        async def collection_kpis() -> None:
            while not stop.is_set():
                day = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=1)
                for link_id, kpi in (await day_completeness(pipeline.store, registry, day, cfg.vee.interval)).items():
                    metrics.collection.labels(link_id).set(kpi.ratio)
                    for state in ("complete", "partial", "silent"):
                        metrics.collection_meters.labels(link_id, state).set(getattr(kpi, state))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), cfg.vee.kpi_refresh.total_seconds())

        kpis = supervisor.start("collection-kpis", collection_kpis)
        lag = supervisor.start("loop-lag", lambda: watch_lag(metrics.observe_lag, stop))
        if ready is not None:
            ready.set()
        log.info("headend serving %d meters, %d plans, API on %s:%d", len(cfg.meters), len(cfg.plans),
                 cfg.api.host, cfg.api.port)  # fmt: skip
        await stop.wait()
        log.info("stopping: finishing in-flight reads")
        polling.stop()
        server.should_exit = True
        # Validation on arrival is redone from the store at any time: it does not hold up a
        # stop (a re-read it asked for may wait on a meter or a full outbox for long).
        validating.cancel()
        kpis.cancel()
        lag.cancel()
        await asyncio.gather(*tasks, validating, kpis, lag, return_exceptions=True)
        await http
        await runner.stop()
        switching.close()
        await sessions.close()
        journal.close()
        versions.close()
    return 0
