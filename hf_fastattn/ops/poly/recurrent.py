"""Polynomial attention for decoding with the far keys in a kept prefix state (the recurrent form).

The function is the chunk path's (`chunk.py`): exact band, P(x) = phi_q(q) . phi_k(k) beyond it. A decoding
call (Nq new rows at the end of a cache of Nk slots) reads most of the keys that are far for its first row from
    S = sum_j phi_k(k_j) [v_j, 1]^T   ([r, Dv + 1] per K/V head, float32),
kept between calls. S holds whole blocks of _BLOCK slots: it grows by a block once one has left the band, and
the keys after its last block (fewer than _BLOCK + band + Nq) are computed directly. A token's far part then
costs O(r Dv) instead of O(Nk D) (fewer operations than the direct form once the far keys outnumber the
features: `worth_a_state`), and S is written once per _BLOCK tokens, not at every token (an [r, Dv + 1] update
per head and token cost more than the readout). The state keeps the running max |k| of its keys (the far bound
that sets the row shift) and the sum of the keys of each block, which each call compares with the cache it is
given (one read of K, no exp and no V: a fraction of the direct form's pass): a cache that was refilled or
reordered (beam search) rebuilds the state instead of reading another sequence's keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..masks import acc_dtype
from ..stats import count
from . import guard
from .chunk import _values, direct_form
from .features import FeatureMap

_BLOCK = 64  # key slots per block: the state absorbs whole blocks and keeps each one's key sum
_ABSORB = 256  # key slots per feature product when absorbing a long cache ([B, Hkv, 256, r] features at a time)


@dataclass
class PolyDecodeState:
    """The far keys [0, upto) of one layer's cache for the function `spec`."""

    s: torch.Tensor  # [B, Hkv, r, Dv + 1] sum_j valid_j phi_k(k_j) [v_j, 1]
    kmax: torch.Tensor  # [B, Hkv] max |k_j| over the valid keys absorbed
    ksum: torch.Tensor  # [B, Hkv, upto / _BLOCK, D] key sums per block of slots: which cache it belongs to
    valid: torch.Tensor  # [B, upto] bool, the padding it was built with
    kscale: torch.Tensor  # [B, Hkv] max |k| coordinate absorbed (>= 1): the scale of the sums' rounding
    ksq: torch.Tensor  # [B, Hkv, D, D] sum of k k^T over the valid keys: the guard's key moments (`key_moments`)
    coef: torch.Tensor  # [r] the feature weights of P(s q.k) (`FeatureMap.coefficients`), applied to phi(q)
    upto: int  # a multiple of _BLOCK
    spec: tuple


def far_end(nk: int, nq: int, band: int) -> int:
    """Key slots [0, far_end) are far for every one of the last nq rows (slot - j >= band)."""
    return max(0, nk - nq - band + 1)


def worth_a_state(nk: int, nq: int, band: int, d: int, degree: int) -> bool:
    """Fewer operations with the state than directly: more far keys than features."""
    return far_end(nk, nq, band) > FeatureMap.get(d, degree).r


def _fresh(k, v, spec, fmap, dt) -> PolyDecodeState:
    b, hkv, _, d = k.shape
    zeros = dict(dtype=dt, device=k.device)
    scale, coeffs = spec[:2]
    return PolyDecodeState(torch.zeros(b, hkv, fmap.r, v.shape[-1] + 1, **zeros), torch.zeros(b, hkv, **zeros),
                           torch.zeros(b, hkv, 0, d, **zeros), torch.zeros(b, 0, dtype=torch.bool, device=k.device),
                           torch.ones(b, hkv, **zeros), torch.zeros(b, hkv, d, d, **zeros),
                           fmap.coefficients(coeffs, scale, dt, k.device), 0, spec)


def _block_sums(k, dt) -> torch.Tensor:
    """[B, Hkv, N / _BLOCK, D]: key sums of k [B, Hkv, N, D] per block of _BLOCK slots (N a multiple of it), as a
    strided reduction of the cache (a matmul would copy a sliced cache to batch it)."""
    return k.unflatten(2, (-1, _BLOCK)).sum(-2, dtype=dt)


def _matches(state, k, valid, spec, end, dt) -> bool:
    """Is `state` this cache's? The same padding, and per block the same key sums up to the rounding of a sum of
    _BLOCK keys in another order (beams that differ in one key of a block differ by that key in some coordinate)."""
    if state is None or state.spec != spec or state.s.shape[:2] != k.shape[:2] or state.upto > end:
        return False
    if state.upto == 0:
        return True
    if not torch.equal(valid[:, : state.upto], state.valid):
        return False
    tol = _BLOCK**2 * torch.finfo(dt).eps / 4 * state.kscale[..., None, None]
    return bool(((_block_sums(k[:, :, : state.upto], dt) - state.ksum).abs() <= tol).all())


def _absorb(state, fmap, k, v, valid, end, dt) -> None:
    """Add the whole blocks of key slots [state.upto, end) to the state (each slot read once)."""
    lo, hi = state.upto, end // _BLOCK * _BLOCK
    if lo >= hi:
        return
    sums = []
    for at in range(lo, hi, _ABSORB):
        sl = slice(at, min(hi, at + _ABSORB))  # whole blocks: lo and _ABSORB are multiples of _BLOCK
        kk = k[:, :, sl].to(dt)
        state.s += fmap(kk).transpose(-1, -2) @ _values(v, valid, sl, dt)
        kmax, ksq, _ = guard.key_moments(kk, valid[:, sl])
        state.kmax = torch.maximum(state.kmax, kmax)
        state.ksq += ksq
        state.kscale = torch.maximum(state.kscale, kk.abs().amax((-2, -1)))
        sums.append(_block_sums(kk, dt))
    state.ksum = torch.cat([state.ksum, *sums], dim=2)
    state.valid = torch.cat([state.valid, valid[:, lo:hi]], dim=1)
    state.upto = hi


def key_moments(state: PolyDecodeState, k: torch.Tensor, kv_valid: torch.Tensor | None) -> tuple:
    """`guard.key_moments` of the whole cache k from the state's sums and the slots after it (no pass over K)."""
    kmax, ksq, count = guard.key_moments(k[:, :, state.upto :], None if kv_valid is None else kv_valid[:, state.upto :])
    return torch.maximum(kmax, state.kmax), ksq + state.ksq, count + state.valid.sum(-1)


@torch.no_grad()
def poly_recurrent_attention(q, k, v, scale, coeffs, band=0, softcap=None, kv_valid=None, sinks=None, state=None):
    """The last Nq rows against the cache k, v: [B, Hkv, Nk, D], q: [B, H, Nq, D], with the far keys from
    `state` (None, or one built on another cache: a new one), the slots after its last block directly. Returns (out [B, H, Nq, Dv], state). Inference
    only (no autograd); the numbers are those of `poly_direct_attention` up to float32 rounding of S."""
    count("poly.recurrent")
    b, h, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    dt = acc_dtype(q.dtype)
    valid = torch.ones(b, nk, dtype=torch.bool, device=k.device) if kv_valid is None else kv_valid.bool()
    fmap = FeatureMap.get(d, len(coeffs) - 1)
    spec = (float(scale), tuple(coeffs), int(band), d, v.shape[-1], dt)
    end = far_end(nk, nq, band)
    if not _matches(state, k, valid, spec, end, dt):
        state = _fresh(k, v, spec, fmap, dt)
    _absorb(state, fmap, k, v, valid, end, dt)

    q5 = q.view(b, hkv, h // hkv, nq, d).to(dt)
    far = None
    if state.upto:  # phi_q . S: [B, Hkv, G, Nq, Dv + 1], the weights on the query side (G Nq rows, not r x Dv)
        far = (fmap(q5) * state.coef) @ state.s[:, :, None]
    out = direct_form(q5, k, v, valid, state.upto, scale, coeffs, band, softcap, sinks, far, state.kmax)
    return out.reshape(b, h, nq, -1).to(q.dtype), state
