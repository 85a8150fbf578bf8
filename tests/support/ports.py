"""Free loopback ports for the servers tests start."""

from __future__ import annotations

import random
import socket


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def port_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def weed_port() -> int:
    """A free port whose +10000 (SeaweedFS's gRPC port for it) is free too.

    Both below the kernel's ephemeral range: a port in it can be taken by any outgoing
    connection (Ray opens many) between this probe and SeaweedFS's bind, or while the outage
    test has the server stopped; seen in CI ("failed to listen on grpc port 46046"). And above
    Ray's worker ports (10002-19999 by default)."""
    highest = ephemeral_ports_start() - 1 - 10000
    low, high = (20000, highest) if highest > 20500 else (20000, 50000)
    for _ in range(100):
        port = random.randint(low, high)
        if all(port_free(p) for p in (port, port + 10000)):
            return port
    raise RuntimeError("no free port pair for SeaweedFS")


def ephemeral_ports_start() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as ports:
            return int(ports.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default
