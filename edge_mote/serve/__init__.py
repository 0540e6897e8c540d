"""``edge-mote serve``: an OpenAI-compatible HTTP server in which every request carries its own steering.

``protocol.py`` validates OpenAI request bodies (plus the ``mote`` steering field) and shapes the responses,
``app.py`` holds the starlette routes over the continuous-batching scheduler (``edge_mote.runtime.scheduler``),
``server.py`` loads the model and runs uvicorn. See the README's "Serve" section.
"""

from .server import ServeConfig, serve

__all__ = ["ServeConfig", "serve"]
