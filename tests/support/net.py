"""Loopback ports for the brokers that tests, benchmarks and the demo start (no pytest here)."""

from __future__ import annotations

import random
import socket
from pathlib import Path


def free_port(avoid: tuple[int, ...] = ()) -> int:
    """A free port to listen on, below the kernel's ephemeral range: a port the kernel hands
    out (bind to 0) lies inside it, and any outgoing connection on the machine (fifty agents,
    a restarting fleet, a device reconnecting while its hub is down) may take it as its source
    port before the broker binds it."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(100):
        port = random.randrange(10_000, max(low, 10_001))  # a port to try, not a secret
        if port in avoid:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    while True:  # a machine with a very wide ephemeral range
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in avoid:
            return port
