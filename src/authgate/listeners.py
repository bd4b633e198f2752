"""Which listener a connection arrived on, from the address it was accepted on.

Every worker serves the data plane and the management API on shared sockets, and one
protocol factory is called for both (uvicorn's). The kernel lets no two listening sockets
cover the same local address and port (binding the second fails, wildcards included), so
the local address of an accepted connection names exactly one listening socket: the one it
arrived on. The port alone does not: `127.0.0.1:28300` and `127.0.0.2:28300` are two
sockets on one port.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from typing import Any

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class Listener:
    """A listening address as bound: its port, and the addresses it covers (None: every
    address of its family, a wildcard bind such as `0.0.0.0` or `::`)."""

    port: int
    addresses: frozenset[IPAddress] | None
    family: int

    def accepted(self, local: Any) -> bool:
        """Whether a connection whose local address is `local` (a socket's `sockname`)
        arrived on this listener."""
        if not isinstance(local, tuple) or len(local) < 2 or local[1] != self.port:
            return False
        try:
            ip = ipaddress.ip_address(local[0])
        except ValueError:
            return False
        if ip.version == 6 and ip.ipv4_mapped is not None:
            if self.addresses is None:
                return True  # a dual-stack `::` listener accepts IPv4 clients too
            return ip.ipv4_mapped in self.addresses or ip in self.addresses
        if self.addresses is None:
            return (ip.version == 6) == (self.family == socket.AF_INET6)
        return ip in self.addresses


def listener(address: tuple[str, int]) -> Listener:
    """The `Listener` for a configured HOST:PORT, resolved as `bind` resolves it."""
    host, port = address
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        infos = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)
        found = frozenset(ipaddress.ip_address(info[4][0]) for info in infos)
        return Listener(port, found, family)
    if ip.is_unspecified:
        return Listener(port, None, family)
    return Listener(port, frozenset({ip}), family)
