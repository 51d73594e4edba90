"""Policy rollouts and their distribution to devices, signed."""
