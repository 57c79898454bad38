"""Quadratic references of polynomial-method attention — the math, used by tests.

O = D^{-1} (M o A) V with A_ij = exp(softcap(s q_i.k_j)) for 0 <= i - j < band (the exact local band) and
A_ij = P(s q_i.k_j) for i - j >= band. Computed in the log domain (log A = logit or log P, P > 0), so
logits in the hundreds are fine.
"""

from __future__ import annotations

import torch

from ..masks import dense_mask, repeat_kv
from ..sinks import softmax_with_sink
from .features import poly_eval


def _mixed_attention(a, v, coeffs, band, softcap, kv_valid, sinks=None):
    """a: [B, H, Nq, Nk] scaled logits, v: [B, H, Nk, D], sinks: [H] or None."""
    nq, nk = a.shape[-2:]
    dist = torch.arange(nq, device=a.device)[:, None] + (nk - nq) - torch.arange(nk, device=a.device)[None, :]
    near = a if softcap is None else softcap * torch.tanh(a / softcap)
    logw = torch.where(dist < band, near, torch.log(poly_eval(coeffs, a)))
    logw = logw.masked_fill(~dense_mask(nq, nk, True, None, kv_valid, a.device), float("-inf"))
    return softmax_with_sink(logw, sinks) @ v


def naive_poly_attention(q, k, v, scale, coeffs, band=0, softcap=None, kv_valid=None, sinks=None):
    """q: [B, H, Nq, D], k, v: [B, Hkv, Nk, D] (queries are the last Nq keys) -> [B, H, Nq, D].
    sinks: [H] attention-sink logits (`ops.sinks`): one more weight exp(sink) in every row's normaliser."""
    groups = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    return _mixed_attention(scale * q @ k.transpose(-1, -2), v, coeffs, band, softcap, kv_valid, sinks)


def naive_rope_poly_attention(q, k, v, scale, coeffs, rotation, band=0, kv_valid=None):
    """The general RoPE form on *unrotated* q, k: A_ij = f(s q_i^T R_{j-i} k_j), f = exp in the band, P beyond.

    `rotation(offsets)` returns the [..., D, D] matrices R_delta for integer offsets delta = j - i. For
    standard RoPE R_{j-i} = R_i^T R_j, so this must equal attention on the rotated q, k — the fact the
    backend relies on when it applies the polynomial method to the model's already-rotated inputs.
    """
    groups = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    nq, nk = q.shape[2], k.shape[2]
    offsets = torch.arange(nk, device=q.device)[None, :] - (torch.arange(nq, device=q.device)[:, None] + nk - nq)
    r = rotation(offsets)  # [Nq, Nk, D, D]
    a = scale * torch.einsum("bhid,ijde,bhje->bhij", q, r, k)
    return _mixed_attention(a, v, coeffs, band, None, kv_valid)
