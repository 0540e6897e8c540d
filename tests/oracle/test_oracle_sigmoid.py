"""Oracle tests on the sigmoid-router architectures with a selection bias (DeepSeek-V3 style): GLM-4.5/4.6 (glm4moe),
dots.llm1, MiniMax-M2, LFM2-MoE (short-convolution layers), GLM-4.7-Flash (glm4moelite: MLA, llama.cpp's deepseek2),
Solar-Open.
The tests are in suite.py."""

from .conftest import make_pair_fixture
from .suite import *  # noqa: F403

pair = make_pair_fixture(("glm4moe", "dots1", "minimaxm2", "lfm2moe", "glm4moelite", "solaropen"))
