"""Oracle tests on the six original architectures (edge_mote/tiny.py): Qwen3-MoE, Qwen2-MoE, OLMoE, Mixtral,
DeepSeek-V3, gpt-oss. The tests are in suite.py."""

from edge_mote.tiny import TINY_ARCHS

from .conftest import make_pair_fixture
from .suite import *  # noqa: F403

pair = make_pair_fixture(TINY_ARCHS)
