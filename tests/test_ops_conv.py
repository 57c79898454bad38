"""ops.conv: conv-basis definitions, recovery, FFT application vs the dense path (float64), exactness cases,
gradcheck, decode from a prefill state, overflow-safe numerics, memory structure, and the recorded error on
generic content."""

import pytest
import torch

from hf_fastattn.testing import LargestTensor
from hf_fastattn.ops.conv import (
    DenseColumns,
    ScoreColumns,
    conv_attention,
    conv_decode,
    conv_fft_apply,
    conv_sum,
    dense_scores,
    naive_conv_attention,
    recover,
    search_starts,
    state_matches,
)
from hf_fastattn.ops.conv.basis import placed_starts
from hf_fastattn.ops.conv.fft import fast_length
from hf_fastattn.ops.exact import naive_attention

F64 = torch.float64


def _qkv(b, h, hkv, n, d, std=1.0, dtype=F64, seed=None):
    g = None if seed is None else torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, n, d, dtype=dtype, generator=g) * std,
            torch.randn(b, hkv, n, d, dtype=dtype, generator=g) * std, torch.randn(b, hkv, n, d, dtype=dtype, generator=g))


def _padding(b, n):
    valid = torch.ones(b, n, dtype=torch.bool)
    valid[0, : n // 5] = False
    valid[-1, -3:] = False
    return valid


def _rope(x, base=10000.0):
    n, d = x.shape[-2], x.shape[-1]
    inv = 1.0 / base ** (torch.arange(0, d, 2, dtype=F64) / d)
    ang = torch.arange(n, dtype=F64)[:, None] * inv
    emb = torch.cat([ang, ang], -1)
    half = d // 2
    return x * emb.cos() + torch.cat([-x[..., half:], x[..., :half]], -1) * emb.sin()


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_conv_sum_is_the_cumulative_form():
    n = 11
    bases = torch.randn(3, n, dtype=F64)
    ms = [11, 6, 2]
    starts = torch.tensor([n - m for m in ms])
    assert torch.equal(conv_sum(bases, ms), dense_scores(starts, bases.cumsum(0), n))


def test_fast_length():
    assert fast_length(1000) == 1000 and fast_length(1001) == 1024 and fast_length(2 * 37) == 75
    assert all(fast_length(n) >= n for n in range(1, 300))


# ---------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("placement", ["even", "geometric", "search"])
@pytest.mark.parametrize("pad, kb", [(False, 37), (False, 45), (True, 34), (True, 37), (True, 45)])
def test_k_at_least_the_length_is_exact_attention(placement, pad, kb):
    """k >= a row's valid length (37, or 30 and 34 with padding) puts a basis on every column, whatever the
    placement: "geometric" used to leave gaps near the start and "search" skipped columns within its tolerance."""
    q, k, v = _qkv(2, 4, 2, 37, 8, std=0.5, seed=11)
    valid = _padding(2, 37) if pad else None
    out = conv_attention(q, k, v, 0.3, k_bases=kb, placement=placement, kv_valid=valid)
    ref = naive_attention(q, k, v, 0.3, kv_valid=valid)
    if pad:
        out, ref = out * valid[:, None, :, None], ref * valid[:, None, :, None]
    assert _rel(out, ref) < 1e-10


@pytest.mark.parametrize("placement", ["even", "search"])
def test_constant_content_rope_head_is_one_conv(placement):
    """q_i = q, k_j = k for all positions: RoPE scores depend only on i - j, exactly a 1-conv basis."""
    n, d = 45, 16
    q = _rope(torch.randn(1, 2, 1, d, dtype=F64).expand(1, 2, n, d))
    k = _rope(torch.randn(1, 1, 1, d, dtype=F64).expand(1, 1, n, d))
    v = torch.randn(1, 1, n, d, dtype=F64)
    out = conv_attention(q, k, v, d**-0.5, k_bases=1, placement=placement)
    assert _rel(out, naive_attention(q, k, v, d**-0.5)) < 1e-10


def test_search_recovers_a_synthetic_conv_basis():
    """H = sum_t conv(b_t, m_t) is recovered exactly under the paper's assumptions: every new basis changes the
    first T diagonal entries by more than delta, and the last basis starts at least T columns before the end."""
    n, k, T = 80, 5, 4
    for trial in range(5):
        cuts = torch.sort(torch.randperm(n - T - 1)[: k - 1] + 1).values
        starts = torch.cat([torch.tensor([0]), cuts])
        bases = torch.randn(k, n, dtype=F64)
        bases[1:, 0] = torch.sign(bases[1:, 0]) * (1 + bases[1:, 0].abs())  # |change| >= 1 > delta
        h = conv_sum(bases, (n - starts).tolist())
        oracle = DenseColumns(h[None, None], torch.tensor([n]))
        found = search_starts(oracle, k, T, 0.5, 1e-3)
        assert found[0, 0].tolist() == starts.tolist()
        _, cum = recover(oracle, k, "search", T, 0.5, 1e-3)
        assert torch.allclose(dense_scores(found[0, 0], cum[0, 0], n), h, atol=1e-12)


def test_search_stops_when_nothing_deviates():
    n = 30
    toeplitz = conv_sum(torch.randn(1, n, dtype=F64), [n])
    found = search_starts(DenseColumns(toeplitz[None, None], torch.tensor([n])), 4, 4, 0.5, 1e-3)
    assert found[0, 0].tolist() == [0, 0, 0, 0]


def test_placements():
    lengths = torch.tensor([100, 7])
    even = placed_starts(lengths, 4, "even")
    assert even[0, 0].tolist() == [0, 25, 50, 75] and even[1, 0].tolist() == [0, 1, 3, 5]
    geo = placed_starts(lengths, 4, "geometric")[0, 0].tolist()
    assert geo[0] == 0 and geo == sorted(geo) and geo[-1] == 99 and geo[2] - geo[1] > geo[3] - geo[2]
    with pytest.raises(ValueError, match="conv_placement must be"):
        placed_starts(lengths, 4, "random")
    for placement in ("even", "geometric"):  # an empty row: "geometric" gave 0 - round(0 ** 0) = -1
        starts = placed_starts(torch.tensor([0, 1, 5]), 4, placement)
        assert starts.min() >= 0 and (starts[:2] == 0).all(), placement


@pytest.mark.parametrize("placement", ["even", "geometric", "search"])
def test_fully_padded_row_gives_zeros(placement):
    """A batch element with no valid key at all (kv_valid all False): its rows are 0, as in the exact op, with
    finite gradients, and the other element is what it gives alone."""
    q, k, v = _qkv(2, 4, 2, 30, 8, seed=5)
    valid = torch.ones(2, 30, dtype=torch.bool)
    valid[0] = False
    args = [t.clone().requires_grad_() for t in (q, k, v)]
    out = conv_attention(*args, 0.3, k_bases=4, placement=placement, T=3, kv_valid=valid)
    out.square().sum().backward()
    assert torch.isfinite(out).all() and all(torch.isfinite(t.grad).all() for t in args)
    assert (out[0] == 0).all() and (naive_attention(q, k, v, 0.3, kv_valid=valid)[0] == 0).all()
    alone = conv_attention(q[1:], k[1:], v[1:], 0.3, k_bases=4, placement=placement, T=3)
    assert _rel(out[1:], alone) < 1e-12


# ---------------------------------------------------------------------------------- fft vs dense path
@pytest.mark.parametrize("placement", ["even", "geometric", "search"])
@pytest.mark.parametrize("b, h, hkv, n, d, kb", [(2, 4, 2, 37, 8, 5), (1, 3, 3, 50, 16, 7), (2, 2, 1, 63, 12, 16)])
def test_fft_matches_dense(placement, b, h, hkv, n, d, kb):
    q, k, v = _qkv(b, h, hkv, n, d)
    lengths = torch.tensor([n] * (b - 1) + [n - 6])
    starts, cum = recover(ScoreColumns(q, k, 0.35, lengths), kb, placement, 4, 0.5, 1e-3)
    out, _ = conv_fft_apply(cum, starts, v, lengths)
    ref = naive_conv_attention(v, starts, cum, h, lengths[:, None] > torch.arange(n))
    rows = torch.arange(n) < lengths[:, None, None]
    assert _rel(out * rows[..., None], ref * rows[..., None]) < 1e-10


@pytest.mark.parametrize("dv", [3, 20])
def test_value_width_of_its_own(dv):
    """Values of another width than q/k (DeepSeek's latent attention): a basis per column is exact attention,
    the FFT path equals the dense one on the same basis, and gradcheck passes."""
    q, k, _ = _qkv(2, 4, 2, 30, 8)
    v = torch.randn(2, 2, 30, dv, dtype=F64)
    valid = _padding(2, 30)
    out = conv_attention(q, k, v, 0.35, k_bases=30, kv_valid=valid)
    ref = naive_attention(q, k, v, 0.35, kv_valid=valid)
    rows = valid[:, None, :, None]  # padded rows: 0 in conv, undefined in the reference
    assert out.shape == (2, 4, 30, dv) and _rel(out * rows, ref * rows) < 1e-10
    lengths = torch.tensor([30, 24])
    starts, cum = recover(ScoreColumns(q, k, 0.35, lengths), 5, "even", 4, 0.5, 1e-3)
    fft, _ = conv_fft_apply(cum, starts, v, lengths)
    dense = naive_conv_attention(v, starts, cum, 4, lengths[:, None] > torch.arange(30))
    rows = torch.arange(30) < lengths[:, None, None]
    assert _rel(fft * rows[..., None], dense * rows[..., None]) < 1e-10
    small = [t[:1, :, :9].clone().requires_grad_() for t in (q, k, v)]
    assert torch.autograd.gradcheck(lambda a, b, c: conv_attention(a, b, c, 0.5, k_bases=3, T=2), small)


def test_padding_is_compacted():
    """A padded row gives what its valid tokens alone give."""
    q, k, v = _qkv(2, 2, 2, 40, 8)
    valid = torch.ones(2, 40, dtype=torch.bool)
    valid[1, :9] = False
    out = conv_attention(q, k, v, 0.3, k_bases=6, kv_valid=valid)
    alone = conv_attention(q[1:, :, 9:], k[1:, :, 9:], v[1:, :, 9:], 0.3, k_bases=6)
    assert _rel(out[1:, :, 9:], alone) < 1e-12 and (out[1, :, :9] == 0).all()


@pytest.mark.parametrize("placement, softcap", [("even", None), ("search", None), ("geometric", 1.5)])
def test_conv_gradcheck(placement, softcap):
    q, k, v = _qkv(2, 4, 2, 11, 3, std=0.7)
    valid = _padding(2, 11)

    def fn(q, k, v):
        return conv_attention(q, k, v, 0.5, k_bases=3, placement=placement, T=2, softcap=softcap, kv_valid=valid)

    assert torch.autograd.gradcheck(fn, (q.requires_grad_(), k.requires_grad_(), v.requires_grad_()))


# ---------------------------------------------------------------------------------------------- decode
@pytest.mark.parametrize("placement, softcap", [("even", None), ("search", None), ("even", 1.5)])
def test_decode_extends_the_same_approximation(placement, softcap):
    """Decode rows use the prefill's basis columns, extended with the new queries: they equal the dense
    approximation with those same basis columns over the whole (compacted) sequence (softcap: of the capped
    columns)."""
    n, extra, scale = 48, 5, 0.3
    q, k, v = _qkv(2, 4, 2, n + extra, 8)
    valid = torch.ones(2, n + extra, dtype=torch.bool)
    valid[0, :6] = False  # left padding, as in generation
    prefix = (slice(None), slice(None), slice(0, n))
    _, state = conv_attention(q[prefix], k[prefix], v[prefix], scale, k_bases=6, placement=placement,
                              softcap=softcap, kv_valid=valid[:, :n], return_state=True)
    starts0 = state.starts
    pos = n
    for step in (1, 3, 1):  # decode steps and a chunked-prefill step
        nxt = pos + step
        assert state_matches(state, k[:, :, :nxt], valid[:, :nxt], step)
        out, state = conv_decode(q[:, :, pos:nxt], k[:, :, :nxt], v[:, :, :nxt], scale, state, softcap=softcap,
                                 kv_valid=valid[:, :nxt])
        for b in range(2):
            keep = valid[b, :nxt].nonzero()[:, 0]
            qc, kc, vc = (t[b : b + 1, :, keep] for t in (q, k, v))
            lengths = torch.tensor([len(keep)])
            cum = ScoreColumns(qc, kc, scale, lengths).columns(starts0[b : b + 1])
            if softcap is not None:
                cum = softcap * torch.tanh(cum / softcap)
            ref = naive_conv_attention(vc, starts0[b : b + 1], cum, 4)[:, :, -step:]
            assert _rel(out[b : b + 1], ref) < 1e-10
        pos = nxt


@pytest.mark.parametrize("placement", ["even", "search", "geometric"])
def test_decode_after_a_short_prefill_keeps_k_bases(placement):
    """A prefill shorter than k made every column a basis (exact attention). Decoding adds the new columns as bases
    until k are held, so rows of at most k tokens stay exact attention (before: the new columns joined the last
    prefill segment, 0.14-0.38 off exact at 6-8 tokens with k = 16); past k the rows equal the conv approximation
    with bases at columns 0..k-1. Left padding, a chunked step that crosses k, and sinks."""
    kb, scale = 8, 0.4
    q, k, v = _qkv(2, 4, 2, 16, 8)
    valid = torch.ones(2, 16, dtype=torch.bool)
    valid[1, :2] = False  # row 1 has 2 tokens fewer
    sinks = torch.randn(4, dtype=F64)
    _, state = conv_attention(q[:, :, :5], k[:, :, :5], v[:, :, :5], scale, k_bases=kb, placement=placement,
                              kv_valid=valid[:, :5], return_state=True, sinks=sinks)
    pos, beyond = 5, []
    for step in (1, 2, 3, 1, 4):  # row 0 reaches k = 8 tokens at slot 8; row 1 at slot 10
        nxt = pos + step
        assert state_matches(state, k[:, :, :nxt], valid[:, :nxt], step)
        out, state = conv_decode(q[:, :, pos:nxt], k[:, :, :nxt], v[:, :, :nxt], scale, state, kv_valid=valid[:, :nxt],
                                 sinks=sinks)
        for b in range(2):
            keep = valid[b, :nxt].nonzero()[:, 0]
            qc, kc, vc = (t[b : b + 1, :, keep] for t in (q, k, v))
            exact = naive_attention(qc, kc, vc, scale, sinks=sinks)[:, :, -step:]
            starts = torch.arange(kb)[None, None].clamp(max=len(keep) - 1)
            cum = ScoreColumns(qc, kc, scale, torch.tensor([len(keep)])).columns(starts)
            approx = naive_conv_attention(vc, starts, cum, 4, sinks=sinks)[:, :, -step:]
            assert _rel(out[b : b + 1], approx) < 1e-10
            within = len(keep) - step + torch.arange(step) < kb  # rows that see at most k tokens
            if within.any():
                assert _rel(out[b : b + 1, :, within], exact[:, :, within]) < 1e-10
            if not within.all():
                beyond.append(_rel(out[b : b + 1, :, ~within], exact[:, :, ~within]))
        pos = nxt
    assert min(beyond) > 1e-3  # past k the approximation is in use (the test can tell the two apart)


def test_autocast_changes_nothing():
    """Under bf16 autocast (accelerate's mixed precision) the op runs as without it: wide logits send rows to the
    direct path, whose product autocast made bf16 (index_put into the float32 output raised), and the FFT inputs
    and scores keep their own precisions."""
    q, k, v = (t.bfloat16() for t in _qkv(1, 2, 2, 64, 16, std=3.0, dtype=torch.float32))
    plain, state = conv_attention(q, k, v, 0.25, k_bases=4, return_state=True)
    assert state.direct_rows > 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(conv_attention(q, k, v, 0.25, k_bases=4), plain)


def test_state_rejects_a_different_history():
    q, k, v = _qkv(1, 2, 2, 20, 8)
    _, state = conv_attention(q[:, :, :19], k[:, :, :19], v[:, :, :19], 0.3, k_bases=4, return_state=True)
    assert state_matches(state, k, None, 1)
    other = k.clone()
    other[:, :, 10] += 1.0  # e.g. a reordered beam
    assert not state_matches(state, other, None, 1)
    assert not state_matches(state, k[:, :, :19], None, 1)


# ------------------------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("std", [3.0, 6.0])
def test_wide_logits_float64_is_tight(std):
    """float64 on the mixed path (logit spread ~50 / ~280: some rows by FFT, some direct) equals the dense
    reference on the same basis to ~1e-13: the reliability threshold is per dtype (fft.RELIABLE), float32's
    100 bounds left float64 rows at 4e-5."""
    q, k, v = _qkv(1, 2, 2, 256, 32, std=std, seed=3)
    lengths = torch.tensor([256])
    starts, cum = recover(ScoreColumns(q, k, 32**-0.5, lengths), 8, "even")
    out, n_direct = conv_fft_apply(cum, starts, v, lengths)
    assert 0 < n_direct < 2 * 256
    assert (out - naive_conv_attention(v, starts, cum, 2)).abs().max().item() < 1e-11 * v.abs().max().item()


def test_wide_logits_gradcheck():
    """gradcheck on the mixed FFT / direct path at a logit spread of ~90 (17 of 24 rows direct; 12 with float32's
    threshold, whose FFT rows failed): its central difference divides the FFT rows' error by 2e-6, so float64 rows
    are left to the FFT only down to ~1e-13."""
    q, k, v = _qkv(1, 2, 1, 12, 4, std=3.0, seed=1)
    _, state = conv_attention(q, k, v, 0.5, k_bases=3, return_state=True)
    assert 0 < state.direct_rows < 2 * 12
    args = [t.clone().requires_grad_() for t in (q, k, v)]
    assert torch.autograd.gradcheck(lambda q, k, v: conv_attention(q, k, v, 0.5, k_bases=3), args)


@pytest.mark.parametrize("placement", ["even", "geometric", "search"])
def test_bf16_scores_accumulate_in_float32(placement):
    """bf16 inputs compute scores, bases and sums in float32: they equal the same op on the float32 upcast of the
    same inputs up to the final rounding to bf16, <= 2^-8 relative per element (bf16 logits of size ~10 were off
    by ~0.03, the outputs by up to 700 %), prefill and decode alike."""
    q, k, v = (t.to(torch.bfloat16) for t in _qkv(2, 4, 2, 41, 16, std=2.0, dtype=torch.float32, seed=9))
    valid = torch.ones(2, 41, dtype=torch.bool)
    valid[1, :6] = False
    pre = (slice(None), slice(None), slice(0, 40))
    outs, states = {}, {}
    for dt in (torch.bfloat16, torch.float32):
        a, b, c = (t.to(dt) for t in (q, k, v))
        outs[dt], states[dt] = conv_attention(a[pre], b[pre], c[pre], 0.25, k_bases=6, placement=placement, T=4,
                                              kv_valid=valid[:, :40], return_state=True)
        outs[dt, "decode"], _ = conv_decode(a[:, :, 40:], b, c, 0.25, states[dt], kv_valid=valid)
    for key in (torch.bfloat16, (torch.bfloat16, "decode")):
        got, ref = outs[key], outs[torch.float32 if key is torch.bfloat16 else (torch.float32, "decode")]
        assert got.dtype == torch.bfloat16
        assert ((got.float() - ref).abs() <= 2**-8 * ref.abs()).all(), key
    assert states[torch.bfloat16].cum.dtype == torch.float32


@pytest.mark.parametrize("std", [1.0, 3.0, 6.0])
def test_wide_logits_are_finite_and_correct(std):
    """Logits up to the hundreds: the FFT's absolute error would swamp small rows; they are recomputed."""
    q, k, v = _qkv(1, 2, 2, 256, 32, std=std, dtype=torch.float32)
    lengths = torch.tensor([256])
    starts, cum = recover(ScoreColumns(q.double(), k.double(), 32**-0.5, lengths), 8, "even")
    ref = naive_conv_attention(v.double(), starts, cum, 2)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, state = conv_attention(q, k, v, 32**-0.5, k_bases=8, return_state=True)
    out.square().sum().backward()
    assert torch.isfinite(out).all() and all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert (out.double() - ref).abs().max().item() < 1e-4
    if std >= 3:
        assert state.direct_rows > 0


def test_memory_is_linear_in_n():
    n, d, kb = 2048, 8, 4
    q, k, v = (t.float().requires_grad_() for t in _qkv(1, 2, 2, n, d, std=0.3))
    with LargestTensor() as sizes:
        out = conv_attention(q, k, v, 0.3, k_bases=kb)
        out.sum().backward()
    assert sizes.largest <= 2 * 2 * kb * fast_length(2 * n) * (d + 1) < n * n / 4


@pytest.mark.parametrize("kwargs, match", [
    (dict(kv_valid=torch.ones(10, dtype=torch.bool)), r"kv_valid must be a bool tensor \[B, Nk\] = \[1, 10\].*got \(10,\)"),
    (dict(kv_valid=torch.ones(1, 1, 10, dtype=torch.bool)), r"kv_valid must be a bool tensor \[B, Nk\]"),
    (dict(kv_valid=torch.ones(1, 10)), r"kv_valid must be bool .*got torch.float32"),
    (dict(k_bases=0), r"k_bases must be an integer >= 1; got 0"),
    (dict(k_bases=2.5), r"k_bases must be an integer >= 1; got 2.5"),
    (dict(k_bases=True), r"k_bases must be an integer >= 1; got True"),
    (dict(T=0), r"T must be an integer >= 1; got 0"),
    (dict(T=2.0), r"T must be an integer >= 1; got 2.0"),
    (dict(delta=0.0), r"delta must be a finite number > 0; got 0.0"),
    (dict(delta=float("nan")), r"delta must be a finite number > 0; got nan"),
    (dict(eps=-1e-3), r"eps must be a finite number >= 0; got -0.001"),
    (dict(placement="search", T=8, eps=0.05), r"delta must exceed 2 T eps = 0.8 with placement 'search'.*got 0.5"),
    (dict(softcap=0.0), r"softcap must be None or a finite number > 0; got 0.0"),
    (dict(softcap=-30.0), r"softcap must be None or a finite number > 0; got -30.0"),
    (dict(placement="random"), r"conv_placement must be one of search, even, geometric; got 'random'"),
])
def test_bad_arguments(kwargs, match):
    q, k, v = _qkv(1, 2, 2, 10, 4, seed=2)
    with pytest.raises(ValueError, match=match):
        conv_attention(q, k, v, 0.3, **kwargs)


def test_bad_shapes():
    q, k, v = _qkv(1, 2, 2, 10, 4, seed=2)
    with pytest.raises(ValueError, match="Nq == Nk"):
        conv_attention(q[:, :, :5], k, v, 0.3)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        conv_attention(torch.randn(1, 3, 10, 4, dtype=F64), k, v, 0.3)
    _, state = conv_attention(q[:, :, :9], k[:, :, :9], v[:, :, :9], 0.3, k_bases=3, return_state=True)
    with pytest.raises(ValueError, match=r"kv_valid must be a bool tensor \[B, Nk\]"):
        conv_decode(q[:, :, 9:], k, v, 0.3, state, kv_valid=torch.ones(10, dtype=torch.bool))


# ------------------------------------------------------------------------ recorded error on generic content
RECORDED = {  # relative output error on random RoPE q, k (n = 256, d = 32, seed 1234), measured 2026-11-24
    ("even", 4): 0.9708, ("even", 16): 0.9467, ("even", 64): 0.8637,
    ("search", 4): 0.7607, ("search", 16): 0.8553, ("search", 64): 0.3731,
}


def test_generic_content_error_is_recorded():
    """Conv bases approximate positional (Toeplitz) heads; on generic content they are mostly wrong. The numbers
    are kept here so that an accuracy regression (or improvement) shows up as a failing test."""
    g = torch.Generator().manual_seed(1234)
    n, d = 256, 32
    q = _rope(torch.randn(1, 4, n, d, generator=g, dtype=F64))
    k = _rope(torch.randn(1, 2, n, d, generator=g, dtype=F64))
    v = torch.randn(1, 2, n, d, generator=g, dtype=F64)
    ref = naive_attention(q, k, v, d**-0.5)
    for (placement, kb), expected in RECORDED.items():
        err = ((conv_attention(q, k, v, d**-0.5, k_bases=kb, placement=placement) - ref).norm() / ref.norm()).item()
        assert abs(err - expected) < 2e-3, (placement, kb, err)


# ------------------------------------------------------------------------------- boundaries (mutation audit)
def test_probe_marks_rows_past_the_length():
    """ScoreColumns.probe returns the score entries H[j + r, j] and NaN exactly from row L (the valid length) on:
    a row at the length is a padded query (or row N - 1 read twice), and the search must not count it."""
    n, T, s = 20, 4, 0.3
    q, k, _ = _qkv(2, 4, 2, n, 8)
    lengths = torch.tensor([n, n - 6])
    cols = torch.tensor([0, 11, n - 6, n - 2])[None, None].expand(2, 4, 4)
    vals = torch.stack([ScoreColumns(q, k, s, lengths).probe(cols[..., u], T) for u in range(4)], -2)
    h = s * q @ k.repeat_interleave(2, dim=1).transpose(-1, -2)  # [B, H, N, N]
    for b in range(2):
        for u, j in enumerate(cols[0, 0].tolist()):
            for r in range(T):
                got = vals[b, :, u, r]
                if j + r >= int(lengths[b]):
                    assert torch.isnan(got).all(), (b, j, r)
                else:
                    assert torch.allclose(got, h[b, :, j + r, j], atol=1e-12), (b, j, r)


def test_search_finds_a_change_of_exactly_delta_under_noise():
    """The paper's rule: a column deviates when |H[j:j+T, j] - pred|_1 >= delta - 2 T eps, so a basis whose first T
    diagonal entries change by exactly delta (L1) is found even with entry noise up to eps/2 (deviation >=
    delta - T eps); a threshold of delta + 2 T eps misses it."""
    n, T, delta, eps = 40, 4, 0.5, 1e-3
    for trial in range(3):
        bases = torch.randn(2, n, dtype=F64)
        bases[1, :T] = delta / T * torch.sign(torch.randn(T, dtype=F64))
        h = conv_sum(bases, [n, n - 17]) + (torch.rand(n, n, dtype=F64) - 0.5) * eps  # basis columns 0 and 17
        found = search_starts(DenseColumns(h[None, None], torch.tensor([n])), 2, T, delta, eps)
        assert found[0, 0].tolist() == [0, 17]


def test_fft_in_groups_of_bases_matches_one_group(monkeypatch):
    """Past the spectra memory budget the bases are transformed in groups (forward) and their spectra recomputed
    per group (backward): with one basis per group, output and gradients equal the single-group run (float64)."""
    from hf_fastattn.ops.conv import fft

    q, k, v = _qkv(2, 4, 2, 33, 6)
    valid = _padding(2, 33)
    do = torch.randn(2, 4, 33, 6, dtype=F64)

    def run():
        args = [t.clone().requires_grad_() for t in (q, k, v)]
        out = conv_attention(*args, 0.4, k_bases=5, placement="search", T=3, kv_valid=valid)
        return (out, *torch.autograd.grad(out, args, do))

    ref = run()
    monkeypatch.setattr(fft, "_FFT_BUDGET", 1)  # one basis per group
    for a, b in zip(run(), ref):
        assert (a - b).abs().max().item() < 1e-12


@pytest.mark.parametrize("n", [37, 41, 50])  # 2N - 2 = 72, 80, 98: the first two are FFT-fast lengths
def test_single_basis_fft_does_not_wrap(n):
    """With one basis (a Toeplitz head) a row's convolution spans lags 0..2N - 2: the FFT length must be >= 2N - 1,
    or the last product wraps around onto row 0 (several bases each span less, so only this case shows it)."""
    q, k, v = _qkv(1, 2, 1, n, 8)
    lengths = torch.tensor([n])
    starts, cum = recover(ScoreColumns(q, k, 0.4, lengths), 1, "even")
    out, _ = conv_fft_apply(cum, starts, v, lengths)
    assert _rel(out, naive_conv_attention(v, starts, cum, 2)) < 1e-10


def test_uniformly_negative_logits_keep_their_shift():
    """Softmax is shift invariant: a head whose logits all sit near -200 still gets its attention. The per-head
    shift is the largest entry some valid (i, j) reads, not the zeros stored past the length, so exp does not
    underflow to 0 / 0 in float32."""
    n, d, s = 64, 8, 0.5
    q, k, v = _qkv(1, 2, 1, n, d, std=0.3, dtype=torch.float32)
    q[..., 0] += 20.0
    k[..., 0] -= 20.0  # s q.k ~ -200 everywhere
    lengths = torch.tensor([n])
    starts, cum = recover(ScoreColumns(q.double(), k.double(), s, lengths), 4, "even")
    ref = naive_conv_attention(v.double(), starts, cum, 2)
    out = conv_attention(q, k, v, s, k_bases=4)
    assert torch.isfinite(out).all()
    assert (out.double() - ref).abs().max().item() < 1e-3  # measured <= 7.4e-5: float32 logits near -200 round by ~1e-5


def test_dense_reference_masks_padded_key_columns():
    """naive_conv_attention's kv_valid removes padded *keys* (columns): with left padding a real row attends to
    its valid keys only (the other tests pad on the right, where masking rows instead would look the same)."""
    b, h, n, kb = 2, 2, 24, 3
    v = torch.randn(b, 1, n, 4, dtype=F64)
    starts = torch.tensor([0, 7, 15]).expand(b, 1, kb)
    cum = torch.randn(b, h, kb, n, dtype=F64)
    valid = torch.ones(b, n, dtype=torch.bool)
    valid[0, :5] = False  # left padding
    out = naive_conv_attention(v, starts, cum, h, valid)
    scores = dense_scores(starts, cum, n)
    for i in range(5, n):
        p = torch.softmax(scores[0, :, i, 5 : i + 1], -1)  # [H, keys 5..i]
        assert torch.allclose(out[0, :, i], p @ v[0, 0, 5 : i + 1], atol=1e-12)
