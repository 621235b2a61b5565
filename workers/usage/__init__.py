"""The usage worker: usage events into the PostgreSQL ledger, exactly once in effect."""
