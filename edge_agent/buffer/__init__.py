"""The outbox: every reading and event in SQLite until the hub acknowledges it."""
