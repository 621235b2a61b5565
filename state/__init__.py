"""Shared state: Redis (claims, reply channels, liveness) and PostgreSQL (keys, usage)."""
