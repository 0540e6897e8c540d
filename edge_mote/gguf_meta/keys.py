"""Every GGUF metadata key edge-mote reads or writes (schema v1). The only module that knows key strings.

Stock llama.cpp ignores unknown keys, so files carrying these still load there unchanged; the patched build
(native/patches/0001-expert-steering.patch, ``llama_moe_steer_read_default``) reads the default profile.

Schema v1
---------
``edge_mote.version``                      UINT32   schema version (1)
``edge_mote.profiles``                     [STRING] names of the stored profiles, in order
``edge_mote.default_profile``              STRING   profile applied to every new context by the patched build
``edge_mote.profile.<name>.layer``         [INT32]  one entry per steered expert: its layer (GGUF ``blk`` index)
``edge_mote.profile.<name>.expert``        [INT32]  its expert index
``edge_mote.profile.<name>.state``         [INT32]  0 = bias only, 1 = OFF, 2 = ON, 3 = DROP
``edge_mote.profile.<name>.bias``          [FLOAT32] router-logit bias (0 when state is not 0)
``edge_mote.profile.<name>.margin``        FLOAT32  ON margin
``edge_mote.profile.<name>.description``   STRING   free text (e.g. how the profile was made)

Profile names are 1-64 characters from ``[A-Za-z0-9_-]``.
"""

from __future__ import annotations

import re

SCHEMA_VERSION = 1

PREFIX = "edge_mote."
VERSION = "edge_mote.version"
PROFILES = "edge_mote.profiles"
DEFAULT_PROFILE = "edge_mote.default_profile"

PROFILE_LAYER = "layer"
PROFILE_EXPERT = "expert"
PROFILE_STATE = "state"
PROFILE_BIAS = "bias"
PROFILE_MARGIN = "margin"
PROFILE_DESCRIPTION = "description"
PROFILE_FIELDS = (PROFILE_LAYER, PROFILE_EXPERT, PROFILE_STATE, PROFILE_BIAS, PROFILE_MARGIN, PROFILE_DESCRIPTION)

PROFILE_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

# llama.cpp's own keys edge-mote reads
ARCHITECTURE = "general.architecture"
NAME = "general.name"


def profile_key(name: str, field: str) -> str:
    """The key of one field of a named profile."""
    if field not in PROFILE_FIELDS:
        raise ValueError(f"unknown profile field {field!r}")
    return f"{PREFIX}profile.{name}.{field}"


def arch_key(arch: str, suffix: str) -> str:
    """llama.cpp's per-architecture keys, e.g. ``qwen3moe.expert_count``."""
    return f"{arch}.{suffix}"


EXPERT_COUNT = "expert_count"
CONTEXT_LENGTH = "context_length"
EXPERT_USED_COUNT = "expert_used_count"
BLOCK_COUNT = "block_count"
