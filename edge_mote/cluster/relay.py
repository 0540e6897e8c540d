"""A small TCP relay that understands ggml-rpc framing: the cluster's watchdog, the worker's front door and a link
emulator, in one selector loop on one thread.

Each *route* listens on a local port and forwards every accepted connection to a target ``(host, port)``
(IPv4, IPv6 or a host name: the relay resolves it, so ggml -- IPv4 only, ``host:port`` split at the first
colon -- only ever sees ``127.0.0.1:PORT``). With ``frames=True`` the relay follows the protocol
(``runtime/rpc_protocol.py``): it knows which requests await an answer, so it can tell a busy worker from a frozen one
(``stall_timeout``: a request unanswered, or data unsent, with no progress for that long), report that a worker
closed the connection mid-session, count the weight bytes uploaded, cap the memory a worker offers
(``mem_cap``: GET_DEVICE_MEMORY answers shrink, ALLOC_BUFFER beyond the cap fails cleanly) and delay traffic
(``delay``: seconds added to each direction, to emulate a home link's latency).

Events (``Relay.events``, a queue) are ``(route_name, kind, detail)`` with kind ``"closed"`` (the target closed
or reset an active connection), ``"stalled"`` or ``"unreachable"``.
"""

from __future__ import annotations

import collections
import os
import queue
import selectors
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

from ..runtime import rpc_protocol as P

_CHUNK = 1 << 20
_HIGH_WATER = 8 << 20   # stop reading a side while more than this waits to be written to the other
_SMALL = 1 << 16        # requests up to this size are collected whole (the ones the hooks look at are tiny)


@dataclass
class RouteStats:
    connections: int = 0
    uploaded: int = 0          # SET_TENSOR payload bytes sent to the target
    graph_computes: int = 0
    allocated: int = 0         # bytes allocated on the target by the live connections (mem_cap bookkeeping)


@dataclass
class Route:
    name: str
    target: tuple[str, int]
    frames: bool = True
    stall_timeout: float | None = None
    mem_cap: int | None = None
    delay: float = 0.0
    listener: socket.socket | None = None
    stats: RouteStats = field(default_factory=RouteStats)

    @property
    def address(self) -> tuple[str, int]:
        return self.listener.getsockname()[:2]


class _Side:
    """One socket of a link, with what waits to be written to it (``(due_time, bytes)`` chunks)."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.out: collections.deque = collections.deque()
        self.pending = 0
        self.closed = False
        self.mask = selectors.EVENT_READ

    def push(self, data: bytes, due: float = 0.0) -> None:
        if data:
            self.out.append((due, memoryview(bytes(data))))
            self.pending += len(data)


class _Link:
    def __init__(self, route: Route, down: socket.socket, up: socket.socket):
        self.route = route
        self.down, self.up = _Side(down), _Side(up)
        self.last_progress = time.monotonic()
        # request parser (down -> up)
        self.req_hdr = bytearray()
        self.req_cmd = -1
        self.req_left = 0          # payload bytes still to stream
        self.req_collect: bytearray | None = None
        self.req_size = 0
        # response parser (up -> down)
        self.expect: collections.deque = collections.deque()  # [kind, payload] per awaited answer, in order
        self.rsp_hdr = bytearray()
        self.rsp_left = 0
        self.rsp_collect: bytearray | None = None
        self.rsp_size = 0
        self.rsp_kind = None
        self.buffers: dict[int, int] = {}  # remote_ptr -> size (mem_cap)
        self.dead = False


class Relay:
    """Run with ``start()``; add routes with ``add_route``; ``close()`` stops everything (idempotent)."""

    def __init__(self):
        self.sel = selectors.DefaultSelector()
        self.events: queue.Queue = queue.Queue()
        self.routes: list[Route] = []
        self._links: list[_Link] = []
        self._lock = threading.Lock()
        self._new_routes: list[Route] = []
        self._held: list[socket.socket] = []  # client sockets of failed targets, closed by close()
        self._stop = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self.sel.register(self._wake_r, selectors.EVENT_READ, ("wake", None))
        self._thread = threading.Thread(target=self._loop, name="edge-mote-relay", daemon=True)

    # -- public ------------------------------------------------------------------------------------------------
    def add_route(self, name: str, target: tuple[str, int], *, listen: tuple[str, int] = ("127.0.0.1", 0),
                  frames: bool = True, stall_timeout: float | None = None, mem_cap: int | None = None,
                  delay: float = 0.0) -> Route:
        fam = socket.AF_INET6 if ":" in listen[0] else socket.AF_INET
        ls = socket.socket(fam, socket.SOCK_STREAM)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(listen)
        ls.listen(8)
        ls.setblocking(False)
        route = Route(name, target, frames, stall_timeout, mem_cap, delay, ls)
        with self._lock:
            self.routes.append(route)
            self._new_routes.append(route)
        self._wake()
        return route

    def start(self) -> "Relay":
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop = True
        self._wake()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(5)
        for link in list(self._links):
            self._kill(link)
        for sock in self._held:
            sock.close()
        for r in self.routes:
            try:
                r.listener.close()
            except OSError:
                pass
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()

    def active(self, route: Route) -> int:
        return sum(1 for link in self._links if link.route is route and not link.dead)

    # -- loop --------------------------------------------------------------------------------------------------
    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def _loop(self) -> None:
        try:  # a tiny I/O thread: first in line for the CPU, so that a busy machine adds less latency (root only)
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), -10)
        except (OSError, AttributeError):
            pass
        while not self._stop:
            timeout = 0.25
            now = time.monotonic()
            for link in self._links:
                for side in (link.down, link.up):
                    if side.out and side.out[0][0] > now:
                        timeout = min(timeout, side.out[0][0] - now)
            with self._lock:
                new, self._new_routes = self._new_routes, []
            for route in new:
                self.sel.register(route.listener, selectors.EVENT_READ, ("listen", route))
            events = self.sel.select(max(timeout, 0.0))
            for key, mask in events:
                kind, obj = key.data
                if kind == "wake":
                    try:
                        self._wake_r.recv(4096)
                    except OSError:
                        pass
                elif kind == "listen":
                    self._accept(obj)
                else:
                    link, side_name = obj
                    if link.dead:
                        continue
                    if mask & selectors.EVENT_READ:
                        self._read(link, side_name)
                    if not link.dead and mask & selectors.EVENT_WRITE:
                        self._flush(link, link.down if side_name == "down" else link.up)
            now = time.monotonic()
            for link in list(self._links):
                if link.dead:
                    continue
                for side in (link.down, link.up):
                    if side.out and side.out[0][0] <= now:
                        self._flush(link, side)
                if not link.dead:
                    self._check_stall(link, now)
                    self._update_interest(link)

    def _accept(self, route: Route) -> None:
        try:
            down, _ = route.listener.accept()
        except OSError:
            return
        try:
            up = socket.create_connection(route.target, timeout=5.0)
        except OSError as e:
            down.close()
            self.events.put((route.name, "unreachable", e.strerror or str(e)))
            return
        for s in (down, up):
            s.setblocking(False)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        link = _Link(route, down, up)
        route.stats.connections += 1
        self._links.append(link)
        self.sel.register(down, selectors.EVENT_READ, ("link", (link, "down")))
        self.sel.register(up, selectors.EVENT_READ, ("link", (link, "up")))

    def _update_interest(self, link: _Link) -> None:
        now = time.monotonic()
        for name, side, other in (("down", link.down, link.up), ("up", link.up, link.down)):
            if side.closed:
                continue
            mask = 0
            if other.pending < _HIGH_WATER:
                mask |= selectors.EVENT_READ
            if side.out and side.out[0][0] <= now:
                mask |= selectors.EVENT_WRITE
            if mask == side.mask:
                continue
            try:
                if not mask:
                    self.sel.unregister(side.sock)
                elif not side.mask:
                    self.sel.register(side.sock, mask, ("link", (link, name)))
                else:
                    self.sel.modify(side.sock, mask, ("link", (link, name)))
                side.mask = mask
            except (KeyError, ValueError, OSError):
                pass

    def _read(self, link: _Link, side_name: str) -> None:
        side = link.down if side_name == "down" else link.up
        try:
            data = side.sock.recv(_CHUNK)
        except BlockingIOError:
            return
        except OSError as e:
            data = None
            err = e.strerror or str(e)
        else:
            err = "closed the connection"
        if not data:
            if side_name == "up":
                self._lose_target(link, err)
            else:
                self._kill(link)
            return
        if side_name == "up":
            link.last_progress = time.monotonic()
            self._from_up(link, data)
        else:
            self._from_down(link, data)

    def _flush(self, link: _Link, side: _Side) -> None:
        now = time.monotonic()
        while side.out and side.out[0][0] <= now:
            due, mv = side.out[0]
            try:
                n = side.sock.send(mv)
            except BlockingIOError:
                return
            except OSError as e:
                if side is link.up:
                    self._lose_target(link, e.strerror or str(e))
                else:
                    self._kill(link)
                return
            side.pending -= n
            if side is link.up and n:
                link.last_progress = now
            if n < len(mv):
                side.out[0] = (due, mv[n:])
                return
            side.out.popleft()

    def _check_stall(self, link: _Link, now: float) -> None:
        t = link.route.stall_timeout
        if t is None:
            return
        waiting = bool(link.expect) or link.up.pending > 0
        if not waiting:
            link.last_progress = now  # the clock runs only while the worker owes an answer or data waits for it
        elif now - link.last_progress > t:
            self._report(link, "stalled", f"no answer for {t:g} s")
            link.last_progress = now  # report once per period

    def _report(self, link: _Link, kind: str, detail: str) -> None:
        if not link.dead:
            self.events.put((link.route.name, kind, detail))

    def _lose_target(self, link: _Link, detail: str) -> None:
        """The target failed: report it and stop relaying, but keep the client's socket open (not readable, not
        closed) so that the client blocks instead of noticing -- whoever watches the events ends it first."""
        self._report(link, "closed", detail)
        if link.down.mask:
            try:
                self.sel.unregister(link.down.sock)
            except (KeyError, ValueError, OSError):
                pass
            link.down.mask = 0
        self._held.append(link.down.sock)
        link.down.closed = True
        self._kill(link)

    def _kill(self, link: _Link) -> None:
        if link.dead:
            return
        link.dead = True
        for side in (link.down, link.up):
            if side.closed and side is link.down:
                continue
            if side.mask:
                try:
                    self.sel.unregister(side.sock)
                except (KeyError, ValueError, OSError):
                    pass
            try:
                side.sock.close()
            except OSError:
                pass
            side.closed = True
        if link in self._links:
            self._links.remove(link)
        route = link.route
        route.stats.allocated -= sum(link.buffers.values())

    # -- framing: requests (client -> worker) ------------------------------------------------------------------
    def _to_up(self, link: _Link, data: bytes) -> None:
        link.up.push(data, time.monotonic() + link.route.delay if link.route.delay else 0.0)

    def _to_down(self, link: _Link, data: bytes) -> None:
        link.down.push(data, time.monotonic() + link.route.delay if link.route.delay else 0.0)

    def _from_down(self, link: _Link, data: bytes) -> None:
        if not link.route.frames:
            self._to_up(link, data)
            return
        mv = memoryview(data)
        while mv:
            if link.req_left:  # streaming a large payload
                n = min(link.req_left, len(mv))
                self._to_up(link, mv[:n])
                if link.req_cmd == P.SET_TENSOR:
                    link.route.stats.uploaded += n
                link.req_left -= n
                mv = mv[n:]
                continue
            if link.req_collect is not None:
                n = min(link.req_size - len(link.req_collect), len(mv))
                link.req_collect += mv[:n]
                mv = mv[n:]
                if len(link.req_collect) == link.req_size:
                    payload, link.req_collect = bytes(link.req_collect), None
                    self._request(link, link.req_cmd, payload)
                continue
            need = 9 - len(link.req_hdr)
            link.req_hdr += mv[:need]
            mv = mv[need:]
            if len(link.req_hdr) < 9:
                break
            cmd, size = struct.unpack("<BQ", link.req_hdr)
            link.req_hdr = bytearray()
            link.req_cmd, link.req_size = cmd, size
            if size <= _SMALL:
                link.req_collect = bytearray()
                if size == 0:
                    link.req_collect = None
                    self._request(link, cmd, b"")
            else:
                self._to_up(link, struct.pack("<BQ", cmd, size))
                if cmd == P.GRAPH_COMPUTE:
                    link.route.stats.graph_computes += 1
                self._expect(link, cmd)
                link.req_left = size

    def _expect(self, link: _Link, cmd: int, kind=None, extra=None) -> None:
        if cmd in P.RESPONDS:
            link.expect.append([kind or "plain", extra])

    def _request(self, link: _Link, cmd: int, payload: bytes) -> None:
        route = link.route
        frame = struct.pack("<BQ", cmd, len(payload)) + payload
        if cmd == P.SET_TENSOR:
            route.stats.uploaded += max(0, len(payload) - P.TENSOR_STRUCT.size - 9)
        elif cmd in (P.GRAPH_COMPUTE, P.GRAPH_RECOMPUTE):
            route.stats.graph_computes += 1
        if route.mem_cap is not None:
            if cmd == P.ALLOC_BUFFER and len(payload) == 12:
                _, size = struct.unpack("<IQ", payload)
                if route.stats.allocated + size > route.mem_cap:  # answer "no memory" ourselves, in order
                    link.expect.append(["synthetic", struct.pack("<QQQ", 16, 0, 0)])
                    self._drain_synthetic(link)
                    return
                self._to_up(link, frame)
                self._expect(link, cmd, "alloc")
                return
            if cmd == P.GET_DEVICE_MEMORY:
                self._to_up(link, frame)
                self._expect(link, cmd, "memory")
                return
            if cmd == P.FREE_BUFFER and len(payload) == 8:
                (ptr,) = struct.unpack("<Q", payload)
                route.stats.allocated -= link.buffers.pop(ptr, 0)
        self._to_up(link, frame)
        self._expect(link, cmd)

    # -- framing: responses (worker -> client) -----------------------------------------------------------------
    def _drain_synthetic(self, link: _Link) -> None:
        """Send answers the relay made itself once every earlier answer has gone out."""
        while (link.expect and link.expect[0][0] == "synthetic" and not link.rsp_left and link.rsp_collect is None
               and not link.rsp_hdr):
            self._to_down(link, link.expect.popleft()[1])

    def _from_up(self, link: _Link, data: bytes) -> None:
        if not link.route.frames:
            self._to_down(link, data)
            return
        mv = memoryview(data)
        while mv:
            if link.rsp_left:
                n = min(link.rsp_left, len(mv))
                self._to_down(link, mv[:n])
                link.rsp_left -= n
                mv = mv[n:]
                if not link.rsp_left:
                    self._drain_synthetic(link)
                continue
            if link.rsp_collect is not None:
                n = min(link.rsp_size - len(link.rsp_collect), len(mv))
                link.rsp_collect += mv[:n]
                mv = mv[n:]
                if len(link.rsp_collect) == link.rsp_size:
                    payload, link.rsp_collect = bytes(link.rsp_collect), None
                    self._response(link, link.rsp_kind, payload)
                    self._drain_synthetic(link)
                continue
            need = 8 - len(link.rsp_hdr)
            link.rsp_hdr += mv[:need]
            mv = mv[need:]
            if len(link.rsp_hdr) < 8:
                break
            (size,) = struct.unpack("<Q", link.rsp_hdr)
            link.rsp_hdr = bytearray()
            kind = link.expect.popleft()[0] if link.expect else "plain"
            if kind in ("alloc", "memory") and size == 16:
                link.rsp_kind, link.rsp_size, link.rsp_collect = kind, size, bytearray()
            else:
                self._to_down(link, struct.pack("<Q", size))
                link.rsp_left = size
                if not size:
                    self._drain_synthetic(link)

    def _response(self, link: _Link, kind: str, payload: bytes) -> None:
        route = link.route
        if kind == "alloc":
            ptr, size = struct.unpack("<QQ", payload)
            if ptr:
                link.buffers[ptr] = size
                route.stats.allocated += size
        elif kind == "memory" and route.mem_cap is not None:
            free, total = struct.unpack("<QQ", payload)
            total = min(total, route.mem_cap)
            free = max(0, min(free, route.mem_cap - route.stats.allocated))
            payload = struct.pack("<QQ", free, total)
        self._to_down(link, struct.pack("<Q", len(payload)) + payload)
