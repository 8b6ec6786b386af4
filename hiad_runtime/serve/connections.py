"""Connections: a cap on how many are open at once, and a deadline for each request's headers.

uvicorn arms no timer on a new connection, so a client that sends its headers slowly (or never)
holds a file descriptor for good. At the default limit of 1024 descriptors, 1,100 such clients left
the server unable to accept anything for 15 minutes while asyncio logged a traceback per failed
accept. Here a connection over the cap is answered 503 and closed at once, and one that has not sent
a request's headers within `header_timeout_s` (of opening, or of its previous answer) is closed,
with a 408 if it had started a request. The cap stays below the open-file limit, leaving descriptors
for the bundle's files and the runtime's own.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
from typing import Callable

from uvicorn.protocols.http.h11_impl import H11Protocol

MAX_CONNECTIONS = 1024  # default cap, where the open-file limit allows it
FD_SHARE = 0.75  # of the open-file limit, at most, for client connections
MAX_BACKLOG = 2048  # uvicorn's default listen backlog

log = logging.getLogger("uvicorn.error")


def open_file_limit() -> int:
    """The soft limit on open files, first raised to the hard limit where allowed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def connection_cap(requested: int | None, file_limit: int) -> int:
    """`requested` (default: MAX_CONNECTIONS), checked to stay within FD_SHARE of the open-file limit."""
    allowed = int(file_limit * FD_SHARE)
    if requested is None:
        return max(1, min(MAX_CONNECTIONS, allowed))
    if requested > allowed:
        raise ValueError(
            f"--max-connections {requested} is more than the open-file limit ({file_limit}) allows: at most {allowed} "
            "(raise the limit, e.g. LimitNOFILE= in the systemd unit)"
        )
    return requested


def accept_backlog(file_limit: int, cap: int) -> int:
    """The listen backlog, which is also how many connections asyncio accepts in one go: a few such
    bursts are accepted before the first of them reaches the cap check, so they must fit the
    descriptors left above the cap."""
    return max(8, min(MAX_BACKLOG, (file_limit - cap) // 4))


def _canned(status: int, reason: str, message: str, headers: str = "") -> bytes:
    """A complete answer written straight to the socket, for a connection that has no request to answer."""
    body = json.dumps({"error": message}).encode()
    head = f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n{headers}"
    return (head + "connection: close\r\n\r\n").encode() + body


def guarded_protocol(
    max_connections: int, header_timeout_s: float, refused: Callable[[str], None]
) -> type[H11Protocol]:
    """uvicorn's h11 protocol with the cap and the header deadline; `refused(reason)` counts each one turned away."""
    busy = f"server busy: {max_connections} connections open"
    over_cap = _canned(503, "Service Unavailable", busy, "retry-after: 5\r\n")
    late = _canned(408, "Request Timeout", f"request headers not received within {header_timeout_s:g} s")

    class GuardedProtocol(H11Protocol):
        header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                log.warning("connection refused: %d connections open (--max-connections)", max_connections)
                refused("max_connections")
                transport.write(over_cap)
                transport.close()  # at once: its descriptor is what the cap protects
                return
            self.expect_headers()

        def handle_events(self) -> None:
            cycle = self.cycle
            super().handle_events()
            if self.cycle is not cycle:  # a request's headers arrived
                self.cancel_header_timer()

        def on_response_complete(self) -> None:
            self.expect_headers()  # before: a pipelined request parsed in there cancels it again
            super().on_response_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self.cancel_header_timer()
            super().connection_lost(exc)

        def expect_headers(self) -> None:
            self.cancel_header_timer()
            self.header_timer = self.loop.call_later(header_timeout_s, self.headers_late)

        def cancel_header_timer(self) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
                self.header_timer = None

        def headers_late(self) -> None:
            self.header_timer = None
            if self.transport.is_closing():
                return
            started, _ = self.conn.trailing_data  # bytes of a request whose headers are not complete
            if started:
                log.warning(
                    "connection closed: request headers not received within %g s (--header-timeout)", header_timeout_s
                )
                refused("header_timeout")
                self.transport.write(late)
            self.transport.close()  # an idle keep-alive connection just closes

    return GuardedProtocol
