"""The uplink: the outbox to the hub in batches, deleted only on acknowledgment."""
