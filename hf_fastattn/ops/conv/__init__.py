"""Conv-basis attention ("Conv Basis: A New Paradigm for Efficient Attention Inference and Gradient
Computation in Transformers"): k-Toeplitz recovery of the score matrix + FFT application.

`conv_attention` handles a full (prefill / training) sequence: padded key slots are compacted away (valid
keys first, in order) so that the Toeplitz structure runs over real tokens, the basis is recovered, applied
by FFT, and the rows are scattered back. With `return_state=True` it also returns a `ConvState` — the basis
columns and cumulative bases — from which `conv_decode` computes the *same* approximation for later rows
(decode, Nq = 1, or chunked prefill): a new row i needs B_u[i - s_u] = s q_i . k_{s_u}, i.e. only the current
query and the cached basis keys, plus the stored entries for the past rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..masks import acc_dtype, autocast_off, check_int, check_kv_valid, check_qkv, check_softcap
from ..sinks import check_sinks
from .basis import DenseColumns, ScoreColumns, every_column, placed_starts, recover, search_starts
from .fft import conv_fft_apply, direct_rows
from .naive import conv_matrix, conv_sum, dense_scores, naive_conv_attention

__all__ = [
    "conv_attention", "conv_decode", "ConvState", "recover", "ScoreColumns", "DenseColumns", "placed_starts",
    "search_starts", "state_matches", "conv_fft_apply", "naive_conv_attention", "conv_matrix", "conv_sum", "dense_scores",
]


@dataclass
class ConvState:
    """What decoding needs to extend a prefill's conv basis (compacted coordinates, no autograd graph)."""

    starts: torch.Tensor  # [B, Hs, k]
    cum: torch.Tensor  # [B, H, k, capacity]
    lengths: torch.Tensor  # [B] valid tokens seen so far
    basis_keys: torch.Tensor  # [B, Hkv, H/Hkv * k, D]: the keys at the basis columns (a consistency check)
    fingerprint: torch.Tensor  # [B, Hkv, D]: a position-weighted sum of all keys seen (consistency check)
    direct_rows: int = 0  # rows the FFT could not resolve, computed directly (numerics report)
    k_bases: int = 0  # the basis budget k: while fewer bases are held, every column is one (see `conv_decode`)


def _compaction(kv_valid, b, n, device):
    """(perm [B, N] valid slots first in order, lengths [B]) or (None, lengths) without padding."""
    if kv_valid is None:
        return None, torch.full((b,), n, dtype=torch.long, device=device)
    valid = kv_valid.to(device=device, dtype=torch.bool)
    perm = torch.sort((~valid).to(torch.int8), dim=-1, stable=True).indices
    return perm, valid.sum(-1)


def _gather_seq(x, perm):
    return x if perm is None else x.gather(2, perm[:, None, :, None].expand(x.shape[0], x.shape[1], -1, x.shape[-1]))


def _fingerprint(k, lengths):
    """sum_j w_j k_j over the valid compacted keys, w_j a fixed pseudo-random weight per index."""
    j = torch.arange(k.shape[2], device=k.device, dtype=torch.float64)
    w = torch.sin(j * 0.6180339887 + 0.1) * (j[None, :] < lengths[:, None])  # [B, N]
    return torch.einsum("bn,bhnd->bhd", w, k.double())


def _softcap(cum, softcap):
    return cum if softcap is None else softcap * torch.tanh(cum / softcap)


def _basis_keys(k, starts, heads):
    b, hkv, _, d = k.shape
    idx = starts.expand(b, heads, -1).reshape(b, hkv, -1)
    return k.gather(2, idx[..., None].expand(*idx.shape, d))


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_search(placement, T, delta, eps) -> None:
    """The search's parameters: T >= 1 diagonal entries per probe, noise eps >= 0 per entry, threshold
    delta > 2 T eps (a column deviates when its L1 change reaches delta - 2 T eps: at <= 0 every column would,
    and the search would put its bases on consecutive columns). The placement itself is checked by `recover`."""
    T = check_int("T", T, 1)
    if not _finite(delta) or delta <= 0:
        raise ValueError(f"delta must be a finite number > 0; got {delta!r}")
    if not _finite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0; got {eps!r}")
    if placement == "search" and delta <= 2 * T * eps:
        raise ValueError(f"delta must exceed 2 T eps = {2 * T * eps:g} with placement 'search' (T = {T} entries of "
                         f"noise eps = {eps:g} each); got {delta!r}")


@autocast_off
def conv_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    *,
    k_bases: int = 16,
    placement: str = "even",
    T: int = 8,
    delta: float = 0.5,
    eps: float = 1e-3,
    softcap: float | None = None,
    kv_valid: torch.Tensor | None = None,
    return_state: bool = False,
    sinks: torch.Tensor | None = None,
):
    """Causal conv-basis attention over a whole sequence.

    Args:
        q: [B, H, N, D]; k, v: [B, Hkv, N, D] (queries and keys are the same positions).
        scale: logits are s q.k.
        k_bases: number of conv bases k, an integer >= 1 (a row with k >= its valid length is exact attention,
            whatever the placement).
        placement: "search" (the paper's recovery), "even" or "geometric".
        T, delta, eps: the search's parameters (placement "search" only): a column starts a new basis when its
            first T >= 1 diagonal entries deviate from the prediction by >= delta - 2 T eps in L1; eps >= 0 is the
            entry noise allowed, delta > 2 T eps (checked for "search"; any finite delta > 0 otherwise).
        softcap: None or > 0: logits -> softcap * tanh(logits / softcap), applied to the basis entries (Gemma2).
        kv_valid: bool [B, N], False on padded slots (rows at padded slots return 0).
        return_state: also return the `ConvState` for `conv_decode`.
        sinks: [H] attention-sink logits (GPT-OSS's s_aux), one more term exp(sink) in each row's normaliser.

    Returns:
        out [B, H, N, D] (and the state). Cost O(k N D log N) time, O(k N + N D) memory per head.
    """
    check_qkv(q, k, v)
    sinks = check_sinks(sinks, q.shape[1])
    if q.shape[2] != k.shape[2]:
        raise ValueError("conv_attention needs Nq == Nk (use conv_decode with a ConvState for later rows)")
    kv_valid = check_kv_valid(kv_valid, q, k)
    softcap = check_softcap(softcap)
    k_bases = check_int("k_bases", k_bases, 1)
    _check_search(placement, T, delta, eps)
    b, h, n, _ = q.shape
    perm, lengths = _compaction(kv_valid, b, n, q.device)
    qc, kc, vc = _gather_seq(q, perm), _gather_seq(k, perm), _gather_seq(v, perm)
    oracle = ScoreColumns(qc, kc, scale, lengths)
    starts, cum = recover(oracle, min(k_bases, n), placement, T, delta, eps)
    out, n_direct = conv_fft_apply(_softcap(cum, softcap), starts, vc, lengths, sinks)
    if perm is not None:
        out = torch.zeros_like(out).scatter(2, perm[:, None, :, None].expand_as(out), out)
    if not return_state:
        return out
    state = ConvState(starts.detach(), cum.detach(), lengths, _basis_keys(kc.detach(), starts, h),
                      _fingerprint(kc.detach(), lengths), n_direct, k_bases)
    return out, state


def state_matches(state: ConvState | None, k: torch.Tensor, kv_valid: torch.Tensor | None, nq: int) -> bool:
    """Is `k` (the whole cache, new keys last) the continuation of the sequence `state` was built on?"""
    if state is None or state.lengths.shape[0] != k.shape[0]:
        return False
    perm, lengths = _compaction(kv_valid, k.shape[0], k.shape[2], k.device)
    if not torch.equal(lengths - nq, state.lengths):
        return False
    kc = _gather_seq(k, perm)
    if not torch.equal(_basis_keys(kc, state.starts, state.cum.shape[1]), state.basis_keys):
        return False
    return torch.allclose(_fingerprint(kc, state.lengths), state.fingerprint, rtol=1e-6, atol=1e-6)


@autocast_off
def conv_decode(q, k, v, scale, state: ConvState, softcap=None, kv_valid=None, sinks=None):
    """The conv-basis approximation for the last Nq rows, given the prefill's state: O(Nq N D).

    q: [B, H, Nq, D] (the newest positions), k, v: [B, Hkv, N, D] (the whole cache), kv_valid: bool [B, N] or
    None. Returns (out [B, H, Nq, D], new state); scores and bases stay in the accumulation dtype.

    A prefill shorter than k made every column a basis (exact attention): new columns then become bases too
    until k are held, so a sequence of at most k tokens stays exact; later columns join the last segment.
    """
    check_qkv(q, k, v)
    sinks = check_sinks(sinks, q.shape[1])
    kv_valid = check_kv_valid(kv_valid, q, k)
    softcap = check_softcap(softcap)
    b, h, nq, _ = q.shape
    dt = acc_dtype(q.dtype)  # the stored bases are in it; casting them to a bf16 query would round every logit
    perm, lengths = _compaction(kv_valid, b, k.shape[2], k.device)
    kc, vc = _gather_seq(k, perm), _gather_seq(v, perm)
    old = state.lengths
    cap = int(lengths.max())
    cum, starts = state.cum, state.starts
    # rows with every column a basis (recover: k >= the row's length) take their new columns as bases while the
    # budget lasts; fewer bases than the budget means every row is such a row, and the bases grow
    covered = old <= cum.shape[2]
    if bool(covered.all()):
        kb = max(cum.shape[2], min(state.k_bases, cap))
        cum, starts = torch.nn.functional.pad(cum, (0, 0, 0, kb - cum.shape[2])), every_column(lengths, kb)
    elif bool(covered.any()):
        starts = torch.where(covered[:, None, None], every_column(lengths, cum.shape[2]), starts)
    # extend every cumulative basis by the entries of the new rows: B_u[i - s_u] = s q_i . k_{s_u}, written only
    # where i >= s_u (a basis that starts at a new column) and i is a real row; the rest goes to a spare slot
    cum = torch.nn.functional.pad(cum.to(dt), (0, cap + 1 - cum.shape[-1]))
    keys = _basis_keys(kc, starts, h).view(b, h, -1, q.shape[-1]).to(dt)  # [B, H, k, D]
    new = scale * (q.to(dt) @ keys.transpose(-1, -2))  # [B, H, Nq, k]
    rows = old[:, None, None, None] + torch.arange(nq, device=q.device)[None, None, :, None]  # absolute row
    delta = rows - starts.expand(b, h, -1)[:, :, None, :]  # [B, H, Nq, k]
    written = (delta >= 0) & (rows < lengths[:, None, None, None])
    cum = cum.scatter(-1, torch.where(written, delta, cap).transpose(-1, -2), new.transpose(-1, -2))[..., :cap]
    rb, rh, rr = torch.meshgrid(torch.arange(b, device=q.device), torch.arange(h, device=q.device),
                                torch.arange(nq, device=q.device), indexing="ij")
    ri = old[rb] + rr
    out = direct_rows(_softcap(cum, softcap), starts, vc, lengths, rb.reshape(-1), rh.reshape(-1), ri.reshape(-1),
                      h // k.shape[1], sinks=sinks)
    out = out.view(b, h, nq, -1).to(v.dtype)
    new_state = ConvState(starts, cum.detach(), lengths, _basis_keys(kc.detach(), starts, h),
                          _fingerprint(kc.detach(), lengths), k_bases=state.k_bases)
    return out, new_state
