"""edge-mote's GGUF metadata: key names (keys.py, the only place that knows them) and profile read/write."""
