"""The architecture list (edge_mote/arch_support.py) against both sides: every MoE architecture that the installed
transformers and the vendored convert_hf_to_gguf.py both know is listed, and the 'disagrees' entries really disagree."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import edge_mote
from edge_mote.arch_support import ARCHITECTURES
from edge_mote.tiny import TINY_ARCHS
from edge_mote.tiny_archs import EXTRA_ARCHS

from .reference import load_reference_model
from .suite import PROMPT

# Runs with the vendored gguf-py first on the path (it knows llama.cpp's newest architectures); prints
# "<transformers name> <llama.cpp arch>" for every converter registration whose arch has a router tensor
# (ffn_gate_inp) and whose transformers class exists and defines routed experts.
_LIST = r'''
import ast, importlib, inspect, sys
from pathlib import Path
v = Path(sys.argv[1])
import gguf, transformers
moe = {a for a, ts in gguf.MODEL_TENSORS.items() if gguf.MODEL_TENSOR.FFN_GATE_INP in ts}
classes = {}
for f in sorted((v / "conversion").glob("*.py")):
    for node in ast.parse(f.read_text(encoding="utf-8")).body:
        if not isinstance(node, ast.ClassDef):
            continue
        regs = [a.value for d in node.decorator_list if isinstance(d, ast.Call) and getattr(d.func, "attr", "") == "register"
                for a in d.args if isinstance(a, ast.Constant)]
        arch = None
        for st in node.body:
            if isinstance(st, (ast.Assign, ast.AnnAssign)):
                tgt = st.targets[0] if isinstance(st, ast.Assign) else st.target
                if getattr(tgt, "id", "") == "model_arch" and isinstance(st.value, ast.Attribute):
                    arch = st.value.attr
        classes[node.name] = (regs, arch, [getattr(b, "id", getattr(b, "attr", None)) for b in node.bases])
def arch_of(c, seen=()):
    regs, arch, bases = classes[c]
    if arch:
        return arch
    for b in bases:
        if b in classes and b not in seen and (a := arch_of(b, seen + (c,))):
            return a
for c, (regs, _, _) in classes.items():
    a = arch_of(c)
    if not a or getattr(gguf.MODEL_ARCH, a) not in moe:
        continue
    for r in regs:
        cls = getattr(transformers, r, None)
        if cls is not None and "Experts(" in inspect.getsource(importlib.import_module(cls.__module__)):
            print(r, gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, a)])
'''


def test_every_moe_architecture_of_both_sides_is_listed(vendor_dir):
    env = dict(os.environ, PYTHONPATH=str(vendor_dir / "gguf-py"), HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", _LIST, str(vendor_dir)], capture_output=True, text=True, env=env,
                         check=True).stdout
    both = dict(line.split() for line in out.splitlines() if line.strip())
    assert len(both) >= 40, f"suspiciously few architectures found: {both}"
    missing = sorted(set(both) - set(ARCHITECTURES))
    assert not missing, f"MoE architectures of both transformers and the converter not in arch_support: {missing}"
    wrong = {n: (both[n], ARCHITECTURES[n].gguf_arch) for n in both if both[n] != ARCHITECTURES[n].gguf_arch}
    assert not wrong, f"llama.cpp arch names differ (found, listed): {wrong}"


def test_verified_and_disagreeing_entries_name_a_tiny_model():
    for name, a in ARCHITECTURES.items():
        assert a.status in ("verified", "disagrees", "untested"), name
        if a.status == "verified":
            assert a.tiny in TINY_ARCHS + EXTRA_ARCHS, name
        if a.status != "verified":
            assert a.note, f"{name}: say why it is not verified"


@pytest.mark.parametrize("name", [n for n, a in ARCHITECTURES.items() if a.status == "disagrees" and a.tiny])
def test_disagreeing_architectures_do_disagree_unsteered(name, arch_model, native):
    """The stock transformers forward and llama.cpp differ clearly on the unsteered tiny model (if this fails, the
    disagreement is gone: run the oracle suite on the architecture and mark it verified)."""
    hf, gguf = arch_model(ARCHITECTURES[name].tiny)
    ref = load_reference_model(hf)
    with edge_mote.load(gguf, n_ctx=256, n_threads=2, type_k=0, type_v=0) as model:
        tokens = model.tokenize(PROMPT, add_bos=False)
        ours = model.logits(tokens)
    with torch.no_grad():
        theirs = ref(input_ids=torch.tensor([tokens]), use_cache=False).logits[0].float().numpy()
    assert np.abs(ours - theirs).max() > 1e-3


@pytest.mark.parametrize("name", [n for n, a in ARCHITECTURES.items() if a.status == "disagrees" and a.tiny])
def test_steering_is_refused_where_it_cannot_be_verified(name, arch_model, native, tmp_path, capsys):
    """On a 'disagrees' architecture the model runs unsteered, and every way to steer it is a one-line UserError
    naming the architecture: context-wide, per sequence, a stored profile, a GGUF's default profile, profile add."""
    from edge_mote.api import add_profile
    from edge_mote.errors import UserError
    from edge_mote.gguf_meta.profiles import Profile, write_profiles
    from edge_mote.steering import Steering

    arch = ARCHITECTURES[name].gguf_arch
    _, gguf = arch_model(ARCHITECTURES[name].tiny)
    with edge_mote.load(gguf, n_ctx=64, n_threads=2, type_k=0, type_v=0) as model:
        tokens = model.tokenize(PROMPT, add_bos=False)[:8]
        model.logits(tokens)  # unsteered: fine
        model.routing(tokens)  # so is the capture
        steering = Steering(off=[(model.info.moe_layers[0], 1)])
        for attempt in (lambda: model.set_steering(steering),
                        lambda: model.set_steering(f"bias={model.info.moe_layers[-1]}:0=2"),
                        lambda: model.logits_many([tokens], steerings=[steering]),
                        lambda: model.greedy_many([tokens], 2, steerings=[steering])):
            with pytest.raises(UserError, match=f"'{arch}'.*cannot be verified"):
                attempt()
        with model.open_batch(2, 32) as pc:
            with pytest.raises(UserError, match=f"'{arch}'"):
                pc.set_sequence_steering(1, steering)
        assert not model.steering
        model.logits(tokens)
    with pytest.raises(UserError, match=f"'{arch}'"):
        add_profile(gguf, tmp_path / "added.gguf", "p", steering)
    assert not (tmp_path / "added.gguf").exists()
    # a file that carries a default profile (written past profile add) does not load
    steered = write_profiles(gguf, tmp_path / "default.gguf", {"p": Profile("p", steering, "")}, default="p")
    with pytest.raises(UserError, match=f"default profile 'p'.*'{arch}'") as e:
        edge_mote.load(steered, n_ctx=64, n_threads=2, type_k=0, type_v=0)
    assert "profile rm" in e.value.hint
    # the CLI: one line, exit 2
    r = subprocess.run([sys.executable, "-m", "edge_mote", "run", str(gguf), "-p", "Hello", "-n", "2",
                        "--steer", str(steering)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines[0].startswith("error: ") and f"'{arch}'" in lines[0] and len(lines) <= 2, r.stderr
