"""The ggml-rpc wire protocol, spoken from Python: the hello preflight, device memory, and small benchmarks.

Mirrors ``ggml/src/ggml-rpc/ggml-rpc.cpp`` of the vendored llama.cpp (protocol v7.0.0; a unit test checks the
constants against the vendored sources):

    request : | cmd (1 byte) | size (8 bytes, little endian) | payload (size bytes) |
    response: | size (8 bytes) | payload |              (only the commands in ``RESPONDS`` answer)

A connection starts with HELLO (payload: 24 bytes of transport capabilities, zeros = plain TCP), answered by
``major, minor, patch, pad`` + 24 capability bytes. A worker serves one client at a time (others wait in the
accept queue) and frees everything that client allocated when it disconnects.
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass

from ..errors import UserError

PROTO_VERSION = (7, 0, 0)  # ggml-rpc.h: RPC_PROTO_{MAJOR,MINOR,PATCH}_VERSION
CONN_CAPS_SIZE = 24        # transport.h: RPC_CONN_CAPS_SIZE

# enum rpc_cmd
(ALLOC_BUFFER, GET_ALIGNMENT, GET_MAX_SIZE, BUFFER_GET_BASE, FREE_BUFFER, BUFFER_CLEAR, SET_TENSOR, SET_TENSOR_HASH,
 GET_TENSOR, COPY_TENSOR, GRAPH_COMPUTE, GET_DEVICE_MEMORY, INIT_TENSOR, GET_ALLOC_SIZE, HELLO, DEVICE_COUNT,
 GRAPH_RECOMPUTE, MEMSET_TENSOR, NONE, CMD_COUNT) = range(20)

# commands the worker answers (rpc_serve_client: the ones that call send_msg)
RESPONDS = frozenset({HELLO, DEVICE_COUNT, ALLOC_BUFFER, GET_ALLOC_SIZE, GET_ALIGNMENT, GET_MAX_SIZE, BUFFER_GET_BASE,
                      SET_TENSOR_HASH, GET_TENSOR, COPY_TENSOR, GET_DEVICE_MEMORY})

HELLO_RSP_SIZE = 4 + CONN_CAPS_SIZE

# ggml enums used by the compute benchmark (ggml.h)
GGML_TYPE_F32 = 0
GGML_TENSOR_FLAG_COMPUTE = 16  # a graph node without it is skipped
GGML_OP_NONE, GGML_OP_MUL_MAT = 0, 29
GGML_MAX_DIMS, GGML_MAX_SRC, GGML_MAX_OP_PARAMS, GGML_MAX_NAME = 4, 10, 64, 64

# struct rpc_tensor (packed): id, type, buffer, ne[4], nb[4], op, op_params[16], flags, src[10], view_src,
# view_offs, data, name[64], use_count
TENSOR_STRUCT = struct.Struct("<QIQ4I4II16iI10QQQQ64si")
assert TENSOR_STRUCT.size % 8 == 0


def version_text(v) -> str:
    return ".".join(str(x) for x in v)


def format_endpoint(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_endpoint(text: str, default_port: int | None = None) -> tuple[str, int]:
    """``HOST:PORT``, ``[IPv6]:PORT`` or a host name; bare IPv6 addresses must be bracketed."""
    t = text.strip()
    if t.startswith("["):
        host, sep, rest = t[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise UserError(f"bad RPC worker '{text}': expected [IPv6]:PORT, e.g. [::1]:50052")
        port_text = rest[1:] if rest else ""
    else:
        if t.count(":") > 1:
            raise UserError(f"bad RPC worker '{text}': put an IPv6 address in brackets, e.g. [{t.rsplit(':', 1)[0]}]:"
                            f"{t.rsplit(':', 1)[1]}")
        host, _, port_text = t.partition(":")
    if not host or (not port_text and default_port is None):
        raise UserError(f"bad RPC worker '{text}': expected HOST:PORT, e.g. 192.168.1.20:50052")
    try:
        port = int(port_text) if port_text else int(default_port)
    except ValueError:
        raise UserError(f"bad RPC worker '{text}': PORT must be a number") from None
    if not 0 < port < 65536:
        raise UserError(f"bad RPC worker '{text}': PORT must be 1-65535")
    return host, port


class ProtocolError(Exception):
    """The peer broke the protocol or went away (the message says how)."""


class Conn:
    """A client connection to one worker (blocking, with a timeout on every operation)."""

    def __init__(self, host: str, port: int, timeout: float = 5.0):
        self.endpoint = format_endpoint(host, port)
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _recv(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(min(n - len(buf), 1 << 20))
            if not chunk:
                raise ProtocolError(f"closed the connection after {len(buf)} of {n} bytes")
            buf += chunk
        return bytes(buf)

    def send(self, cmd: int, payload: bytes = b"") -> None:
        self.sock.sendall(struct.pack("<BQ", cmd, len(payload)) + payload)

    def call(self, cmd: int, payload: bytes = b"", expect: int | None = None) -> bytes:
        self.send(cmd, payload)
        head = self._recv(8)
        (size,) = struct.unpack("<Q", head)
        if expect is not None and size != expect:
            raise ProtocolError(f"answered with {size} bytes where {expect} were expected (first bytes: {head!r})")
        return self._recv(size)

    # -- commands ----------------------------------------------------------------------------------------------
    def hello(self) -> tuple[int, int, int]:
        rsp = self.call(HELLO, bytes(CONN_CAPS_SIZE), expect=HELLO_RSP_SIZE)
        return rsp[0], rsp[1], rsp[2]

    def device_count(self) -> int:
        return struct.unpack("<I", self.call(DEVICE_COUNT, b"", expect=4))[0]

    def device_memory(self, device: int = 0) -> tuple[int, int]:
        return struct.unpack("<QQ", self.call(GET_DEVICE_MEMORY, struct.pack("<I", device), expect=16))

    def alignment(self, device: int = 0) -> int:
        return struct.unpack("<Q", self.call(GET_ALIGNMENT, struct.pack("<I", device), expect=8))[0]

    def alloc_buffer(self, size: int, device: int = 0) -> tuple[int, int]:
        return struct.unpack("<QQ", self.call(ALLOC_BUFFER, struct.pack("<IQ", device, size), expect=16))

    def buffer_base(self, remote_ptr: int) -> int:
        return struct.unpack("<Q", self.call(BUFFER_GET_BASE, struct.pack("<Q", remote_ptr), expect=8))[0]

    def free_buffer(self, remote_ptr: int) -> None:
        self.send(FREE_BUFFER, struct.pack("<Q", remote_ptr))

    def set_tensor(self, tensor: bytes, data: bytes, offset: int = 0) -> None:
        self.send(SET_TENSOR, tensor + struct.pack("<BQ", 0, offset) + data)

    def get_tensor(self, tensor: bytes, size: int, offset: int = 0) -> bytes:
        return self.call(GET_TENSOR, tensor + struct.pack("<QQ", offset, size), expect=size)


def pack_tensor(tid: int, ne, *, buffer: int = 0, data: int = 0, op: int = GGML_OP_NONE, src=(),
                ggml_type: int = GGML_TYPE_F32, name: str = "", flags: int | None = None) -> bytes:
    """An f32 rpc_tensor (contiguous strides); an op result gets the COMPUTE flag unless ``flags`` says otherwise."""
    if flags is None:
        flags = GGML_TENSOR_FLAG_COMPUTE if op != GGML_OP_NONE else 0
    ne = list(ne) + [1] * (GGML_MAX_DIMS - len(ne))
    nb = [4]
    for i in range(1, GGML_MAX_DIMS):
        nb.append(nb[-1] * ne[i - 1])
    srcs = list(src) + [0] * (GGML_MAX_SRC - len(src))
    return TENSOR_STRUCT.pack(tid, ggml_type, buffer, *ne, *nb, op, *([0] * 16), flags, *srcs, 0, 0, data,
                        name.encode()[:GGML_MAX_NAME - 1], 0)


@dataclass(frozen=True)
class WorkerInfo:
    endpoint: str
    version: tuple[int, int, int]
    devices: tuple[tuple[int, int], ...]  # (free, total) bytes per device
    hello_ms: float

    @property
    def free(self) -> int:
        return sum(f for f, _ in self.devices)


def hello_error(endpoint: str, e: BaseException, timeout: float) -> UserError:
    """The one-line error for a failed preflight."""
    if isinstance(e, socket.timeout):
        return UserError(f"RPC worker {endpoint} accepted the connection but did not answer the RPC hello within "
                         f"{timeout:g} s (busy with another client, frozen or asleep, or not an RPC worker)",
                         hint="a worker serves one client at a time: check that no other run uses it")
    if isinstance(e, ProtocolError):
        return UserError(f"{endpoint} is not a compatible RPC worker: it {e}",
                         hint=f"start one there with `edge-mote worker` (ggml-rpc protocol "
                              f"v{version_text(PROTO_VERSION)})")
    if isinstance(e, OSError):
        return UserError(f"RPC worker {endpoint} is unreachable ({e.strerror or e})",
                         hint="start one there with `edge-mote worker --port PORT` (or ggml-rpc-server)")
    return UserError(f"RPC worker {endpoint}: {e}")


def preflight(endpoint: str, timeout: float = 5.0) -> WorkerInfo:
    """Connect, say hello (version checked) and read the worker's devices; a one-line UserError otherwise.

    This is the check ggml skips: it aborts the whole process on a port that is not a worker or on a version
    mismatch, and hangs on a frozen one.
    """
    host, port = parse_endpoint(endpoint)
    ep = format_endpoint(host, port)
    t0 = time.perf_counter()
    try:
        with Conn(host, port, timeout) as c:
            version = c.hello()
            hello_ms = (time.perf_counter() - t0) * 1e3
            if version[0] != PROTO_VERSION[0] or version[1] > PROTO_VERSION[1]:
                raise UserError(f"RPC worker {ep} speaks ggml-rpc protocol v{version_text(version)}; this edge-mote "
                                f"needs v{PROTO_VERSION[0]}.x (up to v{version_text(PROTO_VERSION)})",
                                hint="run the same llama.cpp version on every machine (`edge-mote worker` from "
                                     "the same edge-mote release)")
            n = c.device_count()
            if n < 1:
                raise UserError(f"RPC worker {ep} offers no device")
            devices = tuple(c.device_memory(d) for d in range(n))
    except UserError:
        raise
    except (OSError, ProtocolError) as e:
        raise hello_error(ep, e, timeout) from None
    return WorkerInfo(ep, version, devices, hello_ms)
