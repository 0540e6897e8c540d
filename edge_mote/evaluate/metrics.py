"""Quality metrics over next-token distributions (pure numpy)."""

from __future__ import annotations

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64 (in place on a copy: the eval calls this per row of a 50k vocabulary)."""
    x = np.array(logits, dtype=np.float64)
    np.subtract(x, x.max(axis=-1, keepdims=True), out=x)
    np.subtract(x, np.log(np.exp(x).sum(axis=-1, keepdims=True)), out=x)
    return x


def token_nll(logits: np.ndarray, token: int) -> float:
    """-log_softmax(logits)[token] for one row of logits -- the same float64 operations, bit for bit, without
    materialising the whole log-softmax row."""
    x = np.array(logits, dtype=np.float64)   # a copy, changed in place below
    m = x.max(axis=-1, keepdims=True)
    xt = x[token] - m[0]
    np.subtract(x, m, out=x)
    np.exp(x, out=x)
    return float(-(xt - np.log(x.sum(axis=-1, keepdims=True))[0]))


def kl_divergence(p_logprobs: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """KL(p || q) per row, p given as log-probabilities (the reference), q as logits."""
    lq = log_softmax(q_logits)
    p = np.exp(p_logprobs)
    return np.maximum((p * (p_logprobs - lq)).sum(axis=-1), 0.0)  # >= 0 (float rounding gives -1e-9)


def answer_nll(logits: np.ndarray, n_prompt: int, answer_tokens: list[int]) -> tuple[float, int]:
    """Summed negative log-likelihood of ``answer_tokens`` that follow a prompt of ``n_prompt`` tokens, given the
    logits of prompt + answer (row i predicts token i + 1), and the number of answer tokens scored."""
    if not answer_tokens:
        return 0.0, 0
    rows = log_softmax(logits[n_prompt - 1: n_prompt - 1 + len(answer_tokens)])
    return float(-rows[np.arange(len(answer_tokens)), answer_tokens].sum()), len(answer_tokens)


def perplexity(total_nll: float, n_tokens: int) -> float:
    return float(np.exp(total_nll / n_tokens)) if n_tokens else float("nan")
