"""The child side of ``isolate.call``: ``python -m edge_mote.cluster.child FD``.

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


def main() -> None:
    from ..errors import EdgeMoteError, UserError

    fd = int(sys.argv[1])
    _orphan_guard(os.getppid())
    try:
        fn, args, kwargs = pickle.loads(sys.stdin.buffer.read())
        outcome = ("ok", fn(*args, **kwargs))
    except EdgeMoteError as e:
        outcome = ("error", type(e).__name__, str(e), e.hint, isinstance(e, UserError), traceback.format_exc())
    except BaseException as e:  # noqa: BLE001 - everything goes back to the parent
        outcome = ("error", type(e).__name__, str(e), None, False, traceback.format_exc())
    try:
        data = pickle.dumps(outcome)
    except Exception as e:  # an unpicklable result
        data = pickle.dumps(("error", type(e).__name__, f"cannot return the result: {e}", None, False, None))
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]
    os.close(fd)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
