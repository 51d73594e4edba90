"""What travels between device and hub: topics, message schemas, the signing envelope."""
