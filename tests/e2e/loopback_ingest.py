"""`rawwave ingest` for the browser test, with one test-only guard: ICE ignores datagrams that do not
come from 127.0.0.1.

Chromium gathers on every interface; the test strips its offer down to 127.0.0.1 candidates, but a
connectivity check sent from another of its sockets would still arrive (as a peer-reflexive candidate)
and be answered at that address. Dropping those keeps every packet of the test on loopback.
"""

from __future__ import annotations

import sys

import aioice.ice

from rawwave.cli import main

_received = aioice.ice.StunProtocol.datagram_received


def _loopback_only(self, data, addr):  # type: ignore[no-untyped-def]
    if addr[0] == "127.0.0.1":
        _received(self, data, addr)


if __name__ == "__main__":
    aioice.ice.StunProtocol.datagram_received = _loopback_only  # type: ignore[method-assign]
    sys.exit(main(["ingest"]))
