"""Runtime: ctypes bindings to the patched llama.cpp, the Model wrapper and the Steering value object."""
