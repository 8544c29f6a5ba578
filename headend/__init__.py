"""headend: an AMI head-end and meter-communication server."""

__version__ = "0.1.0"
