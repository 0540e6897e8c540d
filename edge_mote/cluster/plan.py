"""Where each layer should run: measure the nodes and links, then choose the split that minimises ms/token.

In the spirit of prima.cpp's Halda, for llama.cpp's layer split (``tensor_split`` over the RPC devices in the
order they are registered, the first layers optionally on the client's own CPU):

- the model (``ModelProfile``, read from the GGUF): per layer the bytes a decoded token touches (attention and
  shared weights, ``k/n`` of the routed experts), the bytes it occupies (weights + KV cache), the output layer,
  the hidden size and vocabulary (what crosses the network per token);
- each node (``NodeProfile``): free memory (RPC GET_DEVICE_MEMORY, capped by ``edge-mote worker --mem``), a
  short compute benchmark run *on the node through the RPC protocol* (a matrix-vector product of the model's
  weight type: bytes/s; and a chain of tiny ops: the fixed cost per graph node), and the link (RTT, bandwidth
  both ways), and the fixed cost per decoded token of using the worker beyond one RTT (``token_s``: a short decode
  of a tiny model through it minus the same decode here; llama.cpp's per-token work for a remote backend). The
  client is measured the same way through a temporary loopback worker;
- time per token = sum over nodes of layers x (touched bytes / node throughput + ops x op cost) + the output
  layer on the node that holds it + for every remote node on the token path one RTT plus its fixed per-token cost
  plus the hidden state each way / link rate + the logits / link rate of the node holding the output layer (the
  issue's measured model: "compute + one RTT per remote host + returned logits / link rate", plus the fixed cost);
- search: every subset of workers x every choice of the node holding the output layer (it must come last in
  llama.cpp's device order), layers filled fastest-first within each node's memory. Exhaustive up to 8 workers.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

from ..errors import EdgeMoteError, UserError
from ..runtime import rpc_protocol as P

MIB = 1 << 20
OPS_PER_WEIGHT = 3.0        # graph nodes per weight tensor of a layer (matmul + norm/rope/add/act around it)
COMPUTE_RESERVE = 64 * MIB   # compute buffers etc. per node, on top of weights and KV cache (+ logits on the output node)
MEMORY_HEADROOM = 0.9        # use at most this share of a node's free memory


# -- the model -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelProfile:
    path: str
    n_layer: int
    n_embd: int
    n_vocab: int
    layer_bytes: tuple[int, ...]       # weights per layer
    layer_touched: tuple[int, ...]     # weight bytes read per decoded token per layer
    layer_ops: tuple[int, ...]         # estimated graph nodes per layer
    kv_bytes_per_layer: int            # KV cache per layer for n_ctx
    output_bytes: int                  # output.weight + output_norm
    embd_bytes: int
    weight_type: int                   # the ggml type of most weight bytes
    n_ctx: int
    n_ubatch: int = 512                # the output node holds the logits of a micro-batch

    @property
    def output_node_bytes(self) -> int:
        return self.output_bytes + 4 * self.n_vocab * self.n_ubatch


def model_profile(path: str | os.PathLike, n_ctx: int = 2048, n_batch: int = 512) -> ModelProfile:
    import gguf

    from ..gguf_meta.profiles import check_gguf_header

    path = Path(path)
    check_gguf_header(path)
    r = gguf.GGUFReader(str(path))

    def field_value(key: str, default=None):
        f = r.fields.get(key)
        if f is None:
            return default
        return f.contents()

    arch = field_value(gguf.Keys.General.ARCHITECTURE)
    n_layer = int(field_value(gguf.Keys.LLM.BLOCK_COUNT.format(arch=arch)))
    n_embd = int(field_value(gguf.Keys.LLM.EMBEDDING_LENGTH.format(arch=arch)))
    n_expert = int(field_value(gguf.Keys.LLM.EXPERT_COUNT.format(arch=arch), 0) or 0)
    n_used = int(field_value(gguf.Keys.LLM.EXPERT_USED_COUNT.format(arch=arch), 0) or 0)
    n_head = field_value(gguf.Keys.Attention.HEAD_COUNT.format(arch=arch), 1)
    n_head_kv = field_value(gguf.Keys.Attention.HEAD_COUNT_KV.format(arch=arch), n_head)
    n_head = int(n_head if not isinstance(n_head, list) else max(n_head))
    n_head_kv = int(n_head_kv if not isinstance(n_head_kv, list) else max(n_head_kv))
    k_len = int(field_value(gguf.Keys.Attention.KEY_LENGTH.format(arch=arch), n_embd // max(n_head, 1)))
    v_len = int(field_value(gguf.Keys.Attention.VALUE_LENGTH.format(arch=arch), k_len))
    layer_bytes = [0] * n_layer
    touched = [0] * n_layer
    n_weights = [0] * n_layer
    out_bytes = embd_bytes = 0
    n_vocab = 0
    by_type: dict[int, int] = {}
    for t in r.tensors:
        name, nb = t.name, int(t.n_bytes)
        by_type[int(t.tensor_type)] = by_type.get(int(t.tensor_type), 0) + nb
        if name.startswith("blk."):
            il = int(name.split(".")[1])
            if il >= n_layer:
                continue
            layer_bytes[il] += nb
            n_weights[il] += 1
            touched[il] += nb * n_used // n_expert if ("_exps" in name and n_expert) else nb
        elif name.startswith("output"):
            out_bytes += nb
        elif name.startswith("token_embd"):
            embd_bytes += nb
            n_vocab = int(t.shape[-1]) if len(t.shape) > 1 else n_vocab
    if not any(t.name == "output.weight" for t in r.tensors):
        out_bytes += embd_bytes  # tied embeddings: the output layer reads token_embd (a copy sits on its node)
    kv = n_ctx * n_head_kv * (k_len + v_len) * 2  # f16 K and V
    return ModelProfile(str(path), n_layer, n_embd, n_vocab, tuple(layer_bytes), tuple(touched),
                        tuple(int(OPS_PER_WEIGHT * w) for w in n_weights), kv, out_bytes, embd_bytes,
                        max(by_type, key=by_type.get) if by_type else 0, n_ctx, min(n_batch, 512))


# -- the nodes -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class NodeProfile:
    name: str              # "local" or the worker's endpoint
    free: int              # bytes this node can hold
    bytes_per_s: float     # matrix-vector throughput on the model's weight type
    op_s: float            # fixed cost per graph node
    rtt_s: float = 0.0     # 0 for the local node
    up_bps: float = float("inf")    # client -> node, bytes/s
    down_bps: float = float("inf")  # node -> client
    token_s: float = 0.0   # fixed cost per decoded token on top of one RTT (0 for the local node)

    @property
    def remote(self) -> bool:
        return self.name != "local"


def _type_geometry(ggml_type: int) -> tuple[int, int]:
    import gguf

    try:
        return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
    except (KeyError, ValueError):
        return 1, 4


def _tensor(tid: int, ggml_type: int, ne: Sequence[int], buffer: int, data: int, op: int = P.GGML_OP_NONE,
            src=()) -> bytes:
    block, size = _type_geometry(ggml_type)
    ne = list(ne) + [1] * (4 - len(ne))
    nb = [size, size * (ne[0] // block)]
    nb += [nb[1] * ne[1], nb[1] * ne[1] * ne[2]]
    srcs = list(src) + [0] * (P.GGML_MAX_SRC - len(src))
    return P.TENSOR_STRUCT.pack(tid, ggml_type, buffer, *ne, *nb, op, *([0] * 16), 0, *srcs, 0, 0, data, b"", 0)


def _graph(nodes: list[int], tensors: list[bytes]) -> bytes:
    return (struct.pack("<II", 0, len(nodes)) + struct.pack(f"<{len(nodes)}Q", *nodes) + struct.pack("<I", len(tensors))
            + b"".join(tensors))


def _timed_recompute(c: P.Conn, sync_tensor: bytes, sync_size: int, reps: int, rtt: float) -> float:
    t0 = time.perf_counter()
    for _ in range(reps):
        c.send(P.GRAPH_RECOMPUTE, struct.pack("<I", 0))
    c.get_tensor(sync_tensor, sync_size)
    return max((time.perf_counter() - t0 - rtt) / reps, 1e-7)


def measure_node(endpoint: str, weight_type: int = 0, *, n_embd: int = 4096, matrix_bytes: int = 32 * MIB,
                 probe_bytes: int = 2 * MIB, name: str | None = None, timeout: float = 30.0,
                 token_cost: bool = True) -> NodeProfile:
    """Benchmark one worker through the RPC protocol (it must be idle: a worker serves one client at a time).
    The matrix has the model's row length (``n_embd``) and weight type. With ``token_cost``, the fixed cost per
    decoded token of using the worker is measured too (``measure_token_cost``: a short decode through it)."""
    info = P.preflight(endpoint, 5.0)
    host, port = P.parse_endpoint(endpoint)
    block, tsize = _type_geometry(weight_type)
    k = max(block, n_embd // block * block)
    rows = max(1, matrix_bytes // (tsize * k // block))
    try:
        with P.Conn(host, port, timeout) as c:
            c.hello()
            rtts = []
            for _ in range(15):
                t0 = time.perf_counter()
                c.alignment()
                rtts.append(time.perf_counter() - t0)
            rtt = statistics.median(rtts)
            w_bytes = tsize * (k // block) * rows
            total = w_bytes + 4 * k + 4 * rows + probe_bytes + 4096 * 4
            ptr, _ = c.alloc_buffer(total)
            if not ptr:
                raise UserError(f"RPC worker {info.endpoint} cannot allocate {total / MIB:.0f} MiB for the benchmark")
            base = c.buffer_base(ptr)
            c.send(P.BUFFER_CLEAR, struct.pack("<QB", ptr, 0))
            # link: upload and download probe_bytes
            probe = P.pack_tensor(10, (probe_bytes // 4,), buffer=ptr, data=base + w_bytes + 4 * k + 4 * rows)
            c.alignment()
            t0 = time.perf_counter()
            c.set_tensor(probe, bytes(probe_bytes))
            c.alignment()
            up = probe_bytes / max(time.perf_counter() - t0 - rtt, 1e-6)
            t0 = time.perf_counter()
            c.get_tensor(probe, probe_bytes)
            down = probe_bytes / max(time.perf_counter() - t0 - rtt, 1e-6)
            # compute: y = W x (decode is a matrix-vector product per weight)
            w = _tensor(1, weight_type, (k, rows), ptr, base)
            x = P.pack_tensor(2, (k,), buffer=ptr, data=base + w_bytes)
            y = P.pack_tensor(3, (rows,), buffer=ptr, data=base + w_bytes + 4 * k, op=P.GGML_OP_MUL_MAT, src=(1, 2))
            c.send(P.GRAPH_COMPUTE, _graph([3], [w, x, y]))
            c.get_tensor(y, 4 * rows)
            reps = 8
            t_mv = statistics.median(_timed_recompute(c, y, 4 * rows, reps, rtt) for _ in range(5))
            # op cost: 32 tiny matrix-vector products in one graph (their compute is negligible)
            small = base + w_bytes + 4 * k + 4 * rows + probe_bytes
            tensors = [P.pack_tensor(100, (64, 16), buffer=ptr, data=base),
                       P.pack_tensor(101, (64,), buffer=ptr, data=small)]
            nodes = list(range(200, 232))
            for i, tid in enumerate(nodes):
                tensors.append(P.pack_tensor(tid, (16,), buffer=ptr, data=small + 256 + 64 * i, op=P.GGML_OP_MUL_MAT,
                                             src=(100, 101)))
            c.send(P.GRAPH_COMPUTE, _graph(nodes, tensors))
            sync = P.pack_tensor(nodes[-1], (16,), buffer=ptr, data=small + 256 + 64 * 31)
            c.get_tensor(sync, 64)
            t_chain = statistics.median(_timed_recompute(c, sync, 64, reps, rtt) for _ in range(5))
            c.free_buffer(ptr)
    except (OSError, P.ProtocolError) as e:
        raise P.hello_error(info.endpoint, e, timeout) from None
    op_s = t_chain / 32
    bps = w_bytes / max(t_mv - op_s, 1e-7)
    token_s = 0.0
    if token_cost:
        # beyond what the model already counts for a remote node: one RTT, the hidden state each way, the logits
        extra = measure_token_cost(info.endpoint, timeout=max(timeout, 60.0))
        moved = 4 * PROBE_MODEL["n_embd"] * (1 / up + 1 / down) + 4 * PROBE_MODEL["n_vocab"] / down
        token_s = max(0.0, extra - rtt - moved)
    return NodeProfile(name or info.endpoint, int(info.free), bps, op_s, rtt, up, down, token_s)


PROBE_MODEL = dict(n_embd=256, n_layer=2, n_ff=512, n_head=4, n_vocab=256)


def write_probe_model(path: str | os.PathLike) -> None:
    """A tiny random dense llama (``PROBE_MODEL``, 6 MB of f32, no tokenizer) for ``measure_token_cost``."""
    import gguf
    import numpy as np

    d = PROBE_MODEL
    e, f, v = d["n_embd"], d["n_ff"], d["n_vocab"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(256)
    w.add_embedding_length(e)
    w.add_block_count(d["n_layer"])
    w.add_feed_forward_length(f)
    w.add_head_count(d["n_head"])
    w.add_head_count_kv(d["n_head"])
    w.add_rope_dimension_count(e // d["n_head"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(v)
    w.add_tokenizer_model("none")
    rng = np.random.default_rng(0)

    def rand(name, *shape):
        w.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float32))

    rand("token_embd.weight", v, e)
    w.add_tensor("output_norm.weight", np.ones(e, np.float32))
    rand("output.weight", v, e)
    for i in range(d["n_layer"]):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(e, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(e, np.float32))
        for n in ("attn_q", "attn_k", "attn_v", "attn_output"):
            rand(f"blk.{i}.{n}.weight", e, e)
        rand(f"blk.{i}.ffn_gate.weight", f, e)
        rand(f"blk.{i}.ffn_up.weight", f, e)
        rand(f"blk.{i}.ffn_down.weight", e, f)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _probe_decode(path: str, n_tokens: int, rounds: int, rpc_servers=None, progress: bool = False) -> float:
    """In the isolated child: median over ``rounds`` of (seconds per token with every layer on the worker - on this
    machine), both decoded in turn (the order alternating), greedy, one thread."""
    from ..runtime.model import load

    here = load(path, n_ctx=64, n_batch=64, n_threads=1, n_gpu_layers=0)
    try:
        there = load(path, n_ctx=64, n_batch=64, n_threads=1, rpc_servers=rpc_servers, n_gpu_layers=-1)
    except BaseException:
        here.close()
        raise
    try:
        diffs = []
        for m in (here, there):
            m.greedy([1, 2, 3], 4, stop_at_eos=False)  # warm up: graph allocation, first round trips
        for r in range(rounds):
            t = {}
            for m in ((here, there) if r % 2 == 0 else (there, here)):
                t0 = time.perf_counter()
                m.greedy([1, 2, 3], n_tokens, stop_at_eos=False)
                t[m is there] = (time.perf_counter() - t0) / n_tokens
            diffs.append(t[True] - t[False])
        return statistics.median(diffs)
    finally:
        there.close()
        here.close()


def measure_token_cost(endpoint: str, *, n_tokens: int = 12, rounds: int = 15, timeout: float = 60.0) -> float:
    """Seconds a decoded token costs more when its layers run on this worker: a short greedy decode of a tiny model
    (``write_probe_model``) with every layer on the worker minus the same decode on this machine, in the isolated
    child as real runs (so through the watchdog relay). Besides the round trip and the bytes moved, which the cost
    model counts apart, this is llama.cpp's per-token work for a remote backend on both sides (scheduling, input
    uploads, the worker waking up and running a graph): ~1-3 ms on loopback on a busy machine, far above the RTT."""
    import tempfile

    from .isolate import call

    with tempfile.TemporaryDirectory(prefix="edge-mote-probe-") as d:
        path = Path(d) / "probe.gguf"
        write_probe_model(path)
        return float(call(_probe_decode, str(path), n_tokens, rounds, rpc_servers=[endpoint], rpc_timeout=timeout,
                          progress=False))


def _local_free() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def measure_local(weight_type: int, threads: int | None = None, n_embd: int = 4096) -> NodeProfile:
    """The client's CPU, measured like a worker: a temporary ggml-rpc-server on loopback (then stopped)."""
    from ..runtime.rpc import worker_command

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = worker_command("127.0.0.1", port, threads or max(1, (os.cpu_count() or 2) // 2))
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, restore_signals=False)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                P.preflight(f"127.0.0.1:{port}", 1.0)
                break
            except UserError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise EdgeMoteError("could not start a loopback worker to measure this machine")
                time.sleep(0.1)
        node = measure_node(f"127.0.0.1:{port}", weight_type, n_embd=n_embd, name="local", token_cost=False)
    finally:
        proc.terminate()
        proc.wait()
    return replace(node, free=_local_free(), rtt_s=0.0, up_bps=float("inf"), down_bps=float("inf"), token_s=0.0)


# -- the plan ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Assignment:
    node: str
    layers: int
    output: bool
    memory: int
    compute_ms: float
    network_ms: float


@dataclass(frozen=True)
class Plan:
    model: str
    order: tuple[str, ...]            # workers in llama.cpp device order (the last one holds the output layer)
    tensor_split: tuple[float, ...]   # per worker in ``order``
    n_gpu_layers: int                 # layers (+ output) on the workers; the rest (the first ones) stay local
    local_layers: int
    predicted_ms: float
    assignments: tuple[Assignment, ...]
    nodes: tuple[NodeProfile, ...] = field(repr=False)
    kind: str = "auto"
    calibration: float = 1.0          # measured / benchmark-predicted local decode time (scales all compute)

    def load_kwargs(self) -> dict:
        return {"tensor_split": list(self.tensor_split), "n_gpu_layers": self.n_gpu_layers}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["nodes"] = [asdict(n) for n in self.nodes]
        return d


def _layer_time(node: NodeProfile, m: ModelProfile, il: int) -> float:
    return m.layer_touched[il] / node.bytes_per_s + m.layer_ops[il] * node.op_s


def predict_split(m: ModelProfile, local: NodeProfile, order: Sequence[NodeProfile], counts: Sequence[int],
              local_layers: int) -> tuple[float, list[Assignment]]:
    """Predicted seconds per token of a split (``order``: workers, the last one holds the output layer)."""
    out: list[Assignment] = []
    total = 0.0
    il = 0
    nodes = [(local, local_layers)] + list(zip(order, counts))
    holder = order[-1] if order else local
    for node, c in nodes:
        comp = sum(_layer_time(node, m, j) for j in range(il, il + c))
        mem = sum(m.layer_bytes[il: il + c]) + m.kv_bytes_per_layer * c
        is_out = node is holder
        if is_out:
            comp += m.output_bytes / node.bytes_per_s + 4 * node.op_s
            mem += m.output_node_bytes
        if node is local:
            mem += m.embd_bytes
        net = 0.0
        if node.remote and c > 0:
            hidden = 4 * m.n_embd
            net = node.rtt_s + node.token_s + hidden / node.up_bps + hidden / node.down_bps
            if is_out:
                net += 4 * m.n_vocab / node.down_bps
        total += comp + net
        out.append(Assignment(node.name, c, is_out, int(mem + COMPUTE_RESERVE), comp * 1e3, net * 1e3))
        il += c
    return total, out


def _fits(m: ModelProfile, node: NodeProfile, layers: int, start: int, output: bool, local: bool) -> bool:
    mem = sum(m.layer_bytes[start: start + layers]) + m.kv_bytes_per_layer * layers + COMPUTE_RESERVE
    mem += m.output_node_bytes if output else 0
    mem += m.embd_bytes if local else 0
    return mem <= node.free * MEMORY_HEADROOM


def _capacity(m: ModelProfile, node: NodeProfile, output: bool, local: bool) -> int:
    per = (sum(m.layer_bytes) / max(m.n_layer, 1)) + m.kv_bytes_per_layer
    room = node.free * MEMORY_HEADROOM - COMPUTE_RESERVE - (m.output_node_bytes if output else 0) \
        - (m.embd_bytes if local else 0)
    return max(0, min(m.n_layer, int(room // per))) if per > 0 else m.n_layer


def make_plan(m: ModelProfile, local: NodeProfile, workers: Sequence[NodeProfile], *,
              use_local: bool = True) -> Plan:
    """The split with the least predicted time per token that fits every node's memory."""
    if len(workers) > 8:
        raise UserError("the planner searches up to 8 workers; pass fewer --rpc workers")
    best = None
    for r in range(1, len(workers) + 1):
        for subset in itertools.combinations(workers, r):
            for holder in subset:
                order = [w for w in subset if w is not holder] + [holder]
                caps = [_capacity(m, w, w is holder, False) for w in order]
                cap_local = _capacity(m, local, False, True) if use_local else 0
                if any(c < 1 for c in caps) or sum(caps) + cap_local < m.n_layer:
                    continue
                counts = [1] * len(order)
                lc = 0
                left = m.n_layer - len(order)
                if left < 0:
                    continue
                # fill fastest first (time per average layer)
                speed = sorted([(-1, local)] + list(enumerate(order)) if use_local else list(enumerate(order)),
                               key=lambda t: _layer_time(t[1], m, 0))
                for i, node in speed:
                    room = (cap_local - lc) if i < 0 else (caps[i] - counts[i])
                    take = max(0, min(room, left))
                    if i < 0:
                        lc += take
                    else:
                        counts[i] += take
                    left -= take
                if left > 0:
                    continue
                t, assign = predict_split(m, local, order, counts, lc)
                if best is None or t < best[0]:
                    best = (t, order, counts, lc, assign)
    if best is None:
        need = (sum(m.layer_bytes) + m.output_bytes + m.kv_bytes_per_layer * m.n_layer) / (1 << 30)
        have = sum(w.free for w in workers) / (1 << 30)
        raise UserError(f"the model ({need:.1f} GiB with its KV cache) does not fit the workers' free memory "
                        f"({have:.1f} GiB)", hint="add workers, raise their --mem, or lower --ctx")
    t, order, counts, lc, assign = best
    return _plan(m, local, order, counts, lc, t, assign, "auto")


def _plan(m, local, order, counts, lc, t, assign, kind) -> Plan:
    split = [float(c) for c in counts]
    split[-1] += 1.0  # the output slot
    return Plan(m.path, tuple(w.name for w in order), tuple(split), m.n_layer - lc + 1, lc, t * 1e3, tuple(assign),
                tuple([local] + list(order)), kind)


def even_plan(m: ModelProfile, local: NodeProfile, workers: Sequence[NodeProfile]) -> Plan:
    """Every layer on the workers, equal shares, in the order given (the last one holds the output layer)."""
    n = len(workers)
    counts = [m.n_layer // n + (1 if i < m.n_layer % n else 0) for i in range(n)]
    t, assign = predict_split(m, local, list(workers), counts, 0)
    return _plan(m, local, list(workers), counts, 0, t, assign, "even")


def measure_cluster(model: str | os.PathLike, endpoints: Sequence[str], *, n_ctx: int = 2048, n_batch: int = 512,
                    n_threads: int | None = None, progress=None) -> tuple[ModelProfile, NodeProfile, list[NodeProfile]]:
    m = model_profile(model, n_ctx, n_batch)
    local = measure_local(m.weight_type, n_threads, m.n_embd)
    workers = []
    for ep in endpoints:
        if progress:
            progress(ep)
        workers.append(measure_node(ep, m.weight_type, n_embd=m.n_embd))
    return m, local, workers


def calibration(m: ModelProfile, local: NodeProfile, n_threads: int | None = None, n_tokens: int = 8) -> float:
    """How much slower real decoding is than the benchmark predicts, measured on this machine with the model
    itself (a short greedy decode, when the model fits here; 1.0 otherwise). Real layers run more kinds of kernels
    than a matrix-vector product, and each token costs the client some fixed work: both are in this factor, which
    scales the compute of every node (they run the same ggml kernels)."""
    import time as _time

    from ..runtime.model import load

    size = Path(m.path).stat().st_size
    if size > 0.5 * local.free:
        return 1.0
    with load(m.path, n_ctx=max(64, min(m.n_ctx, 512)), n_batch=m.n_ubatch, n_threads=n_threads) as model:
        toks = model.tokenize("The home cluster")
        model.greedy(toks, 3, stop_at_eos=False)
        t0 = _time.perf_counter()
        model.greedy(toks, n_tokens, stop_at_eos=False)
        measured = (_time.perf_counter() - t0) / n_tokens
    predicted = predict_split(m, local, [], [], m.n_layer)[0]
    return min(max(measured / predicted, 0.5), 8.0)


def calibrated(nodes: Sequence[NodeProfile], factor: float) -> list[NodeProfile]:
    return [replace(n, bytes_per_s=n.bytes_per_s / factor, op_s=n.op_s * factor) for n in nodes]


def plan_cluster(model: str | os.PathLike, endpoints: Sequence[str], *, n_ctx: int = 2048, n_batch: int = 512,
                 n_threads: int | None = None, use_local: bool = True) -> tuple[Plan, Plan]:
    """Measure and plan: ``(best plan, even split)`` with their predicted ms/token."""
    m, local, workers = measure_cluster(model, endpoints, n_ctx=n_ctx, n_batch=n_batch, n_threads=n_threads)
    f = calibration(m, local, n_threads)
    local, *workers = calibrated([local] + workers, f)
    best, even = make_plan(m, local, workers, use_local=use_local), even_plan(m, local, workers)
    return replace(best, calibration=f), replace(even, calibration=f)


def apply_plan(plan, args: tuple, kwargs: dict, infos: list) -> tuple[list, dict]:
    """For ``isolate.call``: reorder the workers and return the load keyword arguments of ``plan``
    (``"auto"``, ``"even"``, a ``Plan`` or a plan JSON file written by ``edge-mote cluster plan -o``)."""
    by_name = {i.endpoint: i for i in infos}
    if isinstance(plan, (str, os.PathLike)) and plan not in ("auto", "even"):
        try:
            d = json.loads(Path(plan).read_text())
            order, split, ngl = d["order"], d["tensor_split"], int(d["n_gpu_layers"])
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"cannot read plan {plan}: {e}", hint="--plan auto|even|PLAN.json") from None
        missing = [o for o in order if o not in by_name]
        if missing:
            raise UserError(f"plan {plan} places layers on {', '.join(missing)}, not in --rpc")
        return [by_name[o] for o in order], {"tensor_split": split, "n_gpu_layers": ngl}
    if plan == "even":
        return infos, {"tensor_split": [1.0] * len(infos), "n_gpu_layers": -1}
    if plan == "auto":
        model = args[0] if args else kwargs.get("model")
        if model is None:
            raise UserError("--plan auto needs the model path")
        plan, _ = plan_cluster(model, [i.endpoint for i in infos], n_ctx=kwargs.get("n_ctx") or 2048,
                               n_batch=kwargs.get("n_batch") or 512, n_threads=kwargs.get("n_threads"))
    if not isinstance(plan, Plan):
        raise UserError(f"unknown --plan '{plan}': use auto, even or a plan JSON file")
    return [by_name[o] for o in plan.order], plan.load_kwargs()


def render(plan: Plan, even: Plan | None = None) -> str:
    rows = [("node", "layers", "output", "memory", "free", "GB/s", "op µs", "RTT ms", "token ms", "up Mbit/s",
             "compute ms", "network ms")]
    nodes = {n.name: n for n in plan.nodes}
    for a in plan.assignments:
        n = nodes[a.node]
        mbit = "-" if not n.remote else f"{8 * n.up_bps / 1e6:.0f}"
        rows.append((a.node, str(a.layers), "yes" if a.output else "", f"{a.memory / MIB:.0f} MiB",
                     f"{n.free / MIB:.0f} MiB", f"{n.bytes_per_s / 1e9:.1f}", f"{n.op_s * 1e6:.1f}",
                     "-" if not n.remote else f"{n.rtt_s * 1e3:.2f}",
                     "-" if not n.remote else f"{n.token_s * 1e3:.2f}", mbit, f"{a.compute_ms:.2f}",
                     f"{a.network_ms:.2f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.append("")
    lines.append(f"predicted {plan.predicted_ms:.2f} ms/token ({1e3 / plan.predicted_ms:.1f} tok/s); "
                 f"--tensor-split {','.join(f'{x:g}' for x in plan.tensor_split)} over {', '.join(plan.order)}, "
                 f"{plan.local_layers} first layer(s) on this machine; compute calibrated x{plan.calibration:.2f} "
                 "by a short local decode")
    if even is not None:
        lines.append(f"even split over the workers: predicted {even.predicted_ms:.2f} ms/token")
    return "\n".join(lines)
