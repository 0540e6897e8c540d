"""edge-mote's Python side of the ggml-rpc protocol matches the vendored llama.cpp it was built from."""

from __future__ import annotations

import re

from edge_mote.runtime import rpc_protocol as P


def _src(vendor_dir, rel):
    return (vendor_dir / rel).read_text()


def test_version_and_commands_match_vendored_sources(vendor_dir):
    h = _src(vendor_dir, "ggml/include/ggml-rpc.h")
    version = tuple(int(re.search(rf"RPC_PROTO_{k}_VERSION\s+(\d+)", h).group(1)) for k in ("MAJOR", "MINOR", "PATCH"))
    assert version == P.PROTO_VERSION
    t = _src(vendor_dir, "ggml/src/ggml-rpc/transport.h")
    assert int(re.search(r"RPC_CONN_CAPS_SIZE\s*=\s*(\d+)", t).group(1)) == P.CONN_CAPS_SIZE
    c = _src(vendor_dir, "ggml/src/ggml-rpc/ggml-rpc.cpp")
    enum = re.search(r"enum rpc_cmd \{(.*?)\};", c, re.S).group(1)
    names = re.findall(r"RPC_CMD_(\w+)", enum)
    for i, name in enumerate(names):
        assert getattr(P, name if name != "COUNT" else "CMD_COUNT") == i, name
    # the commands that answer: the cases of rpc_serve_client that call send_msg
    serve = c[c.index("static void rpc_serve_client"):c.index("void ggml_backend_rpc_start_server")]
    cases = re.split(r"case RPC_CMD_", serve)[1:]
    answering = {getattr(P, case.split(":")[0]) for case in cases if "send_msg" in case}
    assert answering | {P.HELLO} == P.RESPONDS


def test_tensor_layout_and_ggml_enums(vendor_dir):
    c = _src(vendor_dir, "ggml/src/ggml-rpc/ggml-rpc.cpp")
    fields = re.search(r"struct rpc_tensor \{(.*?)\};", c, re.S).group(1)
    sizes = {"uint64_t": 8, "uint32_t": 4, "int32_t": 4, "char": 1}
    dims = {"GGML_MAX_DIMS": P.GGML_MAX_DIMS, "GGML_MAX_SRC": P.GGML_MAX_SRC,
            "GGML_MAX_OP_PARAMS / sizeof(int32_t)": P.GGML_MAX_OP_PARAMS // 4, "GGML_MAX_NAME": P.GGML_MAX_NAME}
    total = 0
    for typ, rest in re.findall(r"(uint64_t|uint32_t|int32_t|char)\s+([^;]+);", fields):
        m = re.search(r"\[(.*)\]", rest)
        total += sizes[typ] * (dims[m.group(1).strip()] if m else 1)
    assert total == P.TENSOR_STRUCT.size
    g = _src(vendor_dir, "ggml/include/ggml.h")
    start = g.index("enum ggml_op {")
    body = g[start:g.index("GGML_OP_COUNT,", start)]
    ops = re.findall(r"^\s*(GGML_OP_\w+)", body, re.M)
    assert ops.index("GGML_OP_MUL_MAT") == P.GGML_OP_MUL_MAT
    assert int(re.search(r"GGML_TENSOR_FLAG_COMPUTE\s*=\s*(\d+)", g).group(1)) == P.GGML_TENSOR_FLAG_COMPUTE
    for name, value in (("GGML_MAX_DIMS", P.GGML_MAX_DIMS), ("GGML_MAX_SRC", P.GGML_MAX_SRC),
                        ("GGML_MAX_OP_PARAMS", P.GGML_MAX_OP_PARAMS)):
        assert int(re.search(rf"#define {name}\s+(\d+)", g).group(1)) == value


def test_endpoint_parsing():
    assert P.parse_endpoint("10.0.0.2:50052") == ("10.0.0.2", 50052)
    assert P.parse_endpoint("[fe80::1]:7000") == ("fe80::1", 7000)
    assert P.parse_endpoint("box.local:1") == ("box.local", 1)
    assert P.format_endpoint("::1", 5) == "[::1]:5"
    for bad in ("::1:5", "[::1]5", "host:", "host:0", "host:x", ""):
        try:
            P.parse_endpoint(bad)
        except Exception as e:
            assert type(e).__name__ == "UserError"
        else:
            raise AssertionError(bad)
