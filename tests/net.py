"""Ports for test servers that nobody can take between choosing and binding them."""

from __future__ import annotations

import socket


def bound_sockets(n: int) -> list[socket.socket]:
    """``n`` sockets bound to free loopback ports, for ``aiohttp.test_utils.TestServer(socket_factory=...)``.

    Choosing a free port, closing it and binding it again later (``free_port``) lost a race
    once under the suite's two processes: another test's broker took the port in between.
    """
    out = []
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        out.append(s)
    return out


def serving(sock: socket.socket):
    """A ``socket_factory`` that hands ``TestServer`` the socket bound already."""
    return lambda host, port, family: sock
