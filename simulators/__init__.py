"""Meter and concentrator simulators, so the head-end runs and is tested without hardware."""
