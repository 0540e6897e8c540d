#!/usr/bin/env python3
"""Make a tiny random MoE model of a real architecture (transformers) and convert it to GGUF (no downloads)."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path


def main(argv=None) -> int:
    from edge_mote.conversion import convert_hf_to_gguf
    from edge_mote.errors import EdgeMoteError
    from edge_mote.fileio import check_output
    from edge_mote.runtime.native import vendored_llama_cpp
    from edge_mote.tiny import TINY_ARCHS, make_tiny_hf_model

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("arch", choices=TINY_ARCHS)
    ap.add_argument("-o", "--output", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--outtype", default="f32", choices=["f32", "f16"])
    args = ap.parse_args(argv)
    try:
        check_output(args.output)  # before building the model
        vendor = vendored_llama_cpp()
        with tempfile.TemporaryDirectory() as tmp:
            hf = make_tiny_hf_model(args.arch, Path(tmp) / "hf", vendor / "models" / "ggml-vocab-gpt-2.gguf",
                                    seed=args.seed)
            print(convert_hf_to_gguf(hf, args.output, vendor, outtype=args.outtype))
    except (EdgeMoteError, RuntimeError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
