"""Oracle tests on hybrid architectures (linear-attention, recurrent or convolution layers next to attention, MoE
FFNs): Qwen3-Next and Qwen3.5-MoE (gated DeltaNet layers, sigmoid-gated shared expert), Jamba (Mamba layers, MoE
every other layer). The tests are in suite.py."""

from .conftest import make_pair_fixture
from .suite import *  # noqa: F403

pair = make_pair_fixture(("qwen3next", "qwen35moe", "jamba"))
