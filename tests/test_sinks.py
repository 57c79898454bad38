"""Attention sinks (GPT-OSS's s_aux) in every op that supports them, against the dense float64 reference, and the
backend's refusals: keywords and mask parts that change the attention function but that fastattn does not
implement raise instead of being dropped (chunks are kept: tests/test_blocks.py)."""

import os
import types

import pytest
import torch

import hf_fastattn
from hf_fastattn import backend
from hf_fastattn.ops.exact import exact_attention, naive_attention
from hf_fastattn.ops.poly import naive_poly_attention, poly_attention, poly_coefficients
from hf_fastattn.ops.sinks import check_sinks
from hf_fastattn.testing import model_pair, tiny_config

C2 = poly_coefficients(2)


def _inputs(b=2, h=4, hkv=2, nq=29, nk=37, d=8, std=0.5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, nq, d, generator=g, dtype=dtype) * std
    k = torch.randn(b, hkv, nk, d, generator=g, dtype=dtype) * std
    v = torch.randn(b, hkv, nk, d, generator=g, dtype=dtype)
    # a sink far below, near, and far above the logits (the last takes almost all of its rows' weight)
    sinks = torch.tensor([-30.0, 0.7, -1.5, 25.0], dtype=dtype)[:h] + 0.1 * torch.randn(h, generator=g, dtype=dtype)
    valid = torch.ones(b, nk, dtype=torch.bool)
    valid[0, : nk - nq + 4] = False  # batch 0: the first 4 query rows see no key at all
    valid[-1, 3:7] = False
    return q, k, v, sinks, valid


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _sink_matters(out, q, k, v, scale, valid, reference):
    """The sinks move the output by O(1): a test that drops them fails."""
    assert _rel(reference(q, k, v, scale, valid), out) > 0.1


@pytest.mark.parametrize("window, softcap, block", [(None, None, 0), (None, None, 16), (5, None, 0), (None, 2.0, 8)])
@pytest.mark.parametrize("decode", [False, True])
def test_exact_sinks_match_naive(window, softcap, block, decode):
    q, k, v, sinks, valid = _inputs()
    if decode:
        q = q[:, :, -2:]
    out = exact_attention(q, k, v, 0.4, True, window, softcap, valid, block, sinks)
    ref = naive_attention(q, k, v, 0.4, True, window, softcap, valid, sinks)
    assert _rel(out, ref) < 1e-12
    _sink_matters(out, q, k, v, 0.4, valid, lambda *a: naive_attention(*a[:4], True, window, softcap, a[4]))
    if not decode:
        assert out[0, :, :4].abs().max() == 0  # rows that see no key: all weight on the sink, output 0


@pytest.mark.parametrize("band, softcap, chunk", [(0, None, 8), (3, None, 8), (6, 2.0, 16)])
def test_poly_sinks_match_naive(band, softcap, chunk):
    q, k, v, sinks, valid = _inputs()
    ref = naive_poly_attention(q, k, v, 0.4, C2, band, softcap, valid, sinks)
    out = poly_attention(q, k, v, 0.4, band=band, chunk=chunk, softcap=softcap, kv_valid=valid, kernel="torch",
                         sinks=sinks)
    assert _rel(out, ref) < 1e-12
    decode = poly_attention(q[:, :, -3:], k, v, 0.4, band=band, chunk=chunk, softcap=softcap, kv_valid=valid,
                            sinks=sinks)  # Nq <= chunk: the direct form
    assert _rel(decode, ref[:, :, -3:]) < 1e-12
    _sink_matters(out, q, k, v, 0.4, valid, lambda *a: naive_poly_attention(*a[:4], C2, band, softcap, a[4]))


# std 8: logits in the tens, rows below the FFT's error floor are recomputed directly (with the sink too), and the
# rows left to the FFT carry its absolute error, bounded by 1/RELIABLE of their denominator (ops/conv/fft.py)
@pytest.mark.parametrize("k_bases, std, tol", [(4, 0.5, 1e-10), (3, 8.0, 1e-4)])
def test_conv_sinks_match_naive(k_bases, std, tol):
    """The FFT path and decode against the dense conv reference on the same basis."""
    from hf_fastattn.ops.conv import conv_attention, conv_decode, naive_conv_attention

    q, k, v, sinks, _ = _inputs(nq=37, nk=37, std=std)
    valid = torch.ones(2, 37, dtype=torch.bool)
    valid[0, :5] = False
    out, state = conv_attention(q, k, v, 0.4, k_bases=k_bases, kv_valid=valid, return_state=True, sinks=sinks)
    if std > 1:
        assert state.direct_rows > 0
    # the reference on the compacted sequence of each row (the op drops padded slots before the Toeplitz fit)
    for b in range(2):
        keep = valid[b]
        ref = naive_conv_attention(v[b : b + 1, :, keep], state.starts[b : b + 1], state.cum[b : b + 1, ..., : int(keep.sum())],
                                   4, sinks=sinks)
        assert _rel(out[b : b + 1, :, keep], ref) < tol
    # decode extends the prefill's basis to the new rows (test_ops_conv.py), sinks included
    _, state = conv_attention(q[:, :, :-2], k[:, :, :-2], v[:, :, :-2], 0.4, k_bases=k_bases, kv_valid=valid[:, :-2],
                              return_state=True, sinks=sinks)
    last, state = conv_decode(q[:, :, -2:], k, v, 0.4, state, kv_valid=valid, sinks=sinks)
    for b in range(2):
        keep = valid[b]
        ref = naive_conv_attention(v[b : b + 1, :, keep], state.starts[b : b + 1], state.cum[b : b + 1, ..., : int(keep.sum())],
                                   4, sinks=sinks)
        assert _rel(last[b : b + 1], ref[:, :, -2:]) < tol
    exact = conv_attention(q, k, v, 0.4, k_bases=37, kv_valid=valid, sinks=sinks)  # a basis per column: exact
    assert _rel(exact[:, :, 5:], naive_attention(q, k, v, 0.4, kv_valid=valid, sinks=sinks)[:, :, 5:]) < tol


def test_sink_gradcheck():
    q, k, v, sinks, valid = _inputs(b=1, h=2, hkv=1, nq=11, nk=13, d=4)
    sinks = torch.tensor([0.3, -0.8], dtype=torch.float64)  # both O(1): every gradient term is exercised
    args = [t.requires_grad_() for t in (q, k, v, sinks)]
    assert torch.autograd.gradcheck(lambda q, k, v, s: exact_attention(q, k, v, 0.5, True, 4, None, valid, 4, s), args)
    assert torch.autograd.gradcheck(
        lambda q, k, v, s: poly_attention(q, k, v, 0.5, band=2, chunk=4, kv_valid=valid, kernel="torch", sinks=s), args)
    assert torch.autograd.gradcheck(  # the direct (decode) form
        lambda q, k, v, s: poly_attention(q[:, :, -3:], k, v, 0.5, band=2, chunk=4, kv_valid=valid, sinks=s), args)
    from hf_fastattn.ops.conv import conv_attention

    q2, k2, v2, s2 = (t.detach().clone().requires_grad_() for t in (q[:, :, -11:], k[:, :, -11:], v[:, :, -11:], sinks))
    assert torch.autograd.gradcheck(lambda q, k, v, s: conv_attention(q, k, v, 0.5, k_bases=3, sinks=s), (q2, k2, v2, s2))


def test_sink_of_minus_infinity_is_no_sink():
    """A head whose sink is -inf (switched off) equals the same head without sinks, also on rows that see no key
    (left padding), where exp(sink - m) would be exp(-inf + inf); forward and gradients finite and equal."""
    q, k, v, _, valid = _inputs(dtype=torch.float32)
    valid[0, :16] = False  # rows 0..7 of batch 0 (key slots 8..15) see no key
    sinks = torch.tensor([float("-inf"), 0.5, float("-inf"), -1.0], requires_grad=True)
    q.requires_grad_()
    for run in (lambda s: exact_attention(q, k, v, 0.5, kv_valid=valid, block=16, sinks=s),
                lambda s: poly_attention(q, k, v, 0.5, band=4, chunk=8, kv_valid=valid, kernel="torch", sinks=s),
                lambda s: poly_attention(q[:, :, :6], k[:, :, :14], v[:, :, :14], 0.5, band=4, chunk=8,
                                         kv_valid=valid[:, :14], sinks=s)):
        out, plain = run(sinks), run(None)
        grads = torch.autograd.grad(out.square().sum(), (q, sinks))
        assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
        assert torch.equal(out[:, ::2], plain[:, ::2]) and (out[:, 1::2] - plain[:, 1::2]).abs().max() > 1e-3
        assert torch.equal(grads[1][::2], torch.zeros(2))


@pytest.mark.parametrize("scale", [40.0, 400.0])
def test_sinks_with_logits_in_the_hundreds(scale):
    """Sinks far above or below logits of hundreds: no overflow in either direction, forward or backward, in the
    chunked and the direct (decode) form; gradients against the float64 reference's."""
    q, k, v, _, valid = _inputs(dtype=torch.float32)
    sinks = torch.tensor([-500.0, 300.0, 0.0, 80.0], requires_grad=True)
    q.requires_grad_()
    q64, s64 = q.detach().double().requires_grad_(), sinks.detach().double().requires_grad_()
    k64, v64 = k.double(), v.double()
    for out, ref in [
        (exact_attention(q, k, v, scale, kv_valid=valid, block=16, sinks=sinks),
         naive_attention(q64, k64, v64, scale, kv_valid=valid, sinks=s64)),
        (poly_attention(q, k, v, scale, band=8, chunk=8, kv_valid=valid, kernel="torch", sinks=sinks),
         naive_poly_attention(q64, k64, v64, scale, C2, 8, None, valid, s64)),
        (poly_attention(q[:, :, -3:], k, v, scale, band=8, chunk=8, kv_valid=valid, sinks=sinks),  # direct form
         naive_poly_attention(q64[:, :, -3:], k64, v64, scale, C2, 8, None, valid, s64)),
    ]:
        assert _rel(out.double(), ref) < 1e-4
        grads = torch.autograd.grad(out.square().sum(), (q, sinks))
        ref_grads = torch.autograd.grad(ref.square().sum(), (q64, s64))
        # dq: float32 logits of hundreds round by ~1e-5, which saturated rows' small dq feel: a row whose dq is a
        # cancellation of terms ~1e5 times larger is off by 10-60 % in every form (chunk and direct alike), 2.3 % of
        # the largest dq for the direct form at scale 40 (torch 2.13 CPU); a dropped sink or far term is O(1)
        for g, r, tol in zip(grads, ref_grads, (5e-2, 1e-4)):
            assert torch.isfinite(g).all() and (g.double() - r).abs().max() <= tol * r.abs().max()


@pytest.mark.parametrize("device, tol", [
    pytest.param("cpu", 1e-5, marks=pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                                       reason="CPU tensors need TRITON_INTERPRET=1")),
    pytest.param("cuda", 5e-3, marks=pytest.mark.gpu),  # fp32 tl.dot runs on TF32 tensor cores
])
def test_triton_sinks_match_naive(device, tol):
    pytest.importorskip("triton")
    from hf_fastattn.ops.poly.triton import poly_triton_attention

    q, k, v, sinks, valid = (t.to(device, torch.float32 if t.is_floating_point() else t.dtype)
                             for t in _inputs(nq=35, nk=50, d=16))
    q, k, v, sinks = (t.requires_grad_() for t in (q, k, v, sinks))
    out = poly_triton_attention(q, k, v, 0.3, C2, 5, 16, 2.0, valid, tile=8, segment=32, rows_per_block=2,
                                sinks=sinks)
    ref = naive_poly_attention(*(t.double() for t in (q, k, v)), 0.3, C2, 5, 2.0, valid, sinks.double())
    assert _rel(out.double(), ref) < tol
    do = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, (q, k, v, sinks), do.float()),
                    torch.autograd.grad(ref, (q, k, v, sinks), do)):
        assert _rel(a.double(), b) < tol


def test_check_sinks_shape():
    assert check_sinks(None, 4) is None
    with pytest.raises(ValueError, match=r"one logit per query head, shape \[4\]"):
        check_sinks(torch.zeros(2), 4)
    with pytest.raises(ValueError, match=r"shape \[4\]"):
        exact_attention(*_inputs()[:3], 0.5, sinks=torch.zeros(1, 4, 1, 1))


# ------------------------------------------------------------------------------------------- backend
def _module(h=4, hkv=2):
    cfg = types.SimpleNamespace(fastattn_config={"method": "exact"})
    return types.SimpleNamespace(config=cfg, layer_idx=0, is_causal=True, head_dim=8, num_key_value_groups=h // hkv)


def test_backend_plan_splits_sinks_by_head():
    """A mixed plan runs each head group with its own heads' sinks."""
    q, k, v, sinks = (t.float() for t in _inputs(nq=29, nk=29)[:4])
    module = _module()
    module.config.fastattn_config = {"plan": {"settings": {"e": {"method": "exact"},
                                                           "p": {"method": "poly", "guard": "off", "chunk_size": 8}},
                                              "layers": {"0": ["p", "e", "e", "p"]}}}
    out, _ = backend.fastattn_attention_forward(module, q, k, v, None, scaling=0.4, s_aux=sinks)
    out = out.transpose(1, 2)
    exact = naive_attention(q, k, v, 0.4, sinks=sinks)
    poly = naive_poly_attention(q, k, v, 0.4, C2, sinks=sinks)
    assert _rel(out[:, 1:3], exact[:, 1:3]) < 1e-5
    assert _rel(out[:, [0, 3]], poly[:, [0, 3]]) < 1e-5


@pytest.mark.parametrize("name, value, message", [
    ("position_bias", torch.zeros(1, 4, 5, 5), "additive position bias"),
    ("sinks", torch.zeros(1, 4, 5, 1), "per-token attention sinks"),
    ("indices", torch.zeros(1, 5, 2, dtype=torch.long), "sparse attention"),
    ("is_causal", False, "causal"),
])
def test_backend_refuses_what_it_does_not_implement(name, value, message):
    q, k, v = (torch.randn(1, h, 5, 8) for h in (4, 2, 2))
    with pytest.raises(ValueError, match=message):
        backend.fastattn_attention_forward(_module(), q, k, v, None, scaling=0.3, **{name: value})
    backend.fastattn_attention_forward(_module(), q, k, v, None, scaling=0.3, **{name: None})  # absent: fine


def test_mask_parts():
    """The compact mask keeps causal order, windows, chunks, padding and packing; anything else in transformers'
    composed mask function is refused by name."""
    mu = pytest.importorskip("transformers.masking_utils")
    kept = [mu.causal_mask_function, mu.sliding_window_causal_mask_function(4),
            mu.and_masks(mu.causal_mask_function, mu.padding_mask_function(torch.ones(1, 6, dtype=torch.bool))),
            mu.chunked_causal_mask_function(8, torch.zeros(1, dtype=torch.long))]  # 6 tokens: one chunk
    for fn in kept:
        assert set(backend.mask_parts(fn)) <= backend._MASK_PARTS_KEPT
        out = backend.fastattn_mask(1, 6, 6, mask_function=fn)
        if fn is kept[1]:  # the window travels on an all-True tensor that stands for "no padding"
            assert out.all() and out.shape == (1, 1, 1, 6) and out._fastattn_window == 4 and out._fastattn_full
        else:
            assert out is None

    def image_blocks(batch_idx, head_idx, q_idx, kv_idx):
        return q_idx // 3 == kv_idx // 3

    with pytest.raises(ValueError, match="image_blocks"):
        backend.fastattn_mask(1, 6, 6, mask_function=mu.or_masks(mu.causal_mask_function, image_blocks))
    blockwise = mu.or_masks(mu.causal_mask_function, mu.blockwise_overlay(torch.zeros(1, 6, dtype=torch.long)))
    with pytest.raises(ValueError, match="block-bidirectional attention"):
        backend.fastattn_mask(1, 6, 6, mask_function=blockwise)


def test_gpt_oss_poly_with_sinks_trains():
    """GPT-OSS through poly (full layers) and exact (sliding layers), all with sinks: a backward reaches every
    sink, and with small logits the output is close to eager (the sinks are part of the approximated function)."""
    ref, new = model_pair(tiny_config("gpt_oss"))
    hf_fastattn.configure(new, method="poly", guard="off", chunk_size=8)
    from hf_fastattn.testing import shrink_logits

    shrink_logits(ref, 0.3)
    shrink_logits(new, 0.3)
    ids = torch.randint(3, 97, (2, 40), generator=torch.Generator().manual_seed(0))
    a, b = ref(ids).logits, new(ids).logits
    assert _rel(b, a) < 0.02
    b.square().mean().backward()
    sinks = [p.grad for n, p in new.named_parameters() if n.endswith("sinks")]
    assert len(sinks) == 2 and all(g is not None and g.abs().max() > 0 for g in sinks)


def test_diagnose_model_with_sinks():
    """Diagnostics measure against exact attention with the sinks: settings that are exact by construction (a band,
    or a conv basis per column, covering the sequence) have error ~0 only if both sides carry them."""
    from hf_fastattn.diagnostics import diagnose

    _, model = model_pair(tiny_config("gpt_oss"))
    ids = torch.randint(3, 97, (2, 48), generator=torch.Generator().manual_seed(0))
    settings = {"band": {"method": "poly", "local_window": 256}, "conv-all": {"method": "conv", "conv_k": 256},
                "poly": {"method": "poly"}, "conv": {"method": "conv", "conv_k": 4}}
    report = diagnose(model, ids, settings, depth_settings=["conv"], progress=False)
    full = [h for h in report.heads if not h.sliding]
    assert full and all(h.errors["band"] < 1e-5 and h.errors["conv-all"] < 1e-5 for h in full)
    assert all(h.errors["poly"] > 1e-3 and h.errors["conv"] > 1e-3 for h in full)
    assert set(report.depth) == {"conv"}
