#!/usr/bin/env python3
"""Build the patched llama.cpp and install it into the current Python environment.

    python native/build.py [--cuda] [--cuda-arch 90] [--jobs N] [--force]
    python native/build.py --with-stock       # also build an unpatched libllama (tests prove stock llama.cpp loads our files)
    python native/build.py --stock-only       # only that (the tests run it the first time they need it; cached)
    python native/build.py --cuda-objects     # compile the CUDA sources the patch relies on (no GPU needed)

Steps (each skipped when its result is cached):
 1. fetch the pinned llama-cpp-python sdist (native/LLAMA_CPP_PYTHON) with pip and check its sha256;
 2. unpack it and apply native/patches/*.patch to vendor/llama.cpp;
 3. build the shared libraries and tools (rpc-server, llama-quantize, llama-server, llama-cli, ...) with the
    top-level CMakeLists.txt, RPC backend on;
 4. install llama-cpp-python's Python package (without its own native build) and put the patched libraries
    into llama_cpp/lib, link the tools into the environment's bin folder.

The cache lives in $EDGE_MOTE_CACHE (default ~/.cache/edge-mote), keyed by the sdist, the patches, this
script and the CMake options, so a second run with an unchanged patch only checks the install (seconds).
Nothing here is imported by edge_mote: only this file knows how llama.cpp is built.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PIN_FILE = HERE / "LLAMA_CPP_PYTHON"
PATCH_DIR = HERE / "patches"
MANIFEST_NAME = "edge_mote_native.json"

# what users need next to the library: RPC worker, quantizer, server, CLI, imatrix, split tool
TOOL_TARGETS = ["ggml-rpc-server", "llama-quantize", "llama-server", "llama-cli", "llama-imatrix", "llama-gguf-split"]
LIB_TARGETS = ["llama", "ggml", "mtmd"]
# CUDA sources the patch relies on: fused top-k MoE, broadcast add/mul, argsort/top-k, get_rows, neg, cpy (cont)
CUDA_OBJECTS = ["topk-moe.cu", "binbcast.cu", "argsort.cu", "getrows.cu", "unary.cu", "cpy.cu"]


def log(msg: str) -> None:
    print(f"[edge-mote build] {msg}", flush=True)


def read_pin() -> tuple[str, str]:
    vals = {}
    for line in PIN_FILE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            k, v = (s.strip() for s in line.split("=", 1))
            vals[k] = v
    return vals["version"], vals["sha256"]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_root() -> Path:
    return Path(os.environ.get("EDGE_MOTE_CACHE", Path.home() / ".cache" / "edge-mote")).expanduser()


def run(cmd: list[str], **kw) -> None:
    log("$ " + " ".join(str(c) for c in cmd))
    subprocess.run([str(c) for c in cmd], check=True, **kw)


def fetch_sdist(version: str, sha256: str) -> Path:
    d = cache_root() / "sdist"
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"llama_cpp_python-{version}.tar.gz"
    if path.exists() and sha256_file(path) == sha256:
        return path
    log(f"fetching llama-cpp-python=={version} sdist with pip")
    with tempfile.TemporaryDirectory(dir=d) as tmp:
        run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
             "--no-build-isolation", f"llama-cpp-python=={version}", "-d", tmp])
        got = Path(tmp) / path.name
        if not got.exists():
            sys.exit(f"error: pip did not produce {path.name}")
        actual = sha256_file(got)
        if actual != sha256:
            sys.exit(f"error: sha256 mismatch for {path.name}: expected {sha256}, got {actual}")
        os.replace(got, path)
    return path


def patch_files() -> list[Path]:
    return sorted(PATCH_DIR.glob("*.patch"))


def patch_hash() -> str:
    h = hashlib.sha256()
    for p in patch_files():
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def tree_key(sha256: str, cmake_args: list[str]) -> str:
    """The build tree: one per sdist, top-level CMakeLists.txt and CMake options (patches are synced into it)."""
    h = hashlib.sha256()
    h.update(sha256.encode())
    h.update((REPO / "CMakeLists.txt").read_bytes())
    h.update("\0".join(cmake_args).encode())
    return h.hexdigest()[:16]


def sync_tree(new: Path, old: Path) -> int:
    """Make ``old`` equal to ``new``, touching only files whose content differs (keeps incremental builds)."""
    changed = 0
    new_files = {p.relative_to(new) for p in new.rglob("*") if p.is_file()}
    for rel in sorted(new_files):
        src, dst = new / rel, old / rel
        if dst.is_file() and dst.stat().st_size == src.stat().st_size and dst.read_bytes() == src.read_bytes():
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
        os.utime(dst)  # newer than the objects built from the old content
        changed += 1
    for p in sorted(old.rglob("*"), reverse=True):
        if p.is_file() and p.relative_to(old) not in new_files:
            p.unlink()
            changed += 1
    return changed


def unpack_and_patch(sdist: Path, src: Path, patches: bool = True) -> None:
    if src.exists():
        shutil.rmtree(src)
    tmp = src.with_name(src.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    log(f"unpacking {sdist.name}")
    with tarfile.open(sdist) as tf:
        tf.extractall(tmp, filter="data")
    (top,) = [p for p in tmp.iterdir() if p.is_dir()]
    vendor = top / "vendor" / "llama.cpp"
    for p in (patch_files() if patches else []):
        log(f"applying {p.name}")
        run(["patch", "-p1", "--forward", "--batch", "-s", "-i", p], cwd=vendor)
    os.replace(top, src)
    shutil.rmtree(tmp)


def cmake_options(args) -> list[str]:
    opts = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON"]
    if args.cuda:
        opts += ["-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={args.cuda_arch}"]
    return opts


def generator() -> list[str]:
    return ["-G", "Ninja"] if shutil.which("ninja") else []


def build_native(src: Path, bdir: Path, opts: list[str], jobs: int) -> None:
    vendor = src / "vendor" / "llama.cpp"
    run(["cmake", "-S", REPO, "-B", bdir, *generator(), f"-DEDGE_MOTE_LLAMA_CPP_DIR={vendor}", *opts])
    run(["cmake", "--build", bdir, "--parallel", str(jobs), "--target", *LIB_TARGETS, *TOOL_TARGETS])


def site_packages() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


def scripts_dir() -> Path:
    return Path(sysconfig.get_paths()["scripts"])


def installed_manifest() -> dict | None:
    path = site_packages() / "llama_cpp" / "lib" / MANIFEST_NAME
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def stock_root(sha256: str, opts: list[str]) -> Path:
    h = hashlib.sha256((sha256 + "stock" + "\0".join(opts)).encode())
    h.update((REPO / "CMakeLists.txt").read_bytes())
    return cache_root() / f"stock-{h.hexdigest()[:16]}"


def build_stock(sdist: Path, sha256: str, opts: list[str], jobs: int, force: bool) -> Path:
    """An unpatched libllama from the same sdist (only the libraries), for tests that compare with stock llama.cpp.

    Built once per sdist and CMake options; a file lock makes concurrent callers (two test runs) wait for one build."""
    import fcntl

    root = stock_root(sha256, opts)
    bindir = root / "cmake-build" / "bin"
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f"{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if force or not (root / "stamp").exists():
            t0 = time.time()
            unpack_and_patch(sdist, root / "src", patches=False)
            vendor = root / "src" / "vendor" / "llama.cpp"
            run(["cmake", "-S", REPO, "-B", root / "cmake-build", *generator(), f"-DEDGE_MOTE_LLAMA_CPP_DIR={vendor}", *opts])
            run(["cmake", "--build", root / "cmake-build", "--parallel", str(jobs), "--target", "llama", "ggml"])
            (root / "stamp").write_text("stock")
            log(f"built the stock libllama in {time.time() - t0:.0f} s: {bindir}")
    return bindir


def record_stock(stock_lib_dir: Path) -> None:
    path = site_packages() / "llama_cpp" / "lib" / MANIFEST_NAME
    man = installed_manifest()
    if man is not None:
        man["stock_lib_dir"] = str(stock_lib_dir)
        path.write_text(json.dumps(man, indent=2))


def install(src: Path, bdir: Path, key: str, version: str) -> None:
    # the Python package only: its own CMake build is switched off, our libraries replace it
    env = dict(os.environ, CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF")
    # its runtime dependencies (a no-op when present), then the package itself without touching them
    run([sys.executable, "-m", "pip", "install", "--quiet", "typing-extensions>=4.5", "numpy>=1.20", "diskcache>=5.6.1",
         "jinja2>=2.11.3"])
    run([sys.executable, "-m", "pip", "install", "--quiet", "--no-build-isolation", "--no-deps",
         "--force-reinstall", str(src)], env=env)
    libdir = site_packages() / "llama_cpp" / "lib"
    libdir.mkdir(parents=True, exist_ok=True)
    for old in libdir.iterdir():
        if old.name.startswith("lib") and ".so" in old.name or old.name == MANIFEST_NAME:
            old.unlink()
    bindir = bdir / "bin"
    # copy libraries keeping their symlinks, so that only one copy of each ggml library can ever be loaded
    for f in sorted(bindir.iterdir()):
        if ".so" in f.name and f.name.startswith("lib"):
            dst = libdir / f.name
            if f.is_symlink():
                os.symlink(os.readlink(f), dst)
            else:
                shutil.copy2(f, dst)
    # tools run from the build cache (they find their libraries there through $ORIGIN)
    sdir = scripts_dir()
    tools = {}
    for t in TOOL_TARGETS:
        exe = bindir / t
        if exe.exists():
            link = sdir / t
            if link.exists() or link.is_symlink():
                link.unlink()
            os.symlink(exe, link)
            tools[t] = str(exe)
    manifest = {"key": key, "llama_cpp_python": version, "patches": [p.name for p in patch_files()],
                "build_dir": str(bdir), "vendor_dir": str(src / "vendor" / "llama.cpp"), "tools": tools,
                "built": time.strftime("%Y-%m-%dT%H:%M:%S")}
    (libdir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
    log(f"installed patched llama_cpp into {libdir}")


def cublas_include() -> Path:
    """A folder with cublas_v2.h: the CUDA toolkit's, or the headers of PyPI's nvidia-cublas wheel (no GPU needed)."""
    nvcc = Path(shutil.which("nvcc")).resolve()
    for inc in (nvcc.parent.parent / "include", Path("/usr/local/cuda/include")):
        if (inc / "cublas_v2.h").exists():
            return inc
    d = cache_root() / "cuda-headers"
    hdr = next(d.rglob("cublas_v2.h"), None) if d.exists() else None
    if hdr is None:
        import zipfile

        log("cublas headers missing from the toolkit: fetching them from the nvidia-cublas wheel")
        with tempfile.TemporaryDirectory() as tmp:
            run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "nvidia-cublas", "-d", tmp])
            (wheel,) = Path(tmp).glob("*.whl")
            with zipfile.ZipFile(wheel) as zf:
                for name in zf.namelist():
                    if "/include/" in name and name.endswith(".h"):
                        zf.extract(name, d)
        hdr = next(d.rglob("cublas_v2.h"))
    return hdr.parent


def cuda_objects(src: Path, out: Path, arch: str, jobs: int) -> None:
    """Compile the CUDA sources the patch relies on with nvcc (proves they build where no GPU is present)."""
    if not shutil.which("nvcc"):
        sys.exit("error: nvcc not found")
    ggml = src / "vendor" / "llama.cpp" / "ggml"
    out.mkdir(parents=True, exist_ok=True)
    flags = ["-std=c++17", "-O2", f"--generate-code=arch=compute_{arch},code=sm_{arch}", "-DGGML_USE_CUDA",
             "-DGGML_CUDA_USE_GRAPHS", "-I", ggml / "include", "-I", ggml / "src", "-I", ggml / "src" / "ggml-cuda",
             "-I", cublas_include(), "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC"]
    for name in CUDA_OBJECTS:
        obj = out / (name + ".o")
        run(["nvcc", *flags, "-c", ggml / "src" / "ggml-cuda" / name, "-o", obj])
    log(f"compiled {len(CUDA_OBJECTS)} CUDA objects for sm_{arch} into {out}: " + ", ".join(CUDA_OBJECTS))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cuda", action="store_true", help="build with the CUDA backend (GGML_CUDA=ON)")
    ap.add_argument("--cuda-arch", default="native", help="CMAKE_CUDA_ARCHITECTURES (default: native)")
    ap.add_argument("--cuda-objects", action="store_true",
                    help="only compile the CUDA sources the patch relies on (works without a GPU)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--force", action="store_true", help="rebuild even if cached")
    ap.add_argument("--no-install", action="store_true", help="build only")
    ap.add_argument("--with-stock", action="store_true",
                    help="also build an unpatched libllama from the same sdist (used by the tests)")
    ap.add_argument("--stock-only", action="store_true",
                    help="only build (once, cached) the unpatched libllama and record it next to the installed "
                         "patched one; the tests run this the first time they need it")
    args = ap.parse_args(argv)

    version, sha256 = read_pin()
    sdist = fetch_sdist(version, sha256)
    if args.stock_only:
        opts = cmake_options(args)
        bindir = build_stock(sdist, sha256, opts, args.jobs, args.force)
        record_stock(bindir)
        log(f"stock libllama: {bindir}" + ("" if installed_manifest() else " (no patched install to record it in)"))
        return 0
    if args.cuda_objects:
        arch = "90" if args.cuda_arch == "native" else args.cuda_arch
        root = cache_root() / f"cuda-objects-{tree_key(sha256, [arch])}"
        if not (root / "src").exists():
            unpack_and_patch(sdist, root / "src")
        cuda_objects(root / "src", root / f"sm_{arch}", arch, args.jobs)
        return 0

    opts = cmake_options(args)
    root = cache_root() / f"build-{tree_key(sha256, opts)}"
    key = f"{root.name}-patch-{patch_hash()}"
    stamp = root / "stamp"
    man = installed_manifest()
    built = stamp.exists() and stamp.read_text() == key
    if not args.force and built and man and man.get("key") == key:
        log(f"up to date (build {key}, llama-cpp-python {version}, {len(patch_files())} patch(es))")
        if args.with_stock and not man.get("stock_lib_dir"):
            record_stock(build_stock(sdist, sha256, opts, args.jobs, args.force))
        return 0
    if args.force or not built:
        t0 = time.time()
        stamp.unlink(missing_ok=True)
        if (root / "src").exists() and not args.force:
            fresh = root / "src.new"
            unpack_and_patch(sdist, fresh)
            log(f"patch changed: {sync_tree(fresh, root / 'src')} file(s) updated, incremental build")
            shutil.rmtree(fresh)
        else:
            unpack_and_patch(sdist, root / "src")
        build_native(root / "src", root / "cmake-build", opts, args.jobs)
        stamp.write_text(key)
        log(f"built {key} in {time.time() - t0:.0f} s")
    if not args.no_install:
        install(root / "src", root / "cmake-build", key, version)
        if (stock_root(sha256, opts) / "stamp").exists():  # keep a stock build made earlier on record
            record_stock(stock_root(sha256, opts) / "cmake-build" / "bin")
    if args.with_stock:
        record_stock(build_stock(sdist, sha256, opts, args.jobs, args.force))
    return 0


if __name__ == "__main__":
    sys.exit(main())
