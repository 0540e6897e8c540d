"""Everyday mistakes through the real CLI: exit status 2, one `error:` line (plus an optional `hint:`), no traceback,
no "internal error", and no output file (or temporary file) left behind.

Issue #8's list: a typo'd model path (never a Hub lookup), a prompt longer than the context, a --ctx larger than
the training context, a chat template that fails, click usage errors, `demo` without the training dependencies,
outputs in a folder that is a file / does not exist, a write that fails half-way (OSError), and output modes.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest


def cli(exe, *args, env=None, cwd=None, preexec_fn=None):
    return subprocess.run([exe, *map(str, args)], capture_output=True, text=True, timeout=300, cwd=cwd,
                          env={**os.environ, **(env or {})}, preexec_fn=preexec_fn)


def assert_one_line_error(res, *fragments, hint=None):
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert lines and lines[0].startswith("error: "), res.stderr
    assert len(lines) <= 2 and all(l.startswith(("error: ", "hint: ")) for l in lines), res.stderr
    assert "Traceback" not in res.stderr and "internal error" not in res.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    if hint is not None:
        assert len(lines) == 2 and hint in lines[1], (hint, res.stderr)


def no_files_but(folder: Path, *keep: Path) -> list[str]:
    """Files in ``folder`` (recursively, hidden temporaries included) other than ``keep``."""
    keep_s = {Path(k).resolve() for k in keep}
    return sorted(str(p) for p in folder.rglob("*") if p.is_file() and p.resolve() not in keep_s)


@pytest.fixture(scope="module")
def qwen(tiny_model):
    return tiny_model("qwen3moe")[1]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    d = tmp_path_factory.mktemp("prompts")
    b, c = d / "b.jsonl", d / "c.jsonl"
    b.write_text("".join(f'{{"prompt": "how do I pick lock {i}?"}}\n' for i in range(4)))
    c.write_text("".join(f'{{"prompt": "how do I bake bread {i}?"}}\n' for i in range(4)))
    return b, c


def test_typo_in_a_model_path_is_not_found_never_a_download(edge_mote_exe, tmp_path):
    # the new user's typo: a relative path that does not exist, in a folder that does not exist either
    res = cli(edge_mote_exe, "run", "models/qwen3-moe.gguf", "-p", "hi", cwd=tmp_path)
    assert_one_line_error(res, "model file not found: models/qwen3-moe.gguf")
    assert "Hugging Face" not in res.stderr.splitlines()[0]
    res = cli(edge_mote_exe, "info", "owner/repo:model.gguf", cwd=tmp_path, env={"HF_HUB_OFFLINE": "0"})
    assert_one_line_error(res, "model file not found", hint="hf://owner/repo:model.gguf")
    assert_one_line_error(cli(edge_mote_exe, "profile", "list", "nope/x.gguf", cwd=tmp_path), "model file not found")


def test_hf_reference_uses_the_local_cache_offline(edge_mote_exe, qwen, tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
    from test_resolve import make_hf_cache

    cache = tmp_path / "hub"
    make_hf_cache(cache, "someone/tiny-moe", {"tiny-moe-f32.gguf": qwen.read_bytes(), "README.md": b"tiny"})
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    res = cli(edge_mote_exe, "info", "hf://someone/tiny-moe", "--json", env=env)
    assert res.returncode == 0, res.stderr
    assert '"n_expert"' in res.stdout and "tiny-moe-f32.gguf" in res.stdout
    assert_one_line_error(cli(edge_mote_exe, "info", "hf://someone/other", env=env),
                          "not in the local Hugging Face cache and HF_HUB_OFFLINE is set")


def test_prompt_longer_than_the_context(edge_mote_exe, qwen):
    res = cli(edge_mote_exe, "run", qwen, "-p", "word " * 300, "--ctx", 64, "-n", 2)
    assert_one_line_error(res, "301 tokens", "fit the context of 64")


def test_ctx_larger_than_the_training_context(edge_mote_exe, qwen, prompts, tmp_path):
    for cmd in (("run", qwen, "-p", "hi", "-n", 1), ("scan", qwen, "-b", prompts[0], "-c", prompts[1], "-o",
                                                     tmp_path / "scan.json")):
        res = cli(edge_mote_exe, *cmd, "--ctx", 1_000_000)
        assert_one_line_error(res, "context size 1000000 (--ctx) is larger than the context", "(4096 tokens)",
                              hint="--ctx 4096")
    res = cli(edge_mote_exe, "run", qwen, "-p", "hi", "-n", 1, "--ctx", 4096)
    assert res.returncode == 0, res.stderr
    assert list(tmp_path.iterdir()) == []


def _copy_with_chat_template(src: Path, dst: Path, template: str) -> Path:
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    r = GGUFReader(src, "r")
    w = GGUFWriter(dst, arch=str(r.fields["general.architecture"].contents()))
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name in ("general.architecture", "tokenizer.chat_template"):
            continue
        vtype = f.types[0]
        w.add_key_value(f.name, f.contents(), vtype, sub_type=f.types[-1] if vtype == GGUFValueType.ARRAY else None)
    w.add_key_value("tokenizer.chat_template", template, GGUFValueType.STRING)
    for t in r.tensors:
        w.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for t in r.tensors:
        w.write_tensor_data(t.data)
    w.close()
    return dst


@pytest.mark.parametrize("template, fragment, hint", [
    ("{{ raise_exception('only user/assistant turns') }}", "only user/assistant turns", "--raw"),
    ("{{ messages[0].content.nope() }}", "the chat template failed", "--raw"),
    # does not even compile: llama-cpp-python compiles templates while loading the model
    ("{% for m in messages %}{{ m.content }", "the chat template failed to compile: TemplateSyntaxError",
     "tokenizer.chat_template"),
])
def test_chat_template_that_fails_to_render(edge_mote_exe, qwen, prompts, tmp_path, template, fragment, hint):
    model = _copy_with_chat_template(qwen, tmp_path / "bad-template.gguf", template)
    out = tmp_path / "out"
    out.mkdir()
    res = cli(edge_mote_exe, "scan", model, "-b", prompts[0], "-c", prompts[1], "-o", out / "scan.json",
              "--heatmap", out / "scan.png", "--threads", 1)
    assert_one_line_error(res, "the chat template failed", fragment, hint=hint)
    assert no_files_but(out) == []


@pytest.mark.parametrize("args, fragment", [
    ((), "Missing argument 'MODEL'"),
    (("m.gguf",), "Missing option '-p'"),
    (("m.gguf", "-p", "x", "--ctx", "3"), "Invalid value for '--ctx'"),
    (("m.gguf", "-p", "x", "--bogus"), "No such option '--bogus'"),
])
def test_click_usage_errors_are_one_line_with_a_hint(edge_mote_exe, args, fragment):
    assert_one_line_error(cli(edge_mote_exe, "run", *args), fragment, hint="edge-mote run --help")


def test_serve_prompt_cache_size_must_not_be_negative(edge_mote_exe):
    assert_one_line_error(cli(edge_mote_exe, "serve", "m.gguf", "--prompt-cache", "-1"),
                          "Invalid value for '--prompt-cache'", hint="edge-mote serve --help")


def test_unknown_command_and_bare_group(edge_mote_exe):
    assert_one_line_error(cli(edge_mote_exe, "rnu"), "No such command 'rnu'", hint="edge-mote --help")
    res = cli(edge_mote_exe, "profile")
    assert res.returncode == 0 and "add" in res.stdout and res.stderr == ""


def test_demo_without_training_dependencies_says_what_to_install(edge_mote_exe, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import sys\nsys.modules['torch'] = None  # as if not installed\n")
    env = {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    res = cli(edge_mote_exe, "demo", "--workdir", tmp_path / "demo", env=env)
    assert_one_line_error(res, "edge-mote demo trains its model organism with PyTorch", "torch",
                          hint="pip install 'edge-mote[convert]'")


def test_output_folder_missing_or_a_file_fails_before_the_work(edge_mote_exe, qwen, prompts, tmp_path):
    a_file = tmp_path / "some-file"
    a_file.write_text("x")
    for out, fragment in ((a_file / "out.gguf", "is not a folder"), (tmp_path / "nodir" / "out.gguf", "does not exist")):
        res = cli(edge_mote_exe, "profile", "add", qwen, "--name", "p", "--steer", "off=1:3", "-o", out)
        assert_one_line_error(res, fragment)
        res = cli(edge_mote_exe, "scan", qwen, "-b", prompts[0], "-c", prompts[1], "-o", out.with_suffix(".json"))
        assert_one_line_error(res, fragment)
    assert no_files_but(tmp_path, a_file) == []


def _small_file_limit():
    """In the child: files may not grow past 1 MiB (writes fail with EFBIG instead of killing the process)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))


def test_a_write_that_fails_half_way_is_one_line_and_leaves_nothing(edge_mote_exe, qwen, prompts, tmp_path):
    assert qwen.stat().st_size > 4 << 20
    out = tmp_path / "out"
    out.mkdir()
    res = cli(edge_mote_exe, "profile", "add", qwen, "--name", "p", "--steer", "off=1:3", "-o", out / "steered.gguf",
              preexec_fn=_small_file_limit)
    assert_one_line_error(res, "steered.gguf")
    assert no_files_but(out) == []


def test_profile_outputs_get_the_inputs_mode_and_reports_the_umask_default(edge_mote_exe, qwen, prompts, tmp_path):
    src = tmp_path / "model.gguf"
    src.write_bytes(qwen.read_bytes())
    src.chmod(0o644)
    res = cli(edge_mote_exe, "profile", "add", src, "--name", "p", "--steer", "off=1:3", "-o", tmp_path / "s.gguf")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "s.gguf").stat().st_mode & 0o777 == 0o644
    res = cli(edge_mote_exe, "profile", "rm", tmp_path / "s.gguf", "p", "-o", tmp_path / "r.gguf")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "r.gguf").stat().st_mode & 0o777 == 0o644
    old = os.umask(0o022)
    try:
        res = cli(edge_mote_exe, "scan", src, "-b", prompts[0], "-c", prompts[1], "-o", tmp_path / "scan.json",
                  "--html", tmp_path / "scan.html", "--raw", "--threads", 1, "--ctx", 256)
    finally:
        os.umask(old)
    assert res.returncode == 0, res.stderr
    for f in ("scan.json", "scan.html"):
        assert (tmp_path / f).stat().st_mode & 0o777 == 0o644, f
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
