"""Operating a device: `status`, `check`, `simulate` and the agent's metrics."""
