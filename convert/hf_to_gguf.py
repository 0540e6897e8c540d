#!/usr/bin/env python3
"""Convert a Hugging Face model (folder or Hub repo id) to GGUF: the same as ``edge-mote convert`` (see its --help)."""

from __future__ import annotations

import sys

if __name__ == "__main__":
    from edge_mote.cli import main

    sys.exit(main(["convert", *sys.argv[1:]]))
