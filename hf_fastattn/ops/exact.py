"""Exact softmax attention with memory linear in N.

`exact_attention` processes query rows in blocks against only the key slots they can see (causal /
sliding window), keeps the row log-sum-exp, and recomputes each block's probabilities in the backward
(FlashAttention's recipe in plain torch), so neither direction ever holds an Nq x Nk matrix. It is the
plumbing oracle of the backend and the fallback of the approximate methods. The plain case (full causal
attention, no window, softcap or padding, default blocks) goes to torch's fused SDPA kernels instead, the same
function at their speed, never to SDPA's math backend (which holds the Nq x Nk matrix).
`naive_attention` is the dense quadratic reference of the same math, used by tests.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .masks import acc_dtype, autocast_off, check_int, check_kv_valid, check_qkv, check_softcap, dense_mask, group_queries, key_range, repeat_kv, visible
from .sinks import check_sinks, fold_sink, sink_grad, softmax_with_sink
from .stats import count

# Scores per block: B * H * rows * keys <= this many elements (~128 MiB in float32).
_BLOCK_ELEMENTS = 1 << 25


def naive_attention(q, k, v, scale, causal=True, window=None, softcap=None, kv_valid=None, sinks=None):
    """Dense reference. q: [B, H, Nq, D]; k, v: [B, Hkv, Nk, D] -> [B, H, Nq, D]. Fully masked rows give 0.
    sinks: [H] logits joining every row's softmax with a zero value (`ops.sinks`)."""
    groups = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    s = (q @ k.transpose(-1, -2)) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    mask = dense_mask(q.shape[2], k.shape[2], causal, window, kv_valid, q.device)
    s = s.masked_fill(~mask, float("-inf"))
    return softmax_with_sink(s, sinks) @ v


def _block_rows(b: int, h: int, nk: int, block: int, window: int | None = None) -> int:
    if block:
        return block
    if window and window < nk:
        # a block of R rows sees at most R + window keys: R near the window keeps the work near 2 N window (sized
        # by all N keys, short inputs got one dense block)
        rows = max(64, window)
        while rows > 16 and b * h * rows * (rows + window) > _BLOCK_ELEMENTS:
            rows //= 2
    else:
        rows = _BLOCK_ELEMENTS // max(1, b * h * nk)
    return int(max(16, min(4096, rows)))


def _row_blocks(nq, nk, b, h, causal, window, block):
    """(r0, r1, lo, hi): query rows [r0, r1) and the key slots [lo, hi) they can see, skipping empty blocks."""
    c = _block_rows(b, h, nk, block, window)
    for r0 in range(0, nq, c):
        r1 = min(nq, r0 + c)
        lo, hi = key_range(r0, r1, nk - nq, nk, causal, window)
        if hi > lo:
            yield r0, r1, lo, hi


def _block_scores(q5, k, r0, r1, lo, hi, q_start, scale, causal, window, softcap, kv_valid, dtype):
    """Masked scores of query rows [r0, r1) against key slots [lo, hi).

    Returns (s [B, Hkv, G*C, K] with -inf where masked, tanh(raw/softcap) or None).
    """
    b, hkv, g, _, d = q5.shape
    qb = q5[:, :, :, r0:r1].reshape(b, hkv, g * (r1 - r0), d).to(dtype)
    s = (qb @ k[:, :, lo:hi].to(dtype).transpose(-1, -2)) * scale
    t = None
    if softcap is not None:
        t = torch.tanh(s / softcap)
        s = softcap * t
    dev = q5.device
    mask = visible(torch.arange(r0, r1, device=dev), torch.arange(lo, hi, device=dev), q_start, causal, window)
    if mask is not None:
        mask = mask.repeat(g, 1)[None, None]  # rows are ordered (g, c)
    if kv_valid is not None:
        kv = kv_valid[:, None, None, lo:hi]
        mask = kv if mask is None else mask & kv
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return s, t


def _exact_fwd(q, k, v, scale, causal, window, softcap, kv_valid, block):
    b, h, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    g, q_start = h // hkv, nk - nq
    dt = acc_dtype(q.dtype)
    q5 = group_queries(q, hkv)
    out = torch.zeros(b, hkv, g, nq, v.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.full((b, hkv, g, nq), float("inf"), dtype=dt, device=q.device)
    for r0, r1, lo, hi in _row_blocks(nq, nk, b, h, causal, window, block):
        s, _ = _block_scores(q5, k, r0, r1, lo, hi, q_start, scale, causal, window, softcap, kv_valid, dt)
        m = s.amax(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # fully masked rows
        p = torch.exp(s - m)
        den = p.sum(-1, keepdim=True)
        o = (p @ v[:, :, lo:hi].to(dt)) / den.clamp_min(torch.finfo(dt).tiny)
        out[:, :, :, r0:r1] = o.view(b, hkv, g, r1 - r0, -1).to(q.dtype)
        blk_lse = torch.where(den > 0, m + torch.log(den), torch.full_like(den, float("inf")))
        lse[:, :, :, r0:r1] = blk_lse.view(b, hkv, g, r1 - r0)
    return out.view(b, h, nq, -1), lse


def _exact_bwd(do, q, k, v, out, lse, scale, causal, window, softcap, kv_valid, block):
    b, h, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    g, q_start = h // hkv, nk - nq
    dt = acc_dtype(q.dtype)
    q5, do5 = group_queries(q, hkv), group_queries(do, hkv)
    delta = (do.to(dt) * out.to(dt)).sum(-1).view(b, hkv, g, nq)
    dq = torch.zeros(b, hkv, g, nq, d, dtype=dt, device=q.device)
    dk = torch.zeros(b, hkv, nk, d, dtype=dt, device=q.device)
    dv = torch.zeros(b, hkv, nk, v.shape[-1], dtype=dt, device=q.device)
    for r0, r1, lo, hi in _row_blocks(nq, nk, b, h, causal, window, block):
        rows = g * (r1 - r0)
        s, t = _block_scores(q5, k, r0, r1, lo, hi, q_start, scale, causal, window, softcap, kv_valid, dt)
        p = torch.exp(s - lse[:, :, :, r0:r1].reshape(b, hkv, rows, 1))
        dob = do5[:, :, :, r0:r1].reshape(b, hkv, rows, -1).to(dt)
        ds = p * (dob @ v[:, :, lo:hi].to(dt).transpose(-1, -2) - delta[:, :, :, r0:r1].reshape(b, hkv, rows, 1))
        if t is not None:
            ds = ds * (1 - t * t)  # d/ds of softcap * tanh(s / softcap)
        ds = ds * scale
        qb = q5[:, :, :, r0:r1].reshape(b, hkv, rows, d).to(dt)
        dq[:, :, :, r0:r1] = (ds @ k[:, :, lo:hi].to(dt)).view(b, hkv, g, r1 - r0, d)
        dk[:, :, lo:hi] += ds.transpose(-1, -2) @ qb  # sums the G query heads of each KV head
        dv[:, :, lo:hi] += p.transpose(-1, -2) @ dob
    return dq.view(b, h, nq, d).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class ExactAttnFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, causal, window, softcap, kv_valid, block, sinks):
        count("exact.forward")
        out, lse = _exact_fwd(q, k, v, scale, causal, window, softcap, kv_valid, block)
        if sinks is not None:  # the row lse is a shift with den = 1 (rows that see no key: lse = inf, den = 0)
            seen = torch.isfinite(lse).view(q.shape[:3])
            out, m, den = fold_sink(out, lse.view(seen.shape), seen.to(lse.dtype), sinks)
            # a row with neither key nor sink keeps lse = inf (its weights exp(s - lse) stay 0, not nan)
            lse = torch.where(den > 0, m + torch.log(den), float("inf")).view_as(lse)
        ctx.save_for_backward(q, k, v, out, lse, kv_valid, sinks)
        ctx.args = (scale, causal, window, softcap, block)
        return out

    @staticmethod
    def backward(ctx, do):
        count("exact.backward")
        q, k, v, out, lse, kv_valid, sinks = ctx.saved_tensors
        scale, causal, window, softcap, block = ctx.args
        dq, dk, dv = _exact_bwd(do, q, k, v, out, lse, scale, causal, window, softcap, kv_valid, block)
        dsinks = None
        if sinks is not None and ctx.needs_input_grad[9]:
            lse = lse.view(q.shape[:3])
            dsinks = sink_grad(do, out, lse, torch.ones_like(lse), sinks)
        return dq, dk, dv, None, None, None, None, None, None, dsinks


# SDPA kernels with memory linear in N (the CPU's fused kernel is its FLASH_ATTENTION backend)
_FUSED = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]


def _fused_sdpa(q, k, v, scale, kv_valid=None):
    """Causal attention (Nq == Nk, or one decoding row per sequence) by torch's fused SDPA kernels, or None where
    none of them takes the call (e.g. grouped K/V heads on a CUDA kernel without GQA support). A decoding row
    may come with its keys' [B, Nk] validity: with one query it is the whole mask."""
    dq, dv = q.shape[-1], v.shape[-1]
    if dv != dq:  # latent attention (DeepSeek): the fused kernels want one width; zero columns change nothing
        if dv < dq:
            out = _fused_sdpa(q, k, F.pad(v, (0, dq - dv)), scale, kv_valid)
            return None if out is None else out[..., :dv]
        return _fused_sdpa(F.pad(q, (0, dv - dq)), F.pad(k, (0, dv - dq)), v, scale, kv_valid)
    mask = None if kv_valid is None else kv_valid[:, None, None, :]
    try:
        with warnings.catch_warnings(), sdpa_kernel(_FUSED):
            warnings.simplefilter("ignore")  # each kernel that declines says why
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=q.shape[2] > 1, scale=scale,
                                                 enable_gqa=q.shape[1] != k.shape[1])
    except RuntimeError:
        return None
    if kv_valid is not None:  # a row that sees no key is 0, as everywhere in the op (a kernel may give NaN)
        out = torch.where(kv_valid.any(-1)[:, None, None, None], out, 0)
    return out


@autocast_off
def exact_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    causal: bool = True,
    window: int | None = None,
    softcap: float | None = None,
    kv_valid: torch.Tensor | None = None,
    block: int = 0,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact softmax attention, O(N) memory forward and backward.

    Args:
        q: [B, H, Nq, D] queries (the last Nq key positions).
        k, v: [B, Hkv, Nk, D] with H a multiple of Hkv (GQA is handled without repeating K/V).
        scale: multiplier of q.k.
        causal, window: causal mask and sliding window (keys with 0 <= i - j < window visible).
        softcap: logits -> softcap * tanh(logits / softcap) before the softmax (Gemma2).
        kv_valid: [B, Nk] bool, False for padded key slots.
        block: query rows per block (0: automatic, and the plain causal case, or one decoding row with padding, may
            run torch's fused SDPA).
        sinks: [H] attention-sink logits (GPT-OSS's s_aux), one per query head, or None.

    Returns:
        [B, H, Nq, D]; rows that see no key are 0.
    """
    check_qkv(q, k, v)
    sinks = check_sinks(sinks, q.shape[1])
    block, softcap, kv_valid = check_int("block", block, 0), check_softcap(softcap), check_kv_valid(kv_valid, q, k)
    if window is not None:
        window = check_int("window", window, 1)
    if causal and window is not None and window >= k.shape[2]:  # a window spanning every key is no window
        window = None
    plain = causal and window is None and softcap is None and not block and sinks is None
    if plain and (q.shape[2] == 1 or (kv_valid is None and q.shape[2] == k.shape[2])):
        out = _fused_sdpa(q, k, v, float(scale), kv_valid)
        if out is not None:
            count("exact.sdpa")
            return out
    return ExactAttnFunction.apply(q, k, v, float(scale), causal, window, softcap, kv_valid, block, sinks)
