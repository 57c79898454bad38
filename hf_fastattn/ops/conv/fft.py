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
below 100x the bound are recomputed directly (gathering their approximate scores, own max shift,
softmax): the same function, exact arithmetic, O(N D) per row. So no non-positive denominator ever divides.
"""

from __future__ import annotations

import math

import torch

from ..masks import acc_dtype

RELIABLE = 100.0  # a denominator must exceed this many FFT error bounds (measured: output error <= 4e-5 |v|)
_FFT_BUDGET = 1 << 27  # complex elements held per group of bases (~1 GiB in complex64)


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
    """Approximate score rows H_hat[b, h, i, :] for a list of rows: [R, N] (-inf where masked)."""
    seg = segments(starts, lengths, n)  # [B, Hs, N]
    hs = rows_h if starts.shape[1] > 1 else torch.zeros_like(rows_h)
    seg_r = seg[rows_b, hs]  # [R, N]
    j = torch.arange(n, device=cum.device)
    delta = (rows_i[:, None] - j[None, :]).clamp_min(0)
    table = cum[rows_b, rows_h].flatten(1)  # [R, k * N]
    scores = table.gather(1, seg_r.clamp_min(0) * cum.shape[-1] + delta)  # cum[seg(j), i - j]
    keep = (j[None, :] <= rows_i[:, None]) & (seg_r >= 0)
    return scores.masked_fill(~keep, float("-inf"))


def direct_rows(cum, starts, v, lengths, rows_b, rows_h, rows_i, groups, block=256):
    """Softmax rows of the conv-basis approximation computed directly: [R, D]."""
    n = v.shape[2]
    out = []
    for r0 in range(0, rows_b.numel(), block):
        sl = slice(r0, r0 + block)
        s = basis_rows(cum, starts, lengths, rows_b[sl], rows_h[sl], rows_i[sl], n)
        p = torch.softmax(s.to(acc_dtype(v.dtype)), -1).nan_to_num(0.0)
        out.append((p[:, None, :] @ v[rows_b[sl], rows_h[sl] // groups].to(p.dtype))[:, 0])
    return torch.cat(out) if out else v.new_zeros(0, v.shape[-1])


def conv_fft_apply(cum, starts, v, lengths):
    """cum [B, H, k, N] (scaled logits), starts [B, Hs, k] (Hs = 1: shared by all heads), v [B, Hkv, N, D],
    lengths [B] -> (out [B, H, N, D], number of rows recomputed directly)."""
    b, h, k, n = cum.shape
    hkv, d = v.shape[1], v.shape[-1]
    g, hs = h // hkv, starts.shape[1]
    dt = acc_dtype(v.dtype)
    j = torch.arange(n, device=v.device)
    # entries of basis u that some valid (i, j) pair reads: delta < L - s_u
    dvalid = j[None, None, None, :] < (lengths[:, None, None, None] - starts[..., None])
    cum = cum.to(dt)
    shift = torch.where(dvalid, cum, float("-inf")).amax((-1, -2)).detach()  # [B, H]
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    e = torch.exp(torch.where(dvalid, cum - shift[..., None, None], float("-inf")))  # [B, H, k, N], <= 1
    seg = segments(starts, lengths, n)  # [B, Hs, N]
    vp = torch.cat([v.to(dt), torch.ones_like(v[..., :1], dtype=dt)], -1)  # [B, Hkv, N, D+1]
    size = fast_length(2 * n)
    freq = size // 2 + 1
    # V'_u is per KV head when the bases are shared, per query head when every head searched its own
    per_head = hs > 1
    vsrc = vp.repeat_interleave(g, dim=1) if per_head else vp  # [B, Hv, N, D+1]
    hv = vsrc.shape[1]
    acc = torch.zeros(b, hkv, g, freq, d + 1, dtype=torch.complex128 if dt == torch.float64 else torch.complex64,
                      device=v.device)
    group = max(1, _FFT_BUDGET // max(1, b * hv * freq * (d + 1)))
    for u0 in range(0, k, group):
        us = torch.arange(u0, min(k, u0 + group), device=v.device)
        onehot = (seg[:, :, None, :] == us[None, None, :, None]).to(dt)  # [B, Hs, g', N]
        vu = onehot[..., None] * vsrc[:, :, None]  # [B, Hv, g', N, D+1]
        vf = torch.fft.rfft(vu, n=size, dim=-2)  # [B, Hv, g', F, D+1]
        ef = torch.fft.rfft(e[:, :, us], n=size, dim=-1).view(b, hkv, g, len(us), freq)
        if per_head:
            acc = acc + torch.einsum("bhguf,bhgufe->bhgfe", ef, vf.view(b, hkv, g, len(us), freq, d + 1))
        else:
            acc = acc + torch.einsum("bhguf,bhufe->bhgfe", ef, vf)
    nd = torch.fft.irfft(acc, n=size, dim=-2)[..., :n, :].reshape(b, h, n, d + 1)
    den = nd[..., -1]
    # absolute FFT error bound of the denominator: eps log2(L) sum_u |e_u|_2 sqrt(segment length)
    seglen = torch.stack([(seg == u).sum(-1) for u in range(k)], -1).to(dt)  # [B, Hs, k]
    eps = torch.finfo(dt).eps
    bound = 4 * eps * math.log2(size) * (e.detach().norm(dim=-1) * seglen.sqrt()).sum(-1)  # [B, H]
    rows_valid = j[None, None, :] < lengths[:, None, None]
    unreliable = rows_valid & (den.detach() < RELIABLE * bound[..., None])
    out = nd[..., :-1] / torch.where(unreliable | ~rows_valid, torch.ones_like(den), den)[..., None]
    out = torch.where(rows_valid[..., None], out, torch.zeros_like(out))
    count = int(unreliable.sum())
    if count:
        rb, rh, ri = unreliable.nonzero(as_tuple=True)
        out = out.index_put((rb, rh, ri), direct_rows(cum, starts, v, lengths, rb, rh, ri, g).to(out.dtype))
    return out.to(v.dtype), count
