"""The usage worker: usage events (`UsageEvent`, topics/messages.py) into the PostgreSQL ledger
(`state/usage.py`), exactly once in effect."""
