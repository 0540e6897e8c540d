#!/usr/bin/env python3
"""The same as ``edge-mote info MODEL --tensors`` (quantization mix, expert tensors, router precision, profiles)."""

from __future__ import annotations

import sys

if __name__ == "__main__":
    from edge_mote.cli import main

    sys.exit(main(["info", "--tensors", *sys.argv[1:]]))
