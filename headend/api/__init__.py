"""HTTP API (FastAPI): switching commands, billing events, health."""
