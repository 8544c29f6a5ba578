"""DLMS/COSEM: dlms-cosem's sans-IO core (kept behind `codec`) driven by asyncio transports.

dlms-cosem >= 24.1 is under the Business Source License 1.1: internal use is permitted,
competing commercial use needs a licence from its authors. Only `codec.py` imports it, so
it can be replaced without touching the rest.
"""
