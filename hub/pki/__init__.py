"""The fleet PKI: the authority, provisioning, renewal, revocation and `edge-hub init`."""
