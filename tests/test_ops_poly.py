"""ops.poly: features, chunked linear-time form vs the quadratic reference (float64), gradcheck, decode,
overflow safety, RoPE fidelity, memory structure, and the error vs exact softmax against stated bounds."""

import math

import pytest
import torch

from hf_fastattn.testing import LargestTensor
from hf_fastattn.ops.exact import naive_attention
from hf_fastattn.ops.poly import guard_stats, poly_attention
from hf_fastattn.ops.poly.chunk import poly_chunk_attention, poly_direct_attention
from hf_fastattn.ops.poly.features import (
    FeatureMap,
    check_feature_count,
    feature_count,
    gaussian_output_error,
    poly_coefficients,
    poly_eval,
    poly_minimum,
    weight_error,
)
from hf_fastattn.ops.poly.naive import naive_poly_attention, naive_rope_poly_attention

F64 = torch.float64


def _qkv(b, h, hkv, nq, nk, d, std=1.0, dtype=F64):
    q = torch.randn(b, h, nq, d, dtype=dtype) * std
    k = torch.randn(b, hkv, nk, d, dtype=dtype) * std
    v = torch.randn(b, hkv, nk, d, dtype=dtype)
    return q, k, v


def _padding(b, nk):
    valid = torch.ones(b, nk, dtype=torch.bool)
    valid[0, : nk // 4] = False  # left padding
    valid[-1, -3:] = False  # right padding
    return valid


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


# ------------------------------------------------------------------------------------------- features
@pytest.mark.parametrize("d, degree", [(5, 2), (12, 2), (64, 2), (4, 4), (7, 4), (3, 6)])
@pytest.mark.parametrize("kind", ["taylor", "fit"])
def test_feature_map_reproduces_polynomial(d, degree, kind):
    coeffs = poly_coefficients(degree, kind, 2.0)
    fmap = FeatureMap.get(d, degree)
    q, k = torch.randn(9, d, dtype=F64), torch.randn(11, d, dtype=F64)
    lhs = (fmap.coefficients(coeffs, 0.37, F64) * fmap(q)) @ fmap(k).T
    assert fmap(q).shape[-1] == fmap.r
    assert _rel(lhs, poly_eval(coeffs, 0.37 * q @ k.T)) < 1e-13


@pytest.mark.parametrize("d", [5, 16, 20])
def test_feature_vjp_matches_autograd(d):
    fmap = FeatureMap.get(d, 2)
    x = torch.randn(3, 7, d, dtype=F64, requires_grad=True)
    g = torch.randn(3, 7, fmap.r, dtype=F64)
    (auto,) = torch.autograd.grad(fmap(x), x, g)
    assert (fmap.vjp(x.detach(), g) - auto).abs().max().item() < 1e-12
    # the chunk ops' build (no autograd: slabs written into one buffer) equals the differentiable one, also
    # for a strided input
    xt = x.detach().transpose(0, 1)
    assert torch.equal(fmap(xt), fmap(xt.clone().requires_grad_()).detach())


def test_feature_count_cap_error():
    assert check_feature_count(64, 2, 65536) == 1 + 64 + 8 * sum(range(8, 65, 8))
    with pytest.raises(ValueError, match=r"poly degree 4 on head_dim 64 needs r = 814385 features .* use degree=2"):
        check_feature_count(64, 4, 65536)


def test_even_polynomials_are_positive():
    for degree in (2, 4, 6):
        assert poly_minimum(poly_coefficients(degree)) > 0
        for r in (1.0, 2.0, 3.0):
            assert poly_minimum(poly_coefficients(degree, "fit", r)) > 0
    with pytest.raises(ValueError, match="must be even"):
        poly_coefficients(3)


def test_fit_beats_taylor_on_its_range():
    """By construction the fit has the smaller worst relative weight error on [-R, R]."""
    for degree, r in [(2, 1.0), (2, 2.0), (4, 2.0), (6, 3.0)]:
        assert weight_error(poly_coefficients(degree, "fit", r), r) < weight_error(poly_coefficients(degree), r)


# ------------------------------------------------------------------------------------ chunk vs naive
GRID = [
    pytest.param(1, 2, 2, 40, 40, 64, 0, 16, False, id="B1-T40-D64-W0"),
    pytest.param(2, 4, 2, 63, 63, 64, 5, 16, True, id="B2-GQA-T63-D64-W5-pad"),
    pytest.param(2, 4, 2, 30, 77, 128, 20, 8, True, id="Tq30-Tk77-D128-W20>C-pad"),
    pytest.param(1, 2, 1, 50, 50, 256, 7, 16, False, id="MQA-T50-D256-W7"),
    pytest.param(1, 3, 3, 100, 100, 60, 16, 16, False, id="T100-D60-W=C"),
    pytest.param(2, 2, 2, 33, 33, 12, 0, 32, True, id="T33-D12-C32-pad"),
]


@pytest.mark.parametrize("b, h, hkv, nq, nk, d, band, chunk, pad", GRID)
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_chunk_matches_naive(b, h, hkv, nq, nk, d, band, chunk, pad, softcap):
    q, k, v = _qkv(b, h, hkv, nq, nk, d, std=d**-0.25)
    valid = _padding(b, nk) if pad else None
    coeffs, scale = poly_coefficients(2), d**-0.5
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    ref = naive_poly_attention(q, k, v, scale, coeffs, band, softcap, valid)
    out = poly_chunk_attention(q, k, v, scale, coeffs, band, chunk, softcap, valid)
    assert _rel(out, ref) < 1e-10
    do = torch.randn_like(ref)
    for g_ref, g_out in zip(torch.autograd.grad(ref, (q, k, v), do), torch.autograd.grad(out, (q, k, v), do)):
        assert _rel(g_out, g_ref) < 1e-10


@pytest.mark.parametrize("degree", [4, 6])
def test_chunk_higher_degree_matches_naive(degree):
    q, k, v = _qkv(2, 4, 2, 37, 45, 6, std=0.5)
    valid = _padding(2, 45)
    coeffs = poly_coefficients(degree, "fit", 2.0)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    ref = naive_poly_attention(q, k, v, 0.4, coeffs, 3, None, valid)
    out = poly_chunk_attention(q, k, v, 0.4, coeffs, 3, 8, None, valid)
    assert _rel(out, ref) < 1e-10
    do = torch.randn_like(ref)
    for g_ref, g_out in zip(torch.autograd.grad(ref, (q, k, v), do), torch.autograd.grad(out, (q, k, v), do)):
        assert _rel(g_out, g_ref) < 1e-10


@pytest.mark.parametrize("dv", [4, 20])
def test_value_width_of_its_own(dv):
    """Values narrower or wider than q/k (DeepSeek's latent attention): chunked and direct forms equal the
    reference, gradients included; gradcheck on a small shape."""
    q, k, _ = _qkv(2, 4, 2, 37, 45, 12, std=0.5)
    v = torch.randn(2, 2, 45, dv, dtype=F64)
    valid = _padding(2, 45)
    coeffs = poly_coefficients(2)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    ref = naive_poly_attention(q, k, v, 0.4, coeffs, 5, None, valid)
    out = poly_chunk_attention(q, k, v, 0.4, coeffs, 5, 8, None, valid)
    assert out.shape == (2, 4, 37, dv) and _rel(out, ref) < 1e-10
    do = torch.randn_like(ref)
    for g_ref, g_out in zip(torch.autograd.grad(ref, (q, k, v), do), torch.autograd.grad(out, (q, k, v), do)):
        assert _rel(g_out, g_ref) < 1e-10
    assert _rel(poly_direct_attention(q[:, :, -2:], k, v, 0.4, coeffs, 5, None, valid), ref[:, :, -2:]) < 1e-10
    small = [t[:1, :, :9].detach().requires_grad_() for t in (q, k, v)]
    assert torch.autograd.gradcheck(lambda a, b, c: poly_chunk_attention(a, b, c, 0.4, coeffs, 2, 4), small)


@pytest.mark.parametrize("band, pad, softcap", [(0, False, None), (3, True, None), (6, True, 2.0)])
def test_chunk_gradcheck(band, pad, softcap):
    q, k, v = _qkv(2, 4, 2, 9, 11, 3, std=0.6)  # GQA, Tq < Tk, 3 chunks of 4 with a partial one
    valid = _padding(2, 11) if pad else None
    coeffs = poly_coefficients(2)

    def fn(q, k, v):
        return poly_chunk_attention(q, k, v, 0.5, coeffs, band, 4, softcap, valid)

    assert torch.autograd.gradcheck(fn, (q.requires_grad_(), k.requires_grad_(), v.requires_grad_()))


@pytest.mark.parametrize("softcap", [None, 2.0])
def test_decode_computes_the_same_function(softcap):
    """Prefill (chunked) and decode (direct, Nq = 1 or a few) agree row by row, and both equal the reference."""
    q, k, v = _qkv(2, 4, 2, 90, 90, 16, std=0.8)
    valid = _padding(2, 90)
    coeffs = poly_coefficients(2)
    full = poly_chunk_attention(q, k, v, 0.25, coeffs, 9, 16, softcap, valid)
    assert _rel(full[valid[:, None, :].expand(-1, 4, -1)],
                naive_poly_attention(q, k, v, 0.25, coeffs, 9, softcap, valid)[valid[:, None, :].expand(-1, 4, -1)]) < 1e-10
    for nq in (1, 3):
        direct = poly_direct_attention(q[:, :, -nq:], k, v, 0.25, coeffs, 9, softcap, valid)
        assert _rel(direct, full[:, :, -nq:]) < 1e-12
        # and growing the cache one key at a time (decode steps) sees only the past
        step = poly_direct_attention(q[:, :, 50:51], k[:, :, :51], v[:, :, :51], 0.25, coeffs, 9, softcap,
                                     valid[:, :51])
        assert _rel(step, full[:, :, 50:51]) < 1e-12


@pytest.mark.parametrize("band, softcap, pad, sinks, nq, start, stop", [
    (0, None, False, False, 1, 30, 60), (1, None, True, False, 1, 30, 60), (5, 2.0, True, True, 1, 30, 60),
    (5, None, True, False, 3, 30, 60),
    (2, None, True, False, 2, 250, 530),  # the real block size (64 slots); a first build of several blocks
])
def test_recurrent_decode_equals_direct(band, softcap, pad, sinks, nq, start, stop, monkeypatch):
    """Decoding with the far keys in a kept state is the direct form's function (float64, tight), call after call
    on a growing cache: the state is extended by whole blocks, not rebuilt, and it is rebuilt for another cache
    (beams reordered, padding changed, other options) instead of lending it another sequence's keys."""
    from hf_fastattn.ops.poly import poly_recurrent_attention, recurrent
    from hf_fastattn.ops.poly.recurrent import far_end, worth_a_state

    if stop < 100:  # blocks of 8 slots, so that a short cache has several (the function does not depend on it)
        monkeypatch.setattr(recurrent, "_BLOCK", 8)
    block = recurrent._BLOCK

    q, k, v = _qkv(3, 4, 2, stop, stop, 4, std=0.7)  # d = 4: r = 15 features, so 60 keys are mostly far
    valid = _padding(3, stop) if pad else None
    sink = torch.randn(4, dtype=F64) if sinks else None
    coeffs = poly_coefficients(2)
    args = (0.5, coeffs, band, softcap)
    state = None
    steps = list(range(start, stop + 1, nq)) if stop < 100 else [start, start + 5, 256, 300, 511, 513, 514, stop]
    for nk in steps:  # the first call builds the state from start - nq - band + 1 far slots
        sl = slice(nk - nq, nk)
        kv = None if valid is None else valid[:, :nk]
        out, new = poly_recurrent_attention(q[:, :, sl], k[:, :, :nk], v[:, :, :nk], *args, kv, sink, state)
        ref = poly_direct_attention(q[:, :, sl], k[:, :, :nk], v[:, :, :nk], *args, kv, sink)
        assert _rel(out, ref) < 1e-12
        assert state is None or new is state  # extended in place
        assert new.upto == far_end(nk, nq, band) // block * block  # the whole blocks of far keys
        norms = k[:, :, : new.upto].norm(dim=-1)  # the far bound's max |k| (the row shift) is the direct form's
        if valid is not None:
            norms = norms.masked_fill(~valid[:, None, : new.upto], 0.0)
        assert torch.allclose(new.kmax, norms.amax(-1), rtol=1e-14)
        state = new
    assert worth_a_state(stop, nq, band, 4, 2) and not worth_a_state(15 + nq + band - 1, nq, band, 4, 2)
    # the guard's key moments from the state equal a pass over the cache
    from hf_fastattn.ops.poly.recurrent import key_moments

    rows = q[:, :, steps[-1] - nq : steps[-1]]
    kept = guard_stats(rows, k, 0.5, coeffs, valid, moments=key_moments(state, k, valid))
    full = guard_stats(rows, k, 0.5, coeffs, valid)
    for a, b in ((kept.bound, full.bound), (kept.sigma, full.sigma), (kept.predicted, full.predicted)):
        assert a == pytest.approx(b, rel=1e-5)

    def rebuilt(q_, k_, v_, kv, *opts):
        out, new = poly_recurrent_attention(q_, k_, v_, *opts, kv, sink, state)
        assert new is not state
        assert _rel(out, poly_direct_attention(q_, k_, v_, *opts, kv, sink)) < 1e-12

    perm = torch.tensor([2, 0, 1])  # beam search reorders the cache's rows
    rebuilt(q[perm, :, -nq:], k[perm], v[perm], None if valid is None else valid[perm], *args)
    k1 = k.clone()
    k1[1, :, 17] = torch.randn(2, 4, dtype=F64)  # beams that differ in one early key
    rebuilt(q[:, :, -nq:], k1, v, valid, *args)
    v1 = v.clone()
    v1[1, :, 17] = torch.randn(2, 4, dtype=F64)  # the same keys with another value (a LoRA on v_proj switched off)
    rebuilt(q[:, :, -nq:], k, v1, valid, *args)
    other = torch.ones(3, stop, dtype=torch.bool)
    other[1, :7] = False  # the same keys with other padding
    rebuilt(q[:, :, -nq:], k, v, other, *args)
    rebuilt(q[:, :, -nq:], k, v, valid, 0.25, coeffs, band, softcap)  # another scale: another function


@pytest.mark.parametrize("nq, chunk, band, pad, sinks", [(300, 64, 5, True, False), (200, 32, 0, False, True),
                                                        (230, 64, 70, True, False)])
def test_decode_state_from_prefill(nq, chunk, band, pad, sinks):
    """A prefill's last chunk-path state starts the decode state: the same state a first decode call would build
    from the cache (float64), and decoding from it extends it (no rebuild) and equals the direct form. Chunked
    prefill (keys before the queries) hands over too when its state ends on a block boundary."""
    from hf_fastattn.ops.poly import poly_recurrent_attention
    from hf_fastattn.ops.poly.recurrent import from_prefill

    nk = nq + (64 if nq == 230 else 0)  # a chunked prefill after 64 cached keys
    q, k, v = _qkv(2, 4, 2, nk + 3, nk + 3, 4, std=0.7)
    valid = _padding(2, nk + 3) if pad else None
    valid = None if valid is None else valid.clone()
    if valid is not None:
        valid[-1, -3:] = True  # the decoded tokens are real
    sink = torch.randn(4, dtype=F64) if sinks else None
    c = poly_coefficients(2)
    kv = None if valid is None else valid[:, :nk]
    out, final = poly_chunk_attention(q[:, :, nk - nq : nk], k[:, :, :nk], v[:, :, :nk], 0.5, c, band, chunk, None,
                                      kv, sink, output_final_state=True)
    assert _rel(out, poly_chunk_attention(q[:, :, nk - nq : nk], k[:, :, :nk], v[:, :, :nk], 0.5, c, band, chunk,
                                          None, kv, sink)) == 0
    state = from_prefill(final, q, k[:, :, :nk], v[:, :, :nk], 0.5, c, band, kv)
    assert state is not None and state.upto == final[1] > 0
    args = (0.5, c, band, None)
    _, built = poly_recurrent_attention(q[:, :, nk : nk + 1], k[:, :, : nk + 1], v[:, :, : nk + 1], *args,
                                        None if valid is None else valid[:, : nk + 1], sink)
    for n in range(nk + 1, nk + 4):
        kvn = None if valid is None else valid[:, :n]
        got, new = poly_recurrent_attention(q[:, :, n - 1 : n], k[:, :, :n], v[:, :, :n], *args, kvn, sink, state)
        assert new is state
        assert _rel(got, poly_direct_attention(q[:, :, n - 1 : n], k[:, :, :n], v[:, :, :n], *args, kvn, sink)) < 1e-12
        if n == nk + 1:  # extended to the blocks a first call builds: the same state
            assert state.upto == built.upto
            for name in ("s", "kmax", "ksum", "vsum", "valid", "ksq", "kscale", "vscale"):
                assert torch.allclose(getattr(state, name), getattr(built, name), rtol=1e-12, atol=1e-12), name
    # a prefix state that ends inside a block is not handed over (a chunk_size that is no multiple of the block)
    assert from_prefill((final[0], 48), q, k, v, 0.5, c, band, None) is None
    assert from_prefill((final[0], 0), q, k, v, 0.5, c, band, None) is None


def test_recurrent_decode_state_is_guarded_like_the_chunk_path():
    """The state's features are sums in float32, so they cancel as the chunk path's do (degree 4, s q_a k_a = +-100):
    the direct form is exact there, the state is not, and the guard's rounding term for the state path sees it."""
    from hf_fastattn.ops.poly import path_roundoff, poly_recurrent_attention

    q, k, v, s = _cancelling(64, 2, 200.0)
    c = poly_coefficients(4)
    ref = naive_poly_attention(q.double(), k.double(), v.double(), s, c, 0)[:, :, -1:]
    direct = poly_direct_attention(q[:, :, -1:], k, v, s, c)
    out, _ = poly_recurrent_attention(q[:, :, -1:], k, v, s, c)
    assert _rel(direct.double(), ref) < 1e-4 and _rel(out.double(), ref) > 1.0
    assert path_roundoff(q[:, :, -1:], v, 4, 8, "auto") == 0.0
    u = path_roundoff(q[:, :, -1:], v, 4, 8, "auto", decode_state=True)
    assert u == 2.0**-24 and guard_stats(q[:, :, -1:], k, s, c, roundoff=u).worst > 0.05


def test_public_function_dispatch_and_errors():
    q, k, v = _qkv(1, 4, 2, 20, 20, 8)
    assert torch.allclose(poly_attention(q, k, v, 0.3, chunk=64), poly_attention(q, k, v, 0.3, chunk=4), atol=1e-12)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        poly_attention(q[:, :3], k, v, 0.3)
    with pytest.raises(ValueError, match="more queries"):
        poly_attention(q, k[:, :, :5], v[:, :, :5], 0.3)
    with pytest.raises(ValueError, match="above feature_cap = 50"):
        poly_attention(q, k, v, 0.3, feature_cap=50)
    with pytest.raises(ValueError, match="kernel must be"):
        poly_attention(q, k, v, 0.3, kernel="cuda")


@pytest.mark.parametrize("option, match", [
    (dict(chunk=-8), r"chunk must be an integer >= 1; got -8"),  # used to give all-zero rows silently
    (dict(chunk=0), r"chunk must be an integer >= 1"),
    (dict(chunk=4.5), r"chunk must be an integer >= 1; got 4.5"),
    (dict(band=-1), r"band must be an integer >= 0; got -1"),
    (dict(band=True), r"band must be an integer"),
    (dict(softcap=0.0), r"softcap must be None or a finite number > 0; got 0.0"),
    (dict(softcap=-30.0), r"softcap must be None or a finite number > 0"),
    (dict(kv_valid=torch.ones(20, dtype=torch.bool)), r"kv_valid must be a bool tensor \[B, Nk\] = \[1, 20\]"),
    (dict(kv_valid=torch.ones(1, 1, 20, dtype=torch.bool)), r"got \(1, 1, 20\)"),
    (dict(kv_valid=torch.ones(1, 20)), r"kv_valid must be bool .* got torch.float32"),
])
@pytest.mark.parametrize("nq", [20, 3])  # chunked and direct (decode) forms
def test_bad_options_raise(option, match, nq):
    q, k, v = _qkv(1, 4, 2, nq, 20, 8)
    with pytest.raises(ValueError, match=match):
        poly_attention(q, k, v, 0.3, **{"chunk": 4, **option})


# -------------------------------------------------------------------------------- overflow safety
@pytest.mark.parametrize("band", [0, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_in_the_hundreds_stay_finite(band, dtype):
    """Trained models reach |s q.k| in the hundreds; nothing may overflow, forward or backward."""
    q, k, v = _qkv(1, 2, 2, 200, 200, 32, std=6.0, dtype=torch.float32)  # |s q.k| up to ~300
    q[:, :, 100:] *= -1  # logits of both signs in the hundreds (the far-bound shift: the next test)
    q, k, v = (t.to(dtype).requires_grad_() for t in (q, k, v))
    ref = naive_poly_attention(q.double(), k.double(), v.double(), 32**-0.5, poly_coefficients(2), band)
    out = poly_chunk_attention(q, k, v, 32**-0.5, poly_coefficients(2), band, 32)
    out.float().square().sum().backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert (out.double() - ref).abs().max().item() < (1e-4 if dtype == torch.float32 else 2e-2)  # bf16 output rounding


def test_far_keys_next_to_very_negative_band():
    """The row shift m must cover the far part too: the last row's band logits are about -200 and its far logits
    small, so a shift by the band maximum alone makes exp(-m) = e^200 (inf, then NaN) in float32."""
    n, d, band = 64, 8, 8
    q, k, v = _qkv(1, 2, 2, n, n, d, std=0.1, dtype=torch.float32)
    q[..., 0] += 20.0
    k[:, :, n - band :, 0] -= 20.0  # s q.k ~ -200 on the last row's whole band; its far keys stay near 0
    coeffs = poly_coefficients(2)
    ref = naive_poly_attention(q.double(), k.double(), v.double(), 0.5, coeffs, band)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = poly_chunk_attention(q, k, v, 0.5, coeffs, band, 16)
    out.square().sum().backward()
    assert all(torch.isfinite(t).all() for t in (out, q.grad, k.grad, v.grad))
    assert (out.double() - ref).abs().max().item() < 1e-5
    last = poly_direct_attention(q[:, :, -3:].detach(), k.detach(), v.detach(), 0.5, coeffs, band)
    assert (last.double() - ref[:, :, -3:]).abs().max().item() < 1e-5


def test_large_logits_float64_exact_math():
    q, k, v = _qkv(1, 2, 2, 96, 96, 16, std=5.0)
    coeffs = poly_coefficients(2)
    ref = naive_poly_attention(q, k, v, 0.25, coeffs, 5)
    assert _rel(poly_chunk_attention(q, k, v, 0.25, coeffs, 5, 16), ref) < 1e-10


# ----------------------------------------------------------------------------------- RoPE fidelity
def _rope_tables(n, d, base=10000.0):
    inv = 1.0 / base ** (torch.arange(0, d, 2, dtype=F64) / d)
    ang = torch.arange(n, dtype=F64)[:, None] * inv[None]
    emb = torch.cat([ang, ang], -1)
    return emb.cos(), emb.sin(), inv


def _apply_rope(x, cos, sin):  # transformers' rotate_half layout
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos + rot * sin


def _rotation(inv, d):
    half = d // 2

    def rotation(offsets):  # R_delta with R_i^T R_j = R_{j - i}: a rotation by delta * theta per pair (a, a + d/2)
        ang = offsets[..., None].to(F64) * inv
        c, s = ang.cos(), ang.sin()
        r = torch.zeros(*offsets.shape, d, d, dtype=F64)
        idx = torch.arange(half)
        r[..., idx, idx] = c
        r[..., idx + half, idx + half] = c
        r[..., idx, idx + half] = -s
        r[..., idx + half, idx] = s
        return r

    return rotation


@pytest.mark.parametrize("band", [0, 6])
def test_rope_fidelity(band):
    """General RoPE form exp/P(q_i^T R_{j-i} k_j) on unrotated q, k == our path on rotated q, k."""
    n, d = 40, 16
    q, k, v = _qkv(1, 2, 1, n, n, d, std=0.5)
    cos, sin, inv = _rope_tables(n, d)
    coeffs, scale = poly_coefficients(2), d**-0.5
    ref = naive_rope_poly_attention(q, k, v, scale, coeffs, _rotation(inv, d), band)
    out = poly_chunk_attention(_apply_rope(q, cos, sin), _apply_rope(k, cos, sin), v, scale, coeffs, band, 8)
    assert _rel(out, ref) < 1e-10
    # with an infinite band the same reference is exact RoPE softmax attention
    exact_ref = naive_rope_poly_attention(q, k, v, scale, coeffs, _rotation(inv, d), n)
    exact = naive_attention(_apply_rope(q, cos, sin), _apply_rope(k, cos, sin), v, scale)
    assert _rel(exact, exact_ref) < 1e-10


# ------------------------------------------------------------------------------ memory structure
def test_no_tensor_grows_like_n_squared_or_n_r():
    """Forward + backward hold O(N D + C r) per head: no N^2 and no N * r intermediate."""
    n, d, chunk = 4096, 16, 64
    q, k, v = (t.float().requires_grad_() for t in _qkv(1, 2, 2, n, n, d, std=0.5))
    r = FeatureMap.get(d, 2).r
    with LargestTensor() as sizes:
        out = poly_chunk_attention(q, k, v, 0.25, poly_coefficients(2), 8, chunk)
        out.sum().backward()
    allowed = 2 * max(2 * chunk * r, 2 * n * (d + 1))
    assert sizes.largest <= allowed < min(n * n, 2 * n * r) / 4


# ---------------------------------------------------------------- error vs exact softmax: stated bounds
@pytest.mark.parametrize("sigma", [0.25, 0.5, 1.0])
def test_error_vs_exact_within_stated_bound(sigma):
    """Degree-2 Taylor, d = 64, random logits of rms sigma: relative output error <= 1.25 x the Gaussian-logit
    prediction R(sigma) (features.gaussian_output_error: 1.0 % / 7.0 % / 37.6 %), and degree 4 is tighter."""
    n, d = 1024, 64
    q, k, v = _qkv(1, 4, 4, n, n, d)
    scale = sigma / math.sqrt(d)
    ref = naive_attention(q, k, v, scale)
    coeffs = poly_coefficients(2)
    err2 = ((poly_chunk_attention(q, k, v, scale, coeffs) - ref).norm() / ref.norm()).item()
    predicted = gaussian_output_error(coeffs, sigma)
    assert err2 <= 1.25 * predicted
    assert err2 >= 0.5 * predicted  # the prediction is informative, not just loose
    d4 = 16  # degree 4 at d = 64 needs 814k features; the same logit law at d = 16
    q4, k4, v4 = _qkv(1, 4, 4, n, n, d4)
    ref4 = naive_attention(q4, k4, v4, sigma / math.sqrt(d4))
    err4 = ((poly_attention(q4, k4, v4, sigma / math.sqrt(d4), degree=4) - ref4).norm() / ref4.norm()).item()
    assert err4 < err2


def test_rowwise_error_theorem():
    """For every row: |o_P - o| <= 2E/(1 - E) max_j |v_j|, E = sum_j p_j |P(x_j) e^{-x_j} - 1| (p = softmax).
    A bound proved in features.gaussian_output_error's setting without any distributional assumption."""
    n, d = 256, 32
    q, k, v = _qkv(1, 2, 2, n, n, d)
    scale = 1.2 / math.sqrt(d)
    coeffs = poly_coefficients(2)
    x = scale * q @ k.transpose(-1, -2)
    mask = torch.ones(n, n, dtype=torch.bool).tril()
    p = torch.softmax(x.masked_fill(~mask, float("-inf")), -1)
    e = (p * (poly_eval(coeffs, x) * torch.exp(-x) - 1).abs()).sum(-1)
    bound = 2 * e / (1 - e) * v.norm(dim=-1).amax(-1, keepdim=True)
    err = (poly_chunk_attention(q, k, v, scale, coeffs, 0, 32) - p @ v).norm(dim=-1)
    ok = e < 1
    assert ok.float().mean() > 0.5
    assert (err[ok] <= bound[ok] + 1e-12).all()


def test_band_reduces_error_and_fit_helps_at_wide_logits():
    n, d, sigma = 512, 64, 1.0
    q, k, v = _qkv(1, 2, 2, n, n, d)
    scale = sigma / math.sqrt(d)
    ref = naive_attention(q, k, v, scale)

    def err(**kw):
        return ((poly_attention(q, k, v, scale, **kw) - ref).norm() / ref.norm()).item()

    assert err(band=64) < err(band=0)
    assert err(coeffs="fit", fit_range=1.0) < err()  # measured: 0.29 vs 0.31 at sigma = 1


def test_guard_statistics_per_head_with_gqa_and_padding():
    """The guard's per-head bound and rms logit equal a direct computation: query head i reads KV head i // G, and
    padded slots (keys and query rows, here filled with values 50x too large) count for neither: the queries are the
    last Nq positions, so kv_valid[:, -Nq:] marks the real rows."""
    b, h, hkv, n, d, s = 2, 4, 2, 30, 8, 0.3
    q, k, _ = _qkv(b, h, hkv, n, n, d)
    k[:, 1] *= 3.0  # KV heads differ, so a wrong head grouping shows
    valid = _padding(b, n)
    k[~valid[:, None, :].expand(b, hkv, n)] *= 50.0
    q[~valid[:, None, :].expand(b, h, n)] *= 50.0
    st = guard_stats(q, k, s, poly_coefficients(2), valid)
    for head in range(h):
        bounds, sigmas = [], []
        for i in range(b):
            kh, qh = k[i, head // (h // hkv)][valid[i]], q[i, head][valid[i]]
            bounds.append(s * qh.norm(dim=-1).max() * kh.norm(dim=-1).max())
            sigmas.append(s * ((qh.T @ qh / len(qh)) * (kh.T @ kh / len(kh))).sum().sqrt())  # sqrt(tr(Mq Mk))
        assert st.bound[head] == pytest.approx(max(bounds).item(), rel=1e-5)
        assert st.sigma[head] == pytest.approx(max(sigmas).item(), rel=1e-5)


def _cancelling(n, d, logit_scale, noise=1e-3):
    """Heads whose logits are small while every coordinate product is large: q ~ a (1, 1, ...), k ~ a (1, -1, ...)
    (an outlier-dimension pattern), so the feature expansion cancels terms of size (s a^2 d)^t to leave P(x) ~ 1."""
    sign = torch.tensor([1.0, -1.0]).repeat(d // 2)
    q = torch.ones(1, 1, n, d) + noise * torch.randn(1, 1, n, d)
    k = sign.repeat(1, 1, n, 1) + noise * torch.randn(1, 1, n, d)
    return q, k, torch.randn(1, 1, n, 4), logit_scale / d


@pytest.mark.parametrize("nq", [1, 3])
def test_guard_decode_rows_from_logits_equal_key_moments(nq):
    """A few query rows (G Nq < D) take tr(Mq Mk) from their logits instead of the D x D key moments: the same
    statistics (padding and GQA included), without the O(Nk D^2) pass at every decoded token."""
    from hf_fastattn.ops.poly.guard import key_moments

    q, k, _ = _qkv(2, 4, 2, nq, 50, 16, dtype=torch.float32)
    valid = _padding(2, 50)
    c = poly_coefficients(2)
    fast, ref = guard_stats(q, k, 0.3, c, valid, 2**-24), guard_stats(q, k, 0.3, c, valid, 2**-24, key_moments(k, valid))
    for a, b in ((fast.sigma, ref.sigma), (fast.bound, ref.bound), (fast.predicted, ref.predicted)):
        assert a == pytest.approx(b, rel=1e-5)
    assert min(fast.sigma) > 0.1


def test_guard_predicts_float_rounding_of_cancelling_features():
    """Degree 4, float32 torch path, logits |x| < 1 but s q_a k_a = +-100: the expansion's terms (~7e7 per key)
    cancel to P ~ 1, and rounding leaves nothing of the denominator: the measured output is many times |v|. The
    Gaussian-logit model alone predicts a tiny error; the rounding term (u abs_poly(B), u = 2^-24 on this path)
    flags the head. On random heads of the same size the rounding term changes nothing."""
    from hf_fastattn.ops.poly import path_roundoff
    from hf_fastattn.ops.poly.guard import ROUNDING_TYPICAL

    q, k, v, s = _cancelling(64, 2, 200.0)
    c = poly_coefficients(4)
    x = s * (q.double() @ k.double().transpose(-1, -2))
    assert x.abs().max() < 1.0
    ref = naive_poly_attention(q.double(), k.double(), v.double(), s, c, 0)
    out = poly_attention(q, k, v, s, degree=4, chunk=8, kernel="torch")
    measured = ((out.double() - ref).abs().max() / ref.abs().max()).item()
    assert measured > 1.0  # the failure the rounding term exists for

    u = path_roundoff(q, v, 4, 8, "torch")
    assert u == 2.0**-24
    plain, rounded = guard_stats(q, k, s, c), guard_stats(q, k, s, c, roundoff=u)
    assert plain.worst < 1e-3  # the logit model cannot see it
    assert rounded.worst > 0.05 and rounded.rounding[0] > 1.0
    assert "float rounding bound" in rounded.describe([0])

    # moderate cancellation: predicted within 10x of the measured error (the bound / ROUNDING_TYPICAL calibration)
    q, k, v, s = _cancelling(64, 16, 100.0, noise=1e-2)
    ref = naive_poly_attention(q.double(), k.double(), v.double(), s, c, 0)
    out = poly_attention(q, k, v, s, degree=4, chunk=16, kernel="torch")
    measured = ((out.double() - ref).abs().max() / ref.abs().max()).item()
    predicted = guard_stats(q, k, s, c, roundoff=u).worst
    assert measured / 10 < predicted < measured * 10, (measured, predicted)

    q, k, v = _qkv(1, 2, 2, 64, 64, 16, dtype=torch.float32)
    for degree in (2, 4):
        c = poly_coefficients(degree)
        a, b = guard_stats(q, k, 0.125, c), guard_stats(q, k, 0.125, c, roundoff=u)
        assert a.predicted == b.predicted and max(b.rounding) * ROUNDING_TYPICAL < 1e-5


def test_path_roundoff_follows_the_dispatch(monkeypatch):
    """The guard's unit roundoff is that of the path poly_attention takes: none for the direct form (Nq <= chunk),
    the accumulation dtype on the torch path, bf16 states for 16-bit Triton, TF32 dots for float32 Triton on a GPU."""
    from hf_fastattn.ops import poly as poly_mod

    q, _, v = _qkv(1, 2, 2, 40, 40, 8, dtype=torch.float32)
    assert poly_mod.path_roundoff(q, v, 2, 64, "auto") == 0.0
    assert poly_mod.path_roundoff(q, v, 2, 16, "torch") == 2.0**-24
    assert poly_mod.path_roundoff(q.double(), v.double(), 2, 16, "torch") == 2.0**-53
    assert poly_mod.path_roundoff(q.bfloat16(), v.bfloat16(), 2, 16, "torch") == 2.0**-24  # features in float32
    assert poly_mod.path_roundoff(q.bfloat16(), v.bfloat16(), 2, 16, "triton") == 2.0**-9
    assert poly_mod.path_roundoff(q, v, 2, 16, "triton") == 2.0**-24  # CPU (interpreter): float32 dots
    monkeypatch.setattr(poly_mod, "auto_uses_triton", lambda *args: True)  # as if on CUDA
    assert poly_mod.path_roundoff(q.half(), v.half(), 2, 16, "auto") == 2.0**-9


# ------------------------------------------------------------------------------- boundaries (mutation audit)
def test_fit_that_goes_negative_is_rejected(monkeypatch):
    """poly_coefficients refuses a fit whose minimum on the real line is <= 0 (the softmax normaliser could vanish).
    The fits that do go negative are ill-conditioned ones (degree 6 on [-16, 16] here, LAPACK-dependent), so the
    minimum is patched: a fit whose minimum is exactly 0 must raise."""
    from hf_fastattn.ops.poly import features

    monkeypatch.setattr(features, "poly_minimum", lambda coeffs: 0.0)
    with pytest.raises(ValueError, match="is not positive on the real line"):
        features.poly_coefficients(2, "fit", 1.2345)  # arguments no other test uses (the function is cached)


def test_feature_cap_is_inclusive():
    """feature_cap is the largest allowed r: r == cap is accepted, cap = r - 1 raises."""
    r = feature_count(12, 2)
    assert check_feature_count(12, 2, r) == r
    with pytest.raises(ValueError, match="above feature_cap"):
        check_feature_count(12, 2, r - 1)


def test_row_whose_only_far_key_is_slot_zero():
    """has_far_key at its boundary: the row at slot `band` has exactly one far key, slot 0. Its band logits are
    about -200, so its shift must still cover that far key (a shift by the band maximum makes exp(-m) = e^200,
    inf in float32), in the chunked and in the direct path. (1e-4: float32 logits near -200 round by ~1e-5.)"""
    n, d, band = 32, 8, 8
    q, k, v = _qkv(1, 2, 2, n, n, d, std=0.1, dtype=torch.float32)
    q[:, :, band, 0] += 20.0
    k[:, :, 1 : band + 1, 0] -= 20.0  # s q.k ~ -200 on the whole band of row `band`; slot 0 stays near 0
    coeffs = poly_coefficients(2)
    ref = naive_poly_attention(q.double(), k.double(), v.double(), 0.5, coeffs, band)
    out = poly_chunk_attention(q, k, v, 0.5, coeffs, band, 8)
    assert torch.isfinite(out).all() and (out.double() - ref).abs().max().item() < 1e-4
    row = poly_direct_attention(q[:, :, band : band + 1], k[:, :, : band + 1], v[:, :, : band + 1], 0.5, coeffs, band)
    assert torch.isfinite(row).all() and (row.double() - ref[:, :, band : band + 1]).abs().max().item() < 1e-4


def test_rows_without_far_keys_shift_by_their_band():
    """Rows that see no far key (here: a band covering every key) are plain softmax rows: their shift is the band
    maximum, not the far bound. With every logit near -200 a shift by the far bound (>= 0) would underflow every
    float32 weight to 0 and return 0 rows. (1e-4: float32 logits near -200 round by ~1e-5.)"""
    n, d = 24, 8
    q, k, v = _qkv(1, 2, 2, n, n, d, std=0.1, dtype=torch.float32)
    q[..., 0] += 20.0
    k[..., 0] -= 20.0  # s q.k ~ -200 everywhere
    coeffs = poly_coefficients(2)
    ref = naive_attention(q.double(), k.double(), v.double(), 0.5)
    out = poly_chunk_attention(q, k, v, 0.5, coeffs, n, 8)
    assert (out.double() - ref).abs().max().item() < 1e-4
    last = poly_direct_attention(q[:, :, -3:], k, v, 0.5, coeffs, n)
    assert (last.double() - ref[:, :, -3:]).abs().max().item() < 1e-4


@pytest.mark.parametrize("form", ["chunk", "direct"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_without_far_keys_below_float32_exp_range(form, dtype):
    """A row that sees no far key is shifted by its band maximum, here -200 (the first real token of a left-padded
    row, its only key itself): e^{-m} overflows float32, and its far terms, all 0, must stay 0 rather than inf * 0.
    The chunk form has a far state of padding behind that row; the direct form (every sequence <= chunk_size)
    has a masked far branch that autograd differentiates. Forward and gradients against the float64 reference."""
    n, d, band = 32, 8, 4
    q, k, v = _qkv(2, 2, 1, n, n, d, std=0.3, dtype=torch.float32)
    valid = torch.ones(2, n, dtype=torch.bool)
    valid[0, :16] = False  # row 0: left padding, first real token at slot 16; row 1: its first token at slot 0
    for b, t in ((0, 16), (1, 0)):
        q[b, :, t, 0], k[b, :, t, 0] = 20.0, -20.0  # self logit -200: the token's whole band
    q64, k64, v64 = (x.double().requires_grad_() for x in (q, k, v))
    ref = naive_poly_attention(q64, k64, v64, 0.5, poly_coefficients(2), band, None, valid)
    q, k, v = (x.to(dtype).requires_grad_() for x in (q, k, v))
    chunk = 8 if form == "chunk" else 64  # Nq <= chunk: poly_attention takes the direct form
    out = poly_attention(q, k, v, 0.5, band=band, chunk=chunk, kv_valid=valid, kernel="torch")
    do = torch.randn_like(ref)
    grads = torch.autograd.grad(out, (q, k, v), do.to(dtype))
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), do)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert (out.double() - ref).abs().max().item() < tol * ref.abs().max().item()
    for a, b in zip(grads, ref_grads):
        assert torch.isfinite(a).all()
        assert (a.double() - b).abs().max().item() < tol * b.abs().max().item()


def test_guard_prediction_edges():
    """predicted_error at its edges: NaN statistics (an overflowed head) predict an infinite error, so the guard
    flags the head instead of passing it (NaN > tolerance is False); a zero rms logit (all-zero queries) predicts
    the table's smallest error instead of failing in log(0); `worst` is the largest per-head prediction (the
    number the guard's message leads with)."""
    from hf_fastattn.ops.poly.guard import GuardStats, predicted_error

    coeffs = tuple(poly_coefficients(2))
    assert predicted_error(coeffs, math.nan) == math.inf and predicted_error(coeffs, math.inf) == math.inf
    tiny = predicted_error(coeffs, 0.0)
    assert 0 <= tiny <= gaussian_output_error(coeffs, 1e-3) * 1.001 and tiny == predicted_error(coeffs, 1e-6)
    assert predicted_error(coeffs, 0.5) == pytest.approx(gaussian_output_error(coeffs, 0.5), rel=1e-2)
    st = GuardStats(bound=[1.0, 2.0, 3.0e4], sigma=[0.1, 0.9, 0.2], predicted=[0.01, 0.3, 0.02], coeffs=coeffs)
    assert st.worst == 0.3
    assert st.worst_weight_error[:2] == [weight_error(coeffs, 1.0), weight_error(coeffs, 2.0)]
    assert st.worst_weight_error[2] == math.inf


def test_auto_kernel_dispatch(monkeypatch):
    """kernel="auto": Triton for degree 2, D <= 128 (128 included: the measured H100 shape), 16/32-bit CUDA
    tensors, at the kernels' own chunk (_TRITON_CHUNK, whatever `chunk` says); a kernel failure warns once, falls
    back to the torch path (same function) and is not retried. The kernels are replaced by a recorder here."""
    from hf_fastattn.ops import poly as poly_mod

    pytest.importorskip("triton")
    from hf_fastattn.ops.poly import triton as poly_triton

    monkeypatch.setattr(poly_mod, "_TRITON_FAILED", [])
    uses = poly_mod.auto_uses_triton
    assert uses(True, 2, 128, torch.bfloat16) and uses(True, 2, 64, torch.float32) and uses(True, 2, 16, torch.float16)
    assert not uses(True, 2, 129, torch.bfloat16) and not uses(True, 2, 64, torch.float64)
    assert not uses(True, 4, 64, torch.bfloat16) and not uses(False, 2, 64, torch.bfloat16)
    assert uses(True, 2, 64, torch.float32, 128) and not uses(True, 2, 64, torch.float32, 192)  # V's width counts

    calls = []

    def fake(q, k, v, scale, c, band, chunk, *args, **kwargs):
        calls.append(chunk)
        raise RuntimeError("no kernel")

    monkeypatch.setattr(poly_triton, "poly_triton_attention", fake)
    monkeypatch.setattr(poly_mod, "auto_uses_triton", lambda is_cuda, *rest: uses(True, *rest))  # as if on CUDA
    q, k, v = _qkv(1, 2, 2, 40, 40, 8, dtype=torch.float32)
    with pytest.warns(RuntimeWarning, match="poly Triton kernels failed"):
        out = poly_attention(q, k, v, 0.3, chunk=16, band=3)
    assert calls == [poly_mod._TRITON_CHUNK]
    assert torch.allclose(out, poly_attention(q, k, v, 0.3, chunk=16, band=3, kernel="torch"), atol=1e-6)
    assert calls == [poly_mod._TRITON_CHUNK]  # not retried

    # The kernels refusing one call's arguments (a ValueError) is not a kernel failure: later calls still try them.
    monkeypatch.setattr(poly_mod, "_TRITON_FAILED", [])
    calls.clear()

    def refuse(q, k, v, scale, c, band, chunk, *args, **kwargs):
        calls.append(chunk)
        raise ValueError("not these arguments")

    monkeypatch.setattr(poly_triton, "poly_triton_attention", refuse)
    for _ in range(2):
        with pytest.warns(RuntimeWarning, match="not these arguments"):
            poly_attention(q, k, v, 0.3, chunk=16, band=3)
    assert len(calls) == 2 and poly_mod._TRITON_FAILED == []
