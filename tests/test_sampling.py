"""The sampler (jaxllama/sampling.py) as pure functions, against independent references.

- Distributions: thousands of draws (one per key, vectorized with jax.vmap) are compared
  with softmax(logits / T), restricted and renormalized to a filter's set, by Pearson's
  chi-square test. Keys are fixed, so each test is deterministic; its alpha (1e-3) says
  how unlucky a fixed key set would have to be for a correct sampler to fail. Each test
  also checks that the same draws *reject* a wrong distribution, so it has power.
- Filters: the set a top-k / top-p / min-p filter keeps is computed in float64 NumPy from
  its definition (transformers' warpers, in transformers' order), with a margin of 1e-4
  on the probability thresholds for float32 rounding; hypothesis drives random logits and
  parameters. transformers' own processors are the reference for the values.
- Batch invariance: a row's token depends on its logits and the key only.
"""

from __future__ import annotations

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxllama.sampling import (
    SamplerSpec,
    SamplingParams,
    apply_repetition_penalty,
    filter_logits,
    sample,
    spec_for,
)

try:
    import scipy.stats as scipy_stats
except ImportError:  # pragma: no cover - scipy is installed where the suite runs
    scipy_stats = None

N_DRAWS = 4000
ALPHA = 1e-3  # a correct sampler fails one fixed key set in a thousand
POWER_ALPHA = 1e-6  # a wrong reference distribution must be rejected far more surely
MARGIN = 1e-4  # float32 softmax/cumsum error is ~1e-6 at these vocab sizes


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def _chi2_critical(df: int, alpha: float) -> float:
    """Upper-alpha quantile of chi-square(df) by the Wilson-Hilferty cube-root normal
    approximation (error under 1% of the value for df >= 3; used only without scipy)."""
    z = -_norm_ppf(alpha)
    c = 2.0 / (9.0 * df)
    return df * (1.0 - c + z * math.sqrt(c)) ** 3


def _norm_ppf(p: float) -> float:
    lo, hi = -40.0, 40.0  # bisection on the normal cdf
    for _ in range(200):
        mid = (lo + hi) / 2
        if 0.5 * math.erfc(-mid / math.sqrt(2)) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def chi2_pvalue_ok(samples: np.ndarray, probs: np.ndarray, alpha: float) -> bool:
    """True when Pearson's test does not reject `probs` at level alpha for `samples`.

    Bins with expected count under 5 are pooled (the usual validity rule). Tokens with
    probability 0 are not binned: a single draw of one fails the caller's set checks.
    """
    n = len(samples)
    counts = np.bincount(samples, minlength=len(probs)).astype(np.float64)
    expected = probs * n
    small = (expected < 5) & (probs > 0)
    big = expected >= 5
    obs = list(counts[big])
    exp = list(expected[big])
    if small.any():
        obs.append(counts[small].sum())
        exp.append(expected[small].sum())
    obs, exp = np.asarray(obs), np.asarray(exp)
    exp *= obs.sum() / exp.sum()  # the draws outside the support are checked elsewhere
    if scipy_stats is not None:
        return scipy_stats.chisquare(obs, exp).pvalue > alpha
    stat = float(((obs - exp) ** 2 / exp).sum())
    return stat < _chi2_critical(len(obs) - 1, alpha)


def softmax64(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    finite = np.isfinite(x)
    z = np.where(finite, x - x[finite].max(), -np.inf)
    e = np.exp(z)
    return e / e.sum()


@functools.partial(jax.jit, static_argnames=("spec", "n"))
def draw_many(logits, seed, params: SamplingParams, spec: SamplerSpec, n: int, seen=None):
    """n tokens for one row of logits (V,), one per key split from `seed`."""
    keys = jax.random.split(jax.random.PRNGKey(seed), n)
    row_seen = None if seen is None else seen[None]
    return jax.vmap(lambda k: sample(logits[None], k, params, spec, row_seen)[0])(keys)


def _sampler(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0):
    spec = spec_for(temperature, top_k, top_p, min_p, repetition_penalty)
    params = SamplingParams.create(temperature if temperature > 0 else 1.0, top_k, top_p, min_p,
                                  repetition_penalty)
    return spec, params


def allowed_set(logits, temperature, top_k, top_p, min_p, margin=0.0) -> np.ndarray:
    """Boolean mask of the tokens the filters keep, from their definitions, in float64.

    Temperature, then top-k (the k largest, ties with the k-th kept), then top-p over
    what top-k kept (a token stays when the mass strictly above it in descending order
    is below top_p; tokens tied with the last one kept stay too), then min-p (a token
    stays when its probability is >= min_p times the largest). `margin` > 0 widens the
    probability thresholds (a superset), < 0 narrows them (a subset).
    """
    x = np.asarray(logits, np.float64) / temperature
    keep = np.ones(x.shape, bool)
    if top_k > 0:
        kth = np.sort(x)[::-1][min(top_k, len(x)) - 1]
        keep &= x >= kth
    if top_p < 1.0:
        p = softmax64(np.where(keep, x, -np.inf))
        order = np.argsort(-x, kind="stable")
        before = np.cumsum(p[order]) - p[order]
        kept_sorted = (before < top_p + margin) & keep[order]
        kept_sorted[0] = True
        threshold = x[order][kept_sorted].min()
        keep &= x >= threshold
    if min_p > 0.0:
        # p_i >= min_p * p_max  <=>  x_i - x_max >= log(min_p): independent of the set's mass.
        xmax = x[keep].max()
        keep &= x - xmax >= math.log(min_p) - margin
    return keep


# --------------------------------------------------------------------------------------
# distributions
# --------------------------------------------------------------------------------------


def test_temperature_one_samples_softmax():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 1.2, 12).astype(np.float32)
    spec, params = _sampler(temperature=1.0)
    draws = np.asarray(draw_many(jnp.asarray(logits), 1, params, spec, N_DRAWS))
    assert chi2_pvalue_ok(draws, softmax64(logits), ALPHA)
    # Power: the same draws reject a moderately different distribution.
    assert not chi2_pvalue_ok(draws, softmax64(logits * 0.7), POWER_ALPHA)
    assert not chi2_pvalue_ok(draws, np.full(12, 1 / 12), POWER_ALPHA)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_scales_the_distribution(temperature):
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 1.0, 10).astype(np.float32)
    spec, params = _sampler(temperature=temperature)
    draws = np.asarray(draw_many(jnp.asarray(logits), 2, params, spec, N_DRAWS))
    assert chi2_pvalue_ok(draws, softmax64(logits / temperature), ALPHA)
    assert not chi2_pvalue_ok(draws, softmax64(logits), POWER_ALPHA)


FILTER_CASES = [
    dict(top_k=3),
    dict(top_p=0.6),
    dict(min_p=0.25),
    dict(top_k=6, top_p=0.85, min_p=0.1, temperature=1.5),
]


@pytest.mark.parametrize("case", FILTER_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_filters_sample_exactly_their_set_renormalized(case):
    """Every token of the set comes up, nothing outside it does, and the frequencies are
    softmax(logits / T) renormalized over the set."""
    logits = np.array([2.0, 1.6, 1.3, 1.1, 0.7, 0.4, 0.0, -0.5], np.float32)
    temperature = case.get("temperature", 1.0)
    args = dict(temperature=temperature, top_k=case.get("top_k", 0), top_p=case.get("top_p", 1.0),
                min_p=case.get("min_p", 0.0))
    keep = allowed_set(logits, **args)
    # The case is chosen away from every threshold, so the margin cannot matter.
    assert (allowed_set(logits, **args, margin=0.01) == keep).all()
    assert (allowed_set(logits, **args, margin=-0.01) == keep).all()
    assert 1 < keep.sum() < len(logits)
    spec, params = _sampler(**args)
    draws = np.asarray(draw_many(jnp.asarray(logits), 3, params, spec, N_DRAWS))
    assert set(draws.tolist()) == set(np.flatnonzero(keep).tolist())
    expected = softmax64(np.where(keep, logits / temperature, -np.inf))
    assert chi2_pvalue_ok(draws, expected, ALPHA)


@functools.partial(jax.jit, static_argnames=("spec",))
def _filter_and_draw(logits, params, spec):
    filtered = filter_logits(logits[None], params, spec)[0]
    keys = jax.random.split(jax.random.PRNGKey(7), 64)
    draws = jax.vmap(lambda k: sample(logits[None], k, params, spec)[0])(keys)
    return filtered, draws


VOCAB = 16
# Logits on a 1/4 grid in [-10, 10]: exact ties are frequent (16 draws from 81 values) and
# stay exact ties after float32 division by a temperature, while distinct values stay
# distinct, so the top-k set is exact in float32 and float64 alike.
grid_logits = st.one_of(
    st.lists(st.integers(-40, 40), min_size=VOCAB, max_size=VOCAB),
    st.lists(st.integers(-8, 8), min_size=VOCAB, max_size=VOCAB),  # mostly ties
).map(lambda xs: np.asarray(xs, np.float32) / 4)


@settings(max_examples=80, deadline=None)
@given(
    logits=grid_logits,
    temperature=st.sampled_from([0.25, 0.7, 1.0, 1.9, 4.0]),
    top_k=st.one_of(st.just(0), st.integers(1, VOCAB + 2)),
    top_p=st.one_of(st.just(1.0), st.floats(1e-3, 0.999)),
    min_p=st.one_of(st.just(0.0), st.floats(1e-3, 0.99)),
)
def test_filters_never_leave_their_set(logits, temperature, top_k, top_p, min_p):
    spec, params = _sampler(temperature, top_k, top_p, min_p)
    filtered, draws = _filter_and_draw(jnp.asarray(logits), params, spec)
    kept = np.isfinite(np.asarray(filtered))
    inner = allowed_set(logits, temperature, top_k, top_p, min_p, margin=-MARGIN)
    outer = allowed_set(logits, temperature, top_k, top_p, min_p, margin=MARGIN)
    assert (inner <= kept).all(), ("dropped a token of the set", np.flatnonzero(inner & ~kept))
    assert (kept <= outer).all(), ("kept a token outside the set", np.flatnonzero(kept & ~outer))
    # Kept logits are the temperature-scaled ones, untouched.
    np.testing.assert_allclose(np.asarray(filtered)[kept], logits[kept] / np.float32(temperature), rtol=1e-6)
    assert kept[np.asarray(draws)].all()


@settings(max_examples=40, deadline=None)
@given(
    logits=st.lists(st.integers(-3, 3), min_size=VOCAB, max_size=VOCAB).map(
        lambda xs: np.asarray(xs, np.float32) / 2),
    top_k=st.integers(1, VOCAB - 1),
    top_p=st.floats(0.05, 0.95),
)
def test_top_k_then_top_p_with_ties(logits, top_k, top_p):
    """Every logit tied with several others: top-k keeps more than k tokens and top-p
    must measure its nucleus over all of them (the filters compose as in transformers)."""
    spec, params = _sampler(1.0, top_k, top_p)
    filtered, _ = _filter_and_draw(jnp.asarray(logits), params, spec)
    kept = np.isfinite(np.asarray(filtered))
    assert (allowed_set(logits, 1.0, top_k, top_p, 0.0, margin=-MARGIN) <= kept).all()
    assert (kept <= allowed_set(logits, 1.0, top_k, top_p, 0.0, margin=MARGIN)).all()


def test_top_p_after_top_k_sees_every_token_top_k_kept():
    """Ties at the k-th logit survive top-k (as in transformers), so top-p must weigh
    them: here top-k=2 keeps {0, 1, 2}, with probabilities .58, .21, .21, and top-p 0.7
    keeps the first two in order (mass above token 1 is .58 < .7) and, by the tie, token 2."""
    logits = np.array([2.0, 1.0, 1.0, 0.0], np.float32)
    spec, params = _sampler(1.0, top_k=2, top_p=0.7)
    filtered = np.asarray(filter_logits(jnp.asarray(logits)[None], params, spec))[0]
    assert np.isfinite(filtered).tolist() == [True, True, True, False]
    assert allowed_set(logits, 1.0, 2, 0.7, 0.0).tolist() == [True, True, True, False]


def _transformers_chain(logits, seen_ids, temperature, top_k, top_p, min_p, penalty):
    procs = transformers.LogitsProcessorList()
    if penalty != 1.0:
        procs.append(transformers.RepetitionPenaltyLogitsProcessor(penalty))
    procs.append(transformers.TemperatureLogitsWarper(temperature))
    if top_k > 0:
        procs.append(transformers.TopKLogitsWarper(top_k))
    if top_p < 1.0:
        procs.append(transformers.TopPLogitsWarper(top_p))
    if min_p > 0.0:
        procs.append(transformers.MinPLogitsWarper(min_p))
    return procs(torch.as_tensor(seen_ids), torch.as_tensor(logits)).numpy()


def test_filters_match_transformers_warpers():
    """Penalty, temperature, top-k, top-p, min-p against transformers' processors in
    generate()'s order, on random distinct logits (ties are where transformers' unstable
    sort makes its choice arbitrary; see the tie test above)."""
    rng = np.random.default_rng(5)
    b, v = 4, 32
    checked = 0
    for _ in range(40):
        logits = rng.normal(0, 2.0, (b, v)).astype(np.float32)
        history = rng.integers(0, v, (b, 6))
        seen = np.zeros((b, v), bool)
        np.put_along_axis(seen, history, True, axis=1)
        temperature = float(rng.choice([0.5, 1.0, 1.7]))
        top_k = int(rng.choice([0, 3, 10]))
        top_p = float(rng.choice([1.0, 0.5, 0.9]))
        min_p = float(rng.choice([0.0, 0.05, 0.3]))
        penalty = float(rng.choice([1.0, 1.3, 0.8]))
        spec, params = _sampler(temperature, top_k, top_p, min_p, penalty)
        x = jnp.asarray(logits)
        if spec.repetition_penalty:
            x = apply_repetition_penalty(x, jnp.asarray(seen), params.repetition_penalty)
        ours = np.asarray(filter_logits(x, params, spec))
        ref = _transformers_chain(logits, history, temperature, top_k, top_p, min_p, penalty)
        assert (np.isfinite(ours) == np.isfinite(ref)).all(), (temperature, top_k, top_p, min_p)
        np.testing.assert_allclose(ours[np.isfinite(ours)], ref[np.isfinite(ref)], rtol=1e-5)
        checked += 1
    assert checked == 40


@settings(max_examples=50, deadline=None)
@given(
    logits=st.lists(st.sampled_from([0.0, -0.0]) | st.floats(-30, 30, width=32, allow_subnormal=False),
                    min_size=12, max_size=12),
    history=st.lists(st.integers(0, 11), min_size=1, max_size=20),
    penalty=st.floats(0.05, 5.0),
)
def test_repetition_penalty_matches_transformers(logits, history, penalty):
    x = np.asarray(logits, np.float32)[None]
    seen = np.zeros_like(x, bool)
    seen[0, history] = True
    ours = np.asarray(apply_repetition_penalty(jnp.asarray(x), jnp.asarray(seen), jnp.float32(penalty)))
    ref = transformers.RepetitionPenaltyLogitsProcessor(penalty)(
        torch.tensor([history]), torch.from_numpy(x.copy())).numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=0)


def test_repetition_penalty_in_greedy_sampling():
    """Greedy with a penalty picks the argmax of the penalized logits: a seen leader
    loses to the unseen runner-up once the penalty is large enough."""
    logits = jnp.asarray([[0.5, 3.0, 2.0, -1.0]])
    seen = jnp.asarray([[False, True, False, False]])
    spec, params = _sampler(0.0, repetition_penalty=1.2)
    assert int(sample(logits, jax.random.PRNGKey(0), params, spec, seen)[0]) == 1  # 2.5 > 2.0
    spec, params = _sampler(0.0, repetition_penalty=2.0)
    assert int(sample(logits, jax.random.PRNGKey(0), params, spec, seen)[0]) == 2  # 1.5 < 2.0


class GreedyTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_greedy_is_argmax(self):
        rng = np.random.default_rng(3)
        logits = jnp.asarray(rng.normal(0, 3, (7, 50)).astype(np.float32))
        # Filters are ignored by greedy; argmax is the first maximum, as jnp.argmax.
        spec = SamplerSpec(greedy=True, top_k=True, top_p=True, min_p=True)
        params = SamplingParams.create(1.0, 3, 0.5, 0.2)
        fn = self.variant(functools.partial(sample, spec=spec))
        for seed in range(3):
            got = fn(logits, jax.random.PRNGKey(seed), params)
            chex.assert_shape(got, (7,))
            chex.assert_type(got, jnp.int32)
            np.testing.assert_array_equal(np.asarray(got), np.argmax(np.asarray(logits), axis=-1))
        tied = jnp.asarray([[1.0, 4.0, 4.0, 0.0]])
        assert int(fn(tied, jax.random.PRNGKey(0), params)[0]) == 1


@pytest.mark.parametrize("kind", ["plain", "filters_and_penalty"])
def test_row_sample_does_not_depend_on_batch_position_or_batchmates(kind):
    rng = np.random.default_rng(4)
    b, v = 6, 40
    logits = rng.normal(0, 1.5, (b, v)).astype(np.float32)
    seen = rng.random((b, v)) < 0.2
    if kind == "plain":
        spec, params = _sampler(1.0)
    else:
        spec, params = _sampler(0.9, top_k=12, top_p=0.9, min_p=0.05, repetition_penalty=1.3)
    run = jax.jit(sample, static_argnames="spec")
    sel = (lambda idx: jnp.asarray(seen[idx])) if spec.repetition_penalty else (lambda idx: None)
    perm = rng.permutation(b)
    other = rng.normal(0, 1.5, (3, v)).astype(np.float32)
    other_seen = rng.random((3, v)) < 0.2
    for seed in range(8):
        key = jax.random.PRNGKey(seed)
        full = np.asarray(run(jnp.asarray(logits), key, params, spec, sel(slice(None))))
        permuted = np.asarray(run(jnp.asarray(logits[perm]), key, params, spec, sel(perm)))
        np.testing.assert_array_equal(permuted, full[perm])
        for i in range(b):
            alone = run(jnp.asarray(logits[i : i + 1]), key, params, spec, sel(slice(i, i + 1)))
            assert int(alone[0]) == full[i]
        # Row 0 among different batchmates, at another position.
        mixed_logits = np.concatenate([other, logits[:1]])
        mixed_seen = jnp.asarray(np.concatenate([other_seen, seen[:1]])) if spec.repetition_penalty else None
        mixed = run(jnp.asarray(mixed_logits), key, params, spec, mixed_seen)
        assert int(mixed[-1]) == full[0]


def test_spec_for_turns_off_neutral_values():
    assert spec_for(0.0, 0, 1.0, 0.0, 1.0) == SamplerSpec(greedy=True)
    assert spec_for(0.7, 5, 0.9, 0.1, 1.1) == SamplerSpec(
        greedy=False, top_k=True, top_p=True, min_p=True, repetition_penalty=True)


def test_engine_row_sampler_equals_the_sampler_checked_above():
    """`jaxllama.engine.steps.sample_rows`, the per-row sampler every decode runs (the
    adapter's and the server's), draws exactly the tokens of `sample` (checked against
    transformers' processors and by distribution above) for each row's own settings:
    same key fold, same filters, penalty and greedy rule, whatever its batchmates use."""
    from jaxllama.engine.steps import sample_rows

    rng = np.random.default_rng(11)
    b, v = 6, 48
    run = jax.jit(sample, static_argnames="spec")
    checked = 0
    for trial in range(12):
        logits = rng.normal(0, 2.0, (b, v)).astype(np.float32)
        seen = rng.random((b, v)) < 0.2
        settings = [dict(temperature=float(rng.choice([0.0, 0.6, 1.0, 1.5])),
                         top_k=int(rng.choice([0, 4, 20])), top_p=float(rng.choice([1.0, 0.8])),
                         min_p=float(rng.choice([0.0, 0.1])),
                         repetition_penalty=float(rng.choice([1.0, 1.3])))
                    for _ in range(b)]
        if trial % 3 == 0:  # a batch where no row sorts (the branch without top-k/top-p)
            for s in settings:
                s.update(top_k=0, top_p=1.0)
        seeds = rng.integers(0, 2**31, b)
        step_ids = rng.integers(0, 50, b).astype(np.int32)
        keys = jnp.stack([jax.random.PRNGKey(int(s)) for s in seeds])
        column = lambda name, dtype: jnp.asarray([s[name] for s in settings], dtype)  # noqa: E731
        got = np.asarray(sample_rows(
            jnp.asarray(logits), keys, jnp.asarray(step_ids), column("temperature", jnp.float32),
            column("top_k", jnp.int32), column("top_p", jnp.float32),
            column("min_p", jnp.float32), column("repetition_penalty", jnp.float32),
            jnp.asarray(seen)))
        for i, s in enumerate(settings):
            spec, params = _sampler(**s)
            key = jax.random.fold_in(keys[i], int(step_ids[i]))
            want = run(jnp.asarray(logits[i:i + 1]), key, params, spec,
                       jnp.asarray(seen[i:i + 1]) if spec.repetition_penalty else None)
            assert int(got[i]) == int(want[0]), (trial, i, s)
            checked += 1
    assert checked == 12 * b
