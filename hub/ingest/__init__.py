"""Ingest: batches from devices validated, stored idempotently and acknowledged."""
