"""The HTTP connection `flava serve` runs on: uvicorn's h11 protocol with a header timeout.

h11 has no timeout of its own, and uvicorn's `timeout_keep_alive` is armed only after a response
and disarmed by the first byte that arrives: a client that opens a connection and sends half a
header (or nothing) holds it for ever, and enough of them exhaust the server. Here every request's
headers must be complete within `header_timeout` seconds of the connection opening or of the
previous response; the body has its own idle timeout (`serve.guard`).
"""

from __future__ import annotations

from uvicorn.protocols.http.h11_impl import H11Protocol


def timed_protocol(header_timeout: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing connections whose headers take over `header_timeout` s."""

    class TimedH11Protocol(H11Protocol):
        _header_timer = None

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(header_timeout, self._headers_timed_out)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def handle_events(self) -> None:
            super().handle_events()
            if self.cycle is not None and not self.cycle.response_complete:
                self._disarm()  # a request's headers are in

        def on_response_complete(self) -> None:
            self._arm()  # before super(): it may start a pipelined request, which disarms
            super().on_response_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _headers_timed_out(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                self.transport.close()

    return TimedH11Protocol
