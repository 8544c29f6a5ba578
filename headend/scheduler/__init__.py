"""Read plans and the polling engine."""
