"""ops.exact: the chunked O(N)-memory exact attention against the dense reference (float64) and gradcheck."""

import pytest
import torch

from hf_fastattn.ops.exact import exact_attention, naive_attention

CASES = [
    pytest.param(1, 2, 2, 63, 63, 16, None, None, False, id="B1-H2-T63-D16"),
    pytest.param(2, 4, 2, 100, 100, 60, None, None, True, id="B2-H4-Hkv2-T100-D60-pad"),
    pytest.param(2, 6, 2, 37, 129, 32, None, None, True, id="B2-H6-Hkv2-Tq37-Tk129-pad"),
    pytest.param(1, 4, 1, 1, 77, 32, None, None, False, id="decode-MQA"),
    pytest.param(2, 4, 2, 90, 90, 16, 9, None, True, id="window9-pad"),
    pytest.param(1, 2, 2, 20, 70, 16, 13, None, False, id="window13-Tq20-Tk70"),
    pytest.param(2, 4, 4, 50, 50, 24, None, 2.0, True, id="softcap2-pad"),
    pytest.param(1, 4, 2, 64, 64, 16, None, 2.0, False, id="softcap2-nopad"),  # not a fused-SDPA call
    pytest.param(1, 4, 2, 33, 65, 16, 7, 1.5, True, id="all-at-once"),
]


def _inputs(b, h, hkv, nq, nk, d, pad, dtype=torch.float64, logit_std=1.0):
    q = torch.randn(b, h, nq, d, dtype=dtype) * logit_std ** 0.5
    k = torch.randn(b, hkv, nk, d, dtype=dtype) * logit_std ** 0.5
    v = torch.randn(b, hkv, nk, d, dtype=dtype)
    valid = None
    if pad:
        valid = torch.ones(b, nk, dtype=torch.bool)
        valid[0, : nk // 5] = False  # left padding
        valid[-1, -3:] = False  # right padding
    return q, k, v, valid


@pytest.mark.parametrize("b, h, hkv, nq, nk, d, window, softcap, pad", CASES)
@pytest.mark.parametrize("block", [0, 16])
def test_exact_matches_naive(b, h, hkv, nq, nk, d, window, softcap, pad, block):
    q, k, v, valid = _inputs(b, h, hkv, nq, nk, d, pad)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    scale = d**-0.5
    ref = naive_attention(q, k, v, scale, True, window, softcap, valid)
    out = exact_attention(q, k, v, scale, True, window, softcap, valid, block=block)
    assert (out - ref).abs().max().item() < 1e-12
    do = torch.randn_like(out)
    g_ref = torch.autograd.grad(ref, (q, k, v), do)
    g_out = torch.autograd.grad(out, (q, k, v), do)
    for a, b_ in zip(g_ref, g_out):
        assert (a - b_).abs().max().item() < 1e-12


@pytest.mark.parametrize("window, softcap, pad", [(None, None, False), (5, None, True), (None, 1.0, True)])
def test_exact_gradcheck(window, softcap, pad):
    q, k, v, valid = _inputs(2, 4, 2, 9, 13, 6, pad)
    fn = lambda q, k, v: exact_attention(q, k, v, 0.4, True, window, softcap, valid, block=4)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q.requires_grad_(), k.requires_grad_(), v.requires_grad_()))


@pytest.mark.parametrize("block", [0, 16])  # 0: torch's fused kernel; 16: ours
def test_exact_large_logits_finite(block):
    """Logits in the hundreds (trained models): the row max shift keeps exp in range, and the error is that of
    float32 logits (at |x| ~ 400 their rounding alone moves outputs by ~1e-4): at most 2x the dense float32
    reference's, plus 1e-6."""
    q, k, v, _ = _inputs(1, 2, 2, 64, 64, 32, False, torch.float32, logit_std=400.0)
    out = exact_attention(q.requires_grad_(), k, v, 1.0, block=block)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(q.grad).all()
    ref = naive_attention(q.double(), k.double(), v.double(), 1.0)
    dense32 = (naive_attention(q, k, v, 1.0).double() - ref).abs().max().item()
    assert (out.double() - ref).abs().max().item() <= 2 * dense32 + 1e-6


@pytest.mark.parametrize("block", [0, 16])
def test_exact_bf16_close_to_fp32(block):
    """bf16 inputs accumulate in fp32: error no worse than 2x torch's own bf16 error (flash-attention's rule)."""
    q, k, v, _ = _inputs(1, 4, 2, 128, 128, 32, False, torch.float32)
    ref = naive_attention(q, k, v, 32**-0.5)
    bf = [t.bfloat16() for t in (q, k, v)]
    ours = exact_attention(*bf, 32**-0.5, block=block).float()
    torch_bf16 = naive_attention(*bf, 32**-0.5).float()
    assert (ours - ref).abs().max() <= 2 * (torch_bf16 - ref).abs().max()


def test_fully_masked_rows_are_zero_not_nan():
    q, k, v, _ = _inputs(1, 2, 2, 8, 8, 4, False)
    valid = torch.ones(1, 8, dtype=torch.bool)
    valid[0, :3] = False
    q.requires_grad_()
    out = exact_attention(q, k, v, 0.5, kv_valid=valid)
    assert torch.isfinite(out).all() and (out[:, :, :3] == 0).all()
    out.sum().backward()
    assert torch.isfinite(q.grad).all()


def test_exact_never_builds_nq_by_nk(monkeypatch):
    """Memory is linear in N: with a 64-row block no intermediate has Nq*Nk elements."""
    biggest = []
    real = torch.Tensor.__matmul__

    def spy(a, b):
        out = real(a, b)
        biggest.append(out.numel())
        return out

    monkeypatch.setattr(torch.Tensor, "__matmul__", spy)
    n = 1024
    q, k, v, _ = _inputs(1, 1, 1, n, n, 8, False, torch.float32)
    out = exact_attention(q.requires_grad_(), k, v, 0.3, block=64)
    out.sum().backward()
    assert max(biggest) <= 64 * n


def test_more_queries_than_keys_raises():
    q, k, v, _ = _inputs(1, 2, 2, 9, 8, 4, False)
    with pytest.raises(ValueError, match="more queries"):
        exact_attention(q, k, v, 1.0)


@pytest.mark.parametrize("option, match", [
    (dict(window=0), r"window must be an integer >= 1; got 0"),
    (dict(block=-2), r"block must be an integer >= 0"),
    (dict(softcap=-1.0), r"softcap must be None or a finite number > 0"),
    (dict(kv_valid=torch.ones(8, dtype=torch.bool)), r"kv_valid must be a bool tensor \[B, Nk\] = \[1, 8\]"),
])
def test_bad_options_raise(option, match):
    q, k, v, _ = _inputs(1, 2, 2, 8, 8, 4, False)
    with pytest.raises(ValueError, match=match):
        exact_attention(q, k, v, 1.0, **option)


@pytest.mark.parametrize("nq, nk, window, pad, fused", [
    (64, 64, None, False, True), (1, 64, None, False, True),  # full causal, one decoding row
    (1, 64, None, True, True),  # one decoding row with padding (a static cache's mask): its keys' validity
    (20, 64, None, False, False), (64, 64, 8, False, False), (64, 64, None, True, False),  # prefill, window, pad
])
def test_exact_fused_dispatch(monkeypatch, nq, nk, window, pad, fused):
    """Only the plain causal case and a decoding row go to torch's fused SDPA (counted), the rest to our blocks;
    both equal the dense reference in float64, gradients included (GQA: 4 query heads on 2 K/V heads). A fused
    kernel that declines the call (None) leaves it to ours."""
    from hf_fastattn.ops import exact, stats

    q, k, v, valid = _inputs(1, 4, 2, nq, nk, 16, pad)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    for declined in (False, True):
        if declined:
            monkeypatch.setattr(exact, "_fused_sdpa", lambda *a: None)
        stats.reset()
        out = exact_attention(q, k, v, 0.3, True, window, None, valid)
        assert stats.COUNTS["exact.sdpa"] == (fused and not declined)
        assert stats.COUNTS["exact.forward"] == (not fused or declined)
        ref = naive_attention(q, k, v, 0.3, True, window, None, valid)
        assert (out - ref).abs().max().item() < 1e-12
        do = torch.randn_like(out)
        for a, b_ in zip(torch.autograd.grad(out, (q, k, v), do), torch.autograd.grad(ref, (q, k, v), do)):
            assert (a - b_).abs().max().item() < 1e-12


def test_exact_fused_decode_row_without_keys():
    """A decoding row whose keys are all padding is 0 on the fused path too, as in our blocks (a kernel may give
    NaN there), and the other rows of the batch are untouched."""
    from hf_fastattn.ops import stats

    q, k, v, _ = _inputs(3, 4, 2, 1, 24, 16, False)
    valid = torch.rand(3, 24, generator=torch.Generator().manual_seed(5)) > 0.3
    valid[1] = False
    stats.reset()
    out = exact_attention(q, k, v, 0.3, kv_valid=valid)
    assert stats.COUNTS["exact.sdpa"] == 1
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    ref = naive_attention(q, k, v, 0.3, True, None, None, valid)
    assert (out - ref).abs().max().item() < 1e-12 and out[0].abs().max().item() > 0.1


@pytest.mark.parametrize("dv", [8, 24])
@pytest.mark.parametrize("nq, pad", [(40, False), (1, False), (40, True)])
def test_exact_value_width(nq, pad, dv):
    """Values of another width than queries and keys (DeepSeek's latent attention, 16 vs dv): the fused path
    (zero-padded to one width) and our blocks both equal the dense reference, gradients included."""
    from hf_fastattn.ops import stats

    q, k, _, valid = _inputs(1, 4, 2, nq, 40, 16, pad)
    v = torch.randn(1, 2, 40, dv, dtype=torch.float64)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    ref = naive_attention(q, k, v, 0.3, True, None, None, valid)
    do = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (q, k, v), do)
    for block in (0, 16):
        stats.reset()
        out = exact_attention(q, k, v, 0.3, True, None, None, valid, block=block)
        assert out.shape == (1, 4, nq, dv)
        assert stats.COUNTS["exact.sdpa"] == (block == 0 and (not pad or nq == 1))
        assert (out - ref).abs().max().item() < 1e-12
        for a, b_ in zip(torch.autograd.grad(out, (q, k, v), do), ref_grads):
            assert (a - b_).abs().max().item() < 1e-12


def test_exact_accepts_integer_padding_mask():
    """kv_valid may come as a 0/1 integer mask (HF attention masks are int64): it is read as bool, so the result
    equals the bool mask's (an int mask used as is would be bit-inverted by `~`), gradients included."""
    q, k, v, valid = _inputs(2, 4, 2, 30, 30, 8, True)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    ref = naive_attention(q, k, v, 0.4, True, 7, None, valid)
    out = exact_attention(q, k, v, 0.4, True, 7, None, valid.long(), block=8)
    assert (out - ref).abs().max().item() < 1e-12
    do = torch.randn_like(out)
    for a, b_ in zip(torch.autograd.grad(out, (q, k, v), do), torch.autograd.grad(ref, (q, k, v), do)):
        assert (a - b_).abs().max().item() < 1e-12
