"""A home cluster on llama.cpp's RPC backend: workers (``worker``), cluster inference isolated behind a watchdog
(``isolate``), a placement planner (``plan``) and the relay they share (``relay``).

``call(fn, *args, rpc_servers=[...], **kwargs)`` is the entry point the CLI uses: without workers it is just
``fn(*args, **kwargs)``. ``Runner`` keeps a model loaded over the workers in an isolated child for many calls
(``serve``), ``health`` says hello to workers without ever raising for their state.
"""

from __future__ import annotations

from .isolate import call, health
from .runner import Runner, WorkerLost

__all__ = ["call", "health", "Runner", "WorkerLost"]
