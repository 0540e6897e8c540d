"""Oracle tests on softmax-router architectures beyond the original six: DeepSeek-V2-Lite (27 layers: llama.cpp
recognises the Lite variant by its layer count), Granite MoE, Granite MoE Shared and Granite MoE SWA (top-k of the
logits, softmax over the selected), Llama 4 (top-1 of the logits, sigmoid weight applied before the expert), ERNIE 4.5
MoE (softmax + selection bias; SentencePiece vocabulary), Mellum, Hunyuan-A13B (tiktoken-style vocabulary). The tests
are in suite.py."""

from .conftest import make_pair_fixture
from .suite import *  # noqa: F403

pair = make_pair_fixture(("deepseekv2", "granitemoe", "granitemoeshared", "llama4", "ernie45moe", "graniteswa",
                          "mellum", "hunyuanmoe"))
