"""Applying a conv basis: causal FFT convolutions in float32, with the rows the FFT cannot resolve recomputed
directly.

With cumulative bases B_u (columns s_u of the score matrix) and V' = [V, 1], the numerator and denominator
of every row are   sum_u (exp(B_u - c) * V'_u)[i],   V'_u = V' restricted to the columns of segment u,
a sum of k causal convolutions: zero-padded to a fast FFT length >= 2N, transformed with rfft, multiplied
and summed over u in the frequency domain, and inverted once: O(k N D log N). c is a per-head shift (the
largest basis entry), so no exponential overflows.

An FFT convolution's error is absolute — about eps log2(L) |a|_2 |b|_2 — while the exp domain spans e^{+-400}
on trained models: a row whose weights are all tiny next to the head's largest is pure noise, and its
denominator can come out 0 or negative. Every row's denominator is compared with that error bound; rows
below RELIABLE[dtype] bounds are recomputed directly (gathering their approximate scores, own max shift,
softmax): the same function, exact arithmetic, O(N D) per row. So no non-positive denominator ever divides.
"""

from __future__ import annotations

import math

import torch

from ..masks import acc_dtype
from ..stats import count

# A denominator must exceed RELIABLE[dtype] FFT error bounds, else its row is computed directly. The bound scales
# with eps and the output error of the rows left to the FFT is measured at ~2.5e-3 / RELIABLE |v|_max in either
# dtype, so the threshold is set by the accuracy each dtype is for: float32 100 -> <= 2.5e-5; float64 1e10 ->
# <= 3e-13. float64 runs are references and gradcheck: its central difference divides the output error by its
# 2e-6 step and must stay under atol 1e-5, so 1e8 (<= 2.5e-11) still failed there, and 100 left rows at 1e-5.
# In logits: a row whose weights all sit more than ~ln(1 / (RELIABLE eps)) below the head's largest entry goes
# direct, ~11 in float32 and ~13 in float64.
RELIABLE = {torch.float32: 100.0, torch.float64: 1e10}
_FFT_BUDGET = 1 << 27  # complex elements held per group of bases (~1 GiB in complex64)
_SAVE_BUDGET = 1 << 29  # spectra (complex elements, 4 GiB in complex64) kept for the backward instead of recomputed


def fast_length(n: int) -> int:
    """Smallest 2^a 3^b 5^c >= n (sizes every FFT library handles fast)."""
    best = 1 << max(0, (n - 1).bit_length())
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            m = p35
            while m < n:
                m *= 2
            best = min(best, m)
            p35 *= 3
        p5 *= 5
    return best


def segments(starts: torch.Tensor, lengths: torch.Tensor, n: int) -> torch.Tensor:
    """[B, Hs, N] segment index of every column (-1 past the valid length)."""
    j = torch.arange(n, device=starts.device)
    seg = (j[None, None, :, None] >= starts[..., None, :]).sum(-1) - 1
    return torch.where(j < lengths[:, None, None], seg, torch.full_like(seg, -1))


def basis_rows(cum, starts, lengths, rows_b, rows_h, rows_i, n):
    """Approximate score rows H_hat[b, h, i, :n] for a list of rows: [R, n] (-inf where masked)."""
    seg = segments(starts, lengths, n)  # [B, Hs, n]
    hs = rows_h if starts.shape[1] > 1 else torch.zeros_like(rows_h)
    seg_r = seg[rows_b, hs]  # [R, n]
    j = torch.arange(n, device=cum.device)
    delta = (rows_i[:, None] - j[None, :]).clamp_min(0)
    # cum[b, h, seg(j), i - j] by advanced indexing: [R, n], never the [R, k, N] table
    scores = cum[rows_b[:, None], rows_h[:, None], seg_r.clamp_min(0), delta]
    keep = (j[None, :] <= rows_i[:, None]) & (seg_r >= 0)
    return scores.masked_fill(~keep, float("-inf"))


def direct_rows(cum, starts, v, lengths, rows_b, rows_h, rows_i, groups, block=256, sinks=None):
    """Softmax rows of the conv-basis approximation computed directly: [R, D]. Row i reads keys 0..i only,
    so rows are processed in order of i, each block against just the keys its last row sees. sinks: [H]
    attention-sink logits joining each row's softmax (`ops.sinks`), or None."""
    order = torch.argsort(rows_i)
    out = torch.empty(rows_b.numel(), v.shape[-1], dtype=acc_dtype(v.dtype), device=v.device)
    for r0 in range(0, rows_b.numel(), block):
        sel = order[r0 : r0 + block]
        rb, rh, ri = rows_b[sel], rows_h[sel], rows_i[sel]
        n = int(ri.max()) + 1
        s = basis_rows(cum, starts, lengths, rb, rh, ri, n).to(out.dtype)
        if sinks is None:
            p = torch.softmax(s, -1).nan_to_num(0.0)
        else:
            p = torch.softmax(torch.cat([s, sinks[rh].to(s.dtype)[:, None]], -1), -1)[:, :-1]
        out = out.index_put((sel,), (p[:, None, :] @ v[rb, rh // groups, :n].to(p.dtype))[:, 0])
    return out


def _complex(dt):
    return torch.complex128 if dt == torch.float64 else torch.complex64


def _segment_groups(k, b, hv, freq, e_dim):
    """Bases per group so that one group's spectra stay within the memory budget."""
    return max(1, _FFT_BUDGET // max(1, b * hv * freq * e_dim))


class ConvFFTFunction(torch.autograd.Function):
    """nd[b, h, :, i] = sum_u sum_j e[b, h, u, i - j] vt[b, h // G, :, j] [seg(j) = u]: k causal convolutions.

    e: [B, H, k, N] kernels (<= 1), vt: [B, Hv, E, N] channels-first values (FFTs along the last, contiguous
    dim), seg: [B, Hv or 1, N] segment of every column (-1 outside). Forward: k E rfft + E irfft per head.
    Backward recomputes the spectra group by group (memory O(group k E N)) instead of saving them:
    dvt = correlation of dnd with e_u on segment u, de_u = correlation of dnd with vt_u.
    """

    @staticmethod
    def forward(ctx, e, vt, seg, size):
        count("conv.forward")
        b, h, k, n = e.shape
        hv, ed = vt.shape[1], vt.shape[2]
        g, freq = h // hv, size // 2 + 1
        acc = torch.zeros(b, hv, g, ed, freq, dtype=_complex(e.dtype), device=e.device)
        step = _segment_groups(k, b, hv, freq, ed)
        keep = step >= k and b * hv * k * ed * freq <= _SAVE_BUDGET  # spectra small enough to keep for backward
        for u0 in range(0, k, step):
            us = torch.arange(u0, min(k, u0 + step), device=e.device)
            ef = torch.fft.rfft(e[:, :, us], n=size).view(b, hv, g, len(us), freq)
            vf = torch.fft.rfft(vt[:, :, None] * (seg[:, :, None, None, :] == us[:, None, None]), n=size)
            for t in range(len(us)):  # [B, Hv, G, 1, F] * [B, Hv, 1, E, F]
                acc += ef[:, :, :, t, None] * vf[:, :, None, t]
        ctx.save_for_backward(e, vt, seg, *((ef, vf) if keep else ()))
        ctx.size = size
        return torch.fft.irfft(acc, n=size)[..., :n].reshape(b, h, ed, n)

    @staticmethod
    def backward(ctx, dnd):
        count("conv.backward")
        e, vt, seg, *spectra = ctx.saved_tensors
        size = ctx.size
        b, h, k, n = e.shape
        hv, ed = vt.shape[1], vt.shape[2]
        g, freq = h // hv, size // 2 + 1
        fdy = torch.fft.rfft(dnd.reshape(b, hv, g, ed, n), n=size)  # [B, Hv, G, E, F]
        de = torch.zeros_like(e).view(b, hv, g, k, n)
        dvt = torch.zeros_like(vt)
        step = _segment_groups(k, b, hv, freq, ed)
        for u0 in range(0, k, step):
            us = torch.arange(u0, min(k, u0 + step), device=e.device)
            onehot = seg[:, :, None, None, :] == us[:, None, None]  # [B, Hv|1, g', 1, N]
            if spectra:
                ef, vf = spectra
            else:
                ef = torch.fft.rfft(e[:, :, us], n=size).view(b, hv, g, len(us), freq)
                vf = torch.fft.rfft(vt[:, :, None] * onehot, n=size)  # [B, Hv, g', E, F]
            for t in range(len(us)):
                # correlation with e_u over the query heads that share these values, kept on segment u
                dx = torch.fft.irfft((ef[:, :, :, t, None].conj() * fdy).sum(2), n=size)[..., :n]
                dvt += dx * onehot[:, :, t]
                cross = (vf[:, :, None, t].conj() * fdy).sum(-2)  # [B, Hv, G, F], summed over channels
                de[:, :, :, int(us[t])] = torch.fft.irfft(cross, n=size)[..., :n]
        return de.view(b, h, k, n), dvt, None, None


def conv_fft_apply(cum, starts, v, lengths, sinks=None):
    """cum [B, H, k, N] (scaled logits), starts [B, Hs, k] (Hs = 1: shared by all heads), v [B, Hkv, N, D],
    lengths [B], sinks [H] attention-sink logits or None -> (out [B, H, N, D], number of rows recomputed
    directly)."""
    b, h, k, n = cum.shape
    hkv, d = v.shape[1], v.shape[-1]
    g = h // hkv
    dt = acc_dtype(v.dtype)
    j = torch.arange(n, device=v.device)
    # entries of basis u that some valid (i, j) pair reads: delta < L - s_u
    dvalid = j[None, None, None, :] < (lengths[:, None, None, None] - starts[..., None])
    cum = cum.to(dt)
    shift = torch.where(dvalid, cum, float("-inf")).amax((-1, -2)).detach()  # [B, H]
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    sink = None if sinks is None else sinks.to(dt)[None].expand(b, h)  # [B, H]
    if sink is not None:  # one more normaliser term exp(sink - shift): the shift covers it too, so it is <= 1
        shift = torch.maximum(shift, sink.detach())
    e = torch.exp(torch.where(dvalid, cum - shift[..., None, None], float("-inf")))  # [B, H, k, N], <= 1
    seg = segments(starts, lengths, n)  # [B, Hs, N]
    vt = torch.cat([v.to(dt), torch.ones_like(v[..., :1], dtype=dt)], -1).transpose(-1, -2)  # [B, Hkv, D+1, N]
    if starts.shape[1] > 1:  # every head searched its own basis: values per query head
        vt = vt.repeat_interleave(g, dim=1)
    size = fast_length(2 * n)
    nd = ConvFFTFunction.apply(e, vt.contiguous(), seg, size).transpose(-1, -2)  # [B, H, N, D+1]
    den = nd[..., -1]
    if sink is not None:
        den = den + torch.exp(sink - shift)[..., None]
    # absolute FFT error bound of the denominator: eps log2(L) sum_u |e_u|_2 sqrt(segment length)
    seglen = torch.stack([(seg == u).sum(-1) for u in range(k)], -1).to(dt)  # [B, Hs, k]
    eps = torch.finfo(dt).eps
    bound = 4 * eps * math.log2(size) * (e.detach().norm(dim=-1) * seglen.sqrt()).sum(-1)  # [B, H]
    rows_valid = j[None, None, :] < lengths[:, None, None]
    unreliable = rows_valid & (den.detach() < RELIABLE[dt] * bound[..., None])
    out = nd[..., :-1] / torch.where(unreliable | ~rows_valid, torch.ones_like(den), den)[..., None]
    out = torch.where(rows_valid[..., None], out, torch.zeros_like(out))
    count = int(unreliable.sum())
    if count:
        rb, rh, ri = unreliable.nonzero(as_tuple=True)
        out = out.index_put((rb, rh, ri), direct_rows(cum, starts, v, lengths, rb, rh, ri, g, sinks=sinks).to(out.dtype))
    return out.to(v.dtype), count
