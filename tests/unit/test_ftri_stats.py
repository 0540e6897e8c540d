"""fTRI statistics (no model): risk difference, z test, log-odds CI, ranking and bootstrap stability."""

from __future__ import annotations

import numpy as np
import pytest

from edge_mote.ftri.stats import bootstrap_stability, expert_stats, ranking


def known_counts():
    """Behaviour: 2 prompts of 4 and 6 window tokens; control: 2 prompts of 5; 1 layer, 3 experts."""
    c1 = np.array([[[3, 1, 0]], [[5, 1, 0]]])      # a1 = 8, 2, 0 of n1 = 10
    t1 = np.array([4, 6])
    c2 = np.array([[[1, 2, 0]], [[1, 2, 0]]])      # a2 = 2, 4, 0 of n2 = 10
    t2 = np.array([5, 5])
    return c1, t1, c2, t2


def test_known_counts_give_known_statistics():
    st = expert_stats(*known_counts(), layers=[7])
    assert st.layers == (7,) and st.n1 == 10 and st.n2 == 10 and st.n_expert == 3
    np.testing.assert_array_equal(st.a1, [[8, 2, 0]])
    np.testing.assert_array_equal(st.a2, [[2, 4, 0]])
    np.testing.assert_allclose(st.p1, [[0.8, 0.2, 0.0]])
    np.testing.assert_allclose(st.p2, [[0.2, 0.4, 0.0]])
    np.testing.assert_allclose(st.rd, [[0.6, -0.2, 0.0]], atol=1e-15)
    # pooled two-proportion z: expert 0 (p = .5): .6 / sqrt(.25 * .2); expert 1 (p = .3): -.2 / sqrt(.21 * .2)
    np.testing.assert_allclose(st.z, [[2.6832815729997477, -0.9759000729485332, 0.0]], rtol=1e-12)
    np.testing.assert_allclose(st.p_value, [[0.007290358091535644, 0.32911398597860814, 1.0]], rtol=1e-10)
    # log odds ratio with 0.5 added to every cell, Wald 95% CI
    np.testing.assert_allclose(st.log_odds, [[2.4475508632442313, -0.8560506514967984, 0.0]], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(st.ci_low, [[0.4532991940088673, -2.7089324719473087, st.ci_low[0, 2]]], rtol=1e-12)
    np.testing.assert_allclose(st.ci_high, [[4.4418025324795956, 0.9968311689537118, st.ci_high[0, 2]]], rtol=1e-12)
    assert st.ci_low[0, 2] == pytest.approx(-st.ci_high[0, 2])  # all-zero cells: symmetric around 0
    rec = st.record(0, 0)
    assert rec["layer"] == 7 and rec["expert"] == 0 and rec["a1"] == 8 and rec["n1"] == 10
    assert all(isinstance(v, (int, float)) and not isinstance(v, np.generic) for v in rec.values())


def test_never_selected_and_always_selected_are_finite():
    c1 = np.array([[[4, 0]]])
    c2 = np.array([[[4, 0]]])
    st = expert_stats(c1, np.array([4]), c2, np.array([4]))
    assert np.isfinite(st.z).all() and np.isfinite(st.log_odds).all() and np.isfinite(st.ci_low).all()
    np.testing.assert_array_equal(st.z, [[0.0, 0.0]])
    np.testing.assert_array_equal(st.p_value, [[1.0, 1.0]])


def test_ranking_by_rd_then_z_then_position():
    # expert 0: .6 vs .5 and expert 1: .1 vs 0 have the same rd (0.1, exactly; floats differ by 1e-17):
    # the smaller variance gives expert 1 the larger z, so it ranks first. Experts 2 and 3 tie completely.
    n = 10
    a1 = np.array([6, 1, 3, 3, 9])
    a2 = np.array([5, 0, 3, 3, 0])
    c1 = a1.reshape(1, 1, -1)
    c2 = a2.reshape(1, 1, -1)
    st = expert_stats(c1, np.array([n]), c2, np.array([n]))
    assert st.z[0, 1] > st.z[0, 0]
    assert st.ranking() == [(0, 4), (0, 1), (0, 0), (0, 2), (0, 3)]
    # flat indices over layers: layer row 1 wins the tie on position only after layer row 0
    rd = np.array([[0.5, 0.2], [0.5, 0.2]])
    z = np.array([[1.0, 3.0], [1.0, 3.0]])
    assert ranking(rd, z).tolist() == [0, 2, 1, 3]


def test_input_validation():
    c1, t1, c2, t2 = known_counts()
    with pytest.raises(ValueError, match="disagree"):
        expert_stats(c1, t1, c2[:, :, :2], t2)
    with pytest.raises(ValueError, match="more often than the prompt has window tokens"):
        expert_stats(c1, np.array([2, 6]), c2, t2)
    with pytest.raises(ValueError, match="no prompts"):
        expert_stats(c1[:0], t1[:0], c2, t2)
    with pytest.raises(ValueError, match="no window tokens"):
        expert_stats(np.zeros((1, 1, 3), int), np.array([0]), c2, t2)
    with pytest.raises(ValueError, match=r"\[n_prompts\]"):
        expert_stats(c1, t2[:1], c2, t2)


def synthetic(seed=1, n_prompts=30, n_layers=3, n_expert=8, k=2, tokens=5, planted=((1, 3),), noise=0.0):
    """Per-prompt counts from random top-k routing; planted experts fire on every behaviour token."""
    rng = np.random.default_rng(seed)

    def one(behaviour):
        counts = np.zeros((n_prompts, n_layers, n_expert), dtype=np.int64)
        for p in range(n_prompts):
            for l in range(n_layers):
                for _ in range(tokens):
                    fixed = [e for (ll, e) in planted if ll == l] if behaviour and rng.random() >= noise else []
                    rest = [e for e in range(n_expert) if e not in [x for (ll, x) in planted if ll == l]]
                    chosen = fixed + list(rng.choice(rest, size=k - len(fixed), replace=False))
                    counts[p, l, chosen] += 1
        return counts, np.full(n_prompts, tokens)

    return (*one(True), *one(False))


def test_planted_expert_ranks_first_and_is_stable():
    c1, t1, c2, t2 = synthetic()
    st = expert_stats(c1, t1, c2, t2)
    assert st.ranking()[0] == (1, 3)
    assert st.p1[1, 3] == 1.0 and st.p2[1, 3] == 0.0 and st.rd[1, 3] == 1.0
    stab = bootstrap_stability(c1, t1, c2, t2, n_boot=50, seed=3)
    assert stab.top_n == (1, 5, 10) and stab.freq_top == 10
    assert stab.jaccard_mean[1] == 1.0 and stab.jaccard_std[1] == 0.0
    assert stab.top_freq[1, 3] == 1.0
    assert 0.0 <= stab.jaccard_mean[10] <= 1.0
    assert stab.top_freq.shape == (3, 8) and stab.top_freq.sum() == pytest.approx(10.0)
    d = stab.to_dict([0, 1, 2])
    assert d["top_frequency"][0] == {"layer": 1, "expert": 3, "frequency": 1.0}
    assert d["jaccard_mean"]["1"] == 1.0 and d["unit"] == "prompt"


def test_bootstrap_is_deterministic_per_seed():
    c1, t1, c2, t2 = synthetic(seed=4, noise=0.6, n_prompts=12)
    a = bootstrap_stability(c1, t1, c2, t2, n_boot=40, seed=11)
    b = bootstrap_stability(c1, t1, c2, t2, n_boot=40, seed=11)
    c = bootstrap_stability(c1, t1, c2, t2, n_boot=40, seed=12)
    assert a.jaccard_mean == b.jaccard_mean and np.array_equal(a.top_freq, b.top_freq)
    assert not (a.jaccard_mean == c.jaccard_mean and np.array_equal(a.top_freq, c.top_freq))
    # with pure noise the bootstrap top-5 overlaps the full one only partly
    assert a.jaccard_mean[5] < 1.0


def test_bootstrap_clips_top_n_to_the_number_of_experts():
    c1 = np.array([[[2, 0, 1]], [[1, 1, 0]]])
    c2 = np.array([[[0, 1, 1]], [[0, 2, 0]]])
    t = np.array([2, 2])
    s = bootstrap_stability(c1, t, c2, t, n_boot=10, seed=0, top_n=(1, 5, 10))
    assert s.top_n == (1, 3) and s.freq_top == 3
    assert s.jaccard_mean[3] == 1.0 and np.allclose(s.top_freq, 1.0)
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_stability(c1, t, c2, t, n_boot=0)


def test_bootstrap_handles_prompts_without_window_tokens():
    c1 = np.array([[[1, 0]], [[0, 0]], [[0, 0]]])
    t1 = np.array([1, 0, 0])
    c2 = np.array([[[0, 1]]])
    t2 = np.array([1])
    s = bootstrap_stability(c1, t1, c2, t2, n_boot=20, seed=0, top_n=(1,))
    assert s.jaccard_mean[1] == 1.0


def tied_with_weights():
    """1 layer, 4 experts, one window token per prompt (k = 2): behaviour tokens select experts 0 and 1, control
    tokens 2 and 3, so 0 and 1 tie on rd (1) and z, as do 2 and 3 (rd -1). Behaviour prompt A gives expert 0 the
    larger gate weight, prompt B expert 1 (more so): over both, expert 1 carries more (w1 = .4, .6)."""
    c1 = np.array([[[1, 1, 0, 0]], [[1, 1, 0, 0]]])
    w1 = np.array([[[0.7, 0.3, 0, 0]], [[0.1, 0.9, 0, 0]]])
    c2 = np.array([[[0, 0, 1, 1]], [[0, 0, 1, 1]]])
    w2 = np.array([[[0, 0, 0.5, 0.5]], [[0, 0, 0.5, 0.5]]])
    t = np.array([1, 1])
    return c1, t, c2, t, w1, w2


def test_gate_weight_breaks_rd_and_z_ties():
    c1, t1, c2, t2, w1, w2 = tied_with_weights()
    st = expert_stats(c1, t1, c2, t2, weights1=w1, weights2=w2)
    assert st.rd[0, 0] == st.rd[0, 1] == 1.0 and st.z[0, 0] == st.z[0, 1]
    np.testing.assert_allclose(st.w1, [[0.4, 0.6, 0.0, 0.0]])
    np.testing.assert_allclose(st.w2, [[0.0, 0.0, 0.5, 0.5]])
    np.testing.assert_allclose(st.dw, [[0.4, 0.6, -0.5, -0.5]])
    assert st.ranking() == [(0, 1), (0, 0), (0, 2), (0, 3)]  # dw decides 0 vs 1; 2 and 3 tie on it too
    rec = st.record(0, 1)
    assert rec["w1"] == pytest.approx(0.6) and rec["w2"] == 0.0 and rec["dw"] == pytest.approx(0.6)
    # dw only breaks ties: rd first, then z, then dw, then position
    rd = np.array([0.5, 0.5, 0.9, 0.5])
    z = np.array([2.0, 2.0, 1.0, 3.0])
    assert ranking(rd, z, np.array([0.1, 0.3, 0.0, -1.0])).tolist() == [2, 3, 1, 0]
    # dw equal up to floating-point noise ties, and the position decides
    assert ranking(rd[:2], z[:2], np.array([0.3, 0.1 + 0.2])).tolist() == [0, 1]
    with pytest.raises(ValueError, match="dw has"):
        ranking(rd, z, np.zeros(3))


def test_without_weights_the_old_order_holds():
    c1, t1, c2, t2, w1, w2 = tied_with_weights()
    st = expert_stats(c1, t1, c2, t2)
    assert st.ranking() == [(0, 0), (0, 1), (0, 2), (0, 3)]  # rd, z, then (layer, expert)
    assert not st.w1.any() and not st.w2.any() and not st.dw.any()
    assert st.record(0, 0)["dw"] == 0.0
    rd, z = st.rd, st.z
    assert ranking(rd, z).tolist() == ranking(rd, z, None).tolist() == ranking(rd, z, np.zeros_like(rd)).tolist()
    # the bootstrap without weights is the one with all-zero weights (dw = 0 everywhere), seed for seed
    c1, t1, c2, t2 = synthetic(seed=4, noise=0.6, n_prompts=12)
    a = bootstrap_stability(c1, t1, c2, t2, n_boot=30, seed=5)
    b = bootstrap_stability(c1, t1, c2, t2, n_boot=30, seed=5, weights1=np.zeros(c1.shape),
                            weights2=np.zeros(c2.shape))
    assert a.jaccard_mean == b.jaccard_mean and np.array_equal(a.top_freq, b.top_freq)
    with pytest.raises(ValueError, match="both sets or for neither"):
        expert_stats(c1, t1, c2, t2, weights1=np.zeros(c1.shape))
    with pytest.raises(ValueError, match="shape of its counts"):
        expert_stats(c1, t1, c2, t2, weights1=np.zeros(c1.shape), weights2=np.zeros(c2.shape[1:]))
    with pytest.raises(ValueError, match="finite"):
        bootstrap_stability(c1, t1, c2, t2, weights1=np.full(c1.shape, np.nan), weights2=np.zeros(c2.shape))


def test_bootstrap_recomputes_dw_from_the_resampled_prompts():
    c1, t1, c2, t2, w1, w2 = tied_with_weights()
    # without weights expert 0 always wins the rd/z tie on position
    s = bootstrap_stability(c1, t1, c2, t2, n_boot=200, seed=0, top_n=(1,), freq_top=1)
    assert s.top_freq[0, 0] == 1.0 and s.jaccard_mean[1] == 1.0
    # with weights the full ranking puts expert 1 first; a resample of prompt A only (AA, about 1 in 4) puts
    # expert 0 first: dw comes from the resampled weight sums, with the same draws as the counts
    s = bootstrap_stability(c1, t1, c2, t2, n_boot=200, seed=0, top_n=(1,), freq_top=1, weights1=w1, weights2=w2)
    assert s.top_freq[0, 0] + s.top_freq[0, 1] == 1.0 and s.top_freq[0, 2:].sum() == 0.0
    assert 0.15 < s.top_freq[0, 0] < 0.35
    assert s.jaccard_mean[1] == pytest.approx(s.top_freq[0, 1])
    again = bootstrap_stability(c1, t1, c2, t2, n_boot=200, seed=0, top_n=(1,), freq_top=1, weights1=w1,
                                weights2=w2)
    assert np.array_equal(again.top_freq, s.top_freq)
