"""MQTT v5 over mutual TLS: one session, the link that keeps it up, the reconnect policy."""
