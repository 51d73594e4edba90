"""What both daemons need around their work: systemd notification, logs, durable files, TOML
settings, SQLite transactions, run locks, the metrics HTTP exposition, the shipped units."""
