"""The device's identity: its TLS files, certificate facts, keys, renewal and its clock."""
