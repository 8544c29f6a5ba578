"""Durable outbox, batch writer and the reading stores (InfluxDB, SQLite)."""

from headend.storage.base import ReadingStore, StoreError, StoreRejected, StoreUnavailable

__all__ = ["ReadingStore", "StoreError", "StoreRejected", "StoreUnavailable"]
