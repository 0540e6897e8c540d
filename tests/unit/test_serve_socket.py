"""The listening socket of `edge-mote serve` (edge_mote/serve/server.py): connections accepted on it get TCP_NODELAY
from asyncio, as uvicorn's own sockets do. (Without it, each response on a kept-alive connection waited ~40 ms for
the client's delayed ACK: BENCHMARKS.md, Serve.)"""

from __future__ import annotations

import asyncio
import socket

from edge_mote.serve.server import _bind


def test_connections_accepted_on_the_serve_socket_have_tcp_nodelay():
    sock = _bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    flags: list[int] = []

    async def main() -> None:
        accepted = asyncio.Event()

        def on_client(reader, writer) -> None:
            flags.append(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()
            accepted.set()

        server = await asyncio.start_server(on_client, sock=sock)
        async with server:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            await asyncio.wait_for(accepted.wait(), 10)
            writer.close()

    asyncio.run(main())
    assert flags and flags[0] != 0
