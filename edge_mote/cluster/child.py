"""The child side of ``isolate.call`` (``python -m edge_mote.cluster.child FD``) and of ``runner.Runner``
(``... FD --loop``).

Reads ``pickle((fn, args, kwargs))`` from stdin, runs it, writes ``pickle(("ok", value))`` or
``pickle(("error", class name, message, hint, is_user_error, traceback))`` to file descriptor FD, and leaves with
``os._exit`` (llama.cpp's global teardown would talk to the workers again). It exits by itself if its parent dies.
"""

from __future__ import annotations

import os
import pickle
import sys
import threading
import time
import traceback


def _orphan_guard(parent: int) -> None:
    def watch():
        while True:
            if os.getppid() != parent:
                os._exit(3)
            time.sleep(0.5)

    threading.Thread(target=watch, name="orphan-guard", daemon=True).start()


def _run(fn, args, kwargs, keep: list | None = None) -> bytes:
    """Run and pickle the outcome; with ``keep``, the value is appended there and ``None`` returned instead."""
    from ..errors import EdgeMoteError, UserError

    try:
        value = fn(*args, **kwargs)
        if keep is not None:
            keep.append(value)
            value = None
        outcome = ("ok", value)
    except EdgeMoteError as e:
        outcome = ("error", type(e).__name__, str(e), e.hint, isinstance(e, UserError), traceback.format_exc())
    except BaseException as e:  # noqa: BLE001 - everything goes back to the parent
        outcome = ("error", type(e).__name__, str(e), None, False, traceback.format_exc())
    try:
        return pickle.dumps(outcome)
    except Exception as e:  # an unpicklable result
        return pickle.dumps(("error", type(e).__name__, f"cannot return the result: {e}", None, False, None))


def _write(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _read_exact(stream, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = stream.read(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def _loop(fd: int) -> None:
    """``--loop``: length-prefixed requests on stdin; the first is ``(setup, args, kwargs)`` whose result is the
    state, then ``(fn, args, kwargs)`` runs ``fn(state, *args, **kwargs)``; an empty request ends the loop."""
    state = None
    first = True
    while True:
        head = _read_exact(sys.stdin.buffer, 8)
        if head is None:
            break
        size = int.from_bytes(head, "little")
        if size == 0:
            break
        fn, args, kwargs = pickle.loads(_read_exact(sys.stdin.buffer, size))
        if first:
            keep: list = []
            data = _run(fn, args, kwargs, keep)
            state = keep[0] if keep else None
            first = False
        else:
            data = _run(fn, (state,) + tuple(args), kwargs)
        _write(fd, len(data).to_bytes(8, "little") + data)
    close = getattr(state, "close", None)
    if callable(close):
        close()


def main() -> None:
    fd = int(sys.argv[1])
    _orphan_guard(os.getppid())
    if "--loop" in sys.argv[2:]:
        _loop(fd)
    else:
        fn, args, kwargs = pickle.loads(sys.stdin.buffer.read())
        _write(fd, _run(fn, args, kwargs))
    os.close(fd)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
