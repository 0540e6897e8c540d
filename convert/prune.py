#!/usr/bin/env python3
"""The same as ``edge-mote prune`` (see its --help): a thin entry point over edge_mote.ship.prune."""

from __future__ import annotations

import sys

if __name__ == "__main__":
    from edge_mote.cli import main

    sys.exit(main(["prune", *sys.argv[1:]]))
