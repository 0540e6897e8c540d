#!/usr/bin/env python3
"""Fuzz edge-mote's parsers with generated malformed inputs (tests/fuzz) and report crashes and unclear rejections.

    .venv/bin/python bench/fuzz_parsers.py                      # 10 000 inputs per Python parser, 300 native loads
    .venv/bin/python bench/fuzz_parsers.py -n 20000 --native 1000 --seed 3

Python parsers: Steering.parse, Steering.from_dict / from_json, scan.json (load_scan + scan_ranking +
steering_from_ranking), GGUF edge-mote metadata (gguf_meta.profiles.read_profiles), the profile cache JSON
(read_profiles_cached). Native: llama.cpp's default-profile reader, loading a tiny model with damaged edge-mote
metadata through edge_mote.load in a child process (about 1-3 s per load on 2 cores, hence fewer cases).
Exit status 1 when anything failed; failing inputs are saved in the work folder.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    import warnings

    from tests.fuzz.harness import run_python
    from tests.fuzz.native import run_native

    warnings.simplefilter("ignore")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=10_000, help="inputs per Python parser")
    ap.add_argument("--native", type=int, default=300, help="native (llama.cpp) loads; 0: skip")
    ap.add_argument("--model", type=Path, default=None, help="tiny qwen3moe GGUF (default: the tests' cached one)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="edge-mote-fuzz-"))
    failed = 0
    for rep in run_python(args.n, args.seed, work):
        print(rep.line(), flush=True)
        for f in rep.failures[:5]:
            print(f"    {f['error'][:200]}\n      input: {f['input'][:200]}")
        failed += len(rep.failures)
        (work / f"failures-{rep.target.split()[0].replace('/', '_')}.json").write_text(json.dumps(rep.failures, indent=1))
    if args.native:
        model = args.model or next(iter(sorted((Path.home() / ".cache" / "edge-mote" / "test-models").glob(
            "*/qwen3moe/model-f32.gguf"), key=lambda p: p.stat().st_mtime, reverse=True)), None)
        if model is None:
            print("no tiny qwen3moe model: run the tests once (they build it) or pass --model", file=sys.stderr)
            return 2
        rep = run_native(model, args.native, args.seed, work)
        print(rep.line())
        for c in rep.crashes[:5]:
            print(f"    crash: {c}")
        for f in rep.failures[:5]:
            print(f"    {f}")
        failed += len(rep.crashes) + len(rep.failures)
    print(f"work folder: {work}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
