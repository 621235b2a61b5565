"""Contracts shared by every stage: topic names, message schemas, reply frames, settings.

This package imports nothing of ours, so any process (or an outside consumer) can depend on
it alone.
"""
