#!/usr/bin/env python3
"""Convert a Hugging Face model folder to GGUF with the patched build's own convert_hf_to_gguf.py."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    from edge_mote.conversion import convert_hf_to_gguf
    from edge_mote.errors import EdgeMoteError
    from edge_mote.runtime.native import vendored_llama_cpp

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("hf_dir", type=Path)
    ap.add_argument("-o", "--output", type=Path, required=True)
    ap.add_argument("--outtype", default="f16", choices=["f32", "f16", "bf16", "q8_0", "auto"])
    args = ap.parse_args(argv)
    try:
        out = convert_hf_to_gguf(args.hf_dir, args.output, vendored_llama_cpp(), outtype=args.outtype)
    except (EdgeMoteError, RuntimeError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
