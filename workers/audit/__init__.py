"""The audit writer: audit events (`AuditEvent`, topics/audit.py) appended to their tenant's
hash chain in PostgreSQL (`state/audit.py`), each exactly once in effect."""
