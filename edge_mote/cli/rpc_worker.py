"""``edge-mote rpc-worker``: the old name of ``edge-mote worker`` (same options)."""

from __future__ import annotations

from .worker import _command

rpc_worker = _command("rpc-worker")
