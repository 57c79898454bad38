"""Polynomial attention for decoding with the far keys in a kept prefix state (the recurrent form).

The function is the chunk path's (`chunk.py`): exact band, P(x) = phi_q(q) . phi_k(k) beyond it. A decoding
call (Nq new rows at the end of a cache of Nk slots) reads most of the keys that are far for its first row from
    S = sum_j phi_k(k_j) [v_j, 1]^T   ([r, Dv + 1] per K/V head, float32),
kept between calls. S holds whole blocks of _BLOCK slots: it grows by a block once one has left the band, and
the keys after its last block (fewer than _BLOCK + band + Nq) are computed directly. A token's far part then
costs O(r Dv) instead of O(Nk D) (fewer operations than the direct form once the far keys outnumber the
features: `worth_a_state`), and S is written once per _BLOCK tokens, not at every token (an [r, Dv + 1] update
per head and token cost more than the readout). The state keeps the running max |k| of its keys (the far bound
that sets the row shift) and the sums of the keys and of the values of each block, which each call compares with
the cache it is given (one read of K and V, no features, no exp): a cache that was refilled or reordered (beam
search), or holds other values for the same keys (a LoRA on v_proj switched off), rebuilds the state instead of
reading another cache's keys. That read is O(Nk (D + Dv)) per call, as many bytes as a fused decode kernel reads:
on a GPU, where decoding is bound by memory, the state saves the direct form's arithmetic, not its bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..masks import acc_dtype, valid_slots
from ..stats import count
from . import guard
from .chunk import _with_ones, direct_form
from .features import FeatureMap

_BLOCK = 64  # key slots per block: the state absorbs whole blocks and keeps each one's key and value sums
_ABSORB = 256  # key slots per feature product when absorbing a long cache ([B, Hkv, 256, r] features at a time)


@dataclass
class PolyDecodeState:
    """The far keys [0, upto) of one layer's cache for the function `spec`."""

    s: torch.Tensor  # [B, Hkv, r, Dv + 1] sum_j valid_j phi_k(k_j) [v_j, 1]
    kmax: torch.Tensor  # [B, Hkv] max |k_j| over the valid keys absorbed
    ksum: torch.Tensor  # [B, Hkv, upto / _BLOCK, D] key sums per block of slots: which cache it belongs to
    vsum: torch.Tensor  # [B, Hkv, upto / _BLOCK, Dv] value sums per block (the same keys with other values: a
    # LoRA on v_proj switched off, an edited v_proj, are another cache)
    valid: torch.Tensor  # [B, upto] bool, the padding it was built with
    kscale: torch.Tensor  # [B, Hkv] max |k| coordinate absorbed (>= 1): the scale of the key sums' rounding
    vscale: torch.Tensor  # [B, Hkv] the same for the values
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
    dv = v.shape[-1]
    return PolyDecodeState(torch.zeros(b, hkv, fmap.r, dv + 1, **zeros), torch.zeros(b, hkv, **zeros),
                           torch.zeros(b, hkv, 0, d, **zeros), torch.zeros(b, hkv, 0, dv, **zeros),
                           torch.zeros(b, 0, dtype=torch.bool, device=k.device), torch.ones(b, hkv, **zeros),
                           torch.ones(b, hkv, **zeros), torch.zeros(b, hkv, d, d, **zeros),
                           fmap.coefficients(coeffs, scale, dt, k.device), 0, spec)


def _block_sums(x, dt) -> torch.Tensor:
    """[B, Hkv, N / _BLOCK, D]: sums of x [B, Hkv, N, D] (keys or values) per block of _BLOCK slots (N a multiple
    of it), as a strided reduction of the cache (a matmul would copy a sliced cache to batch it)."""
    return x.unflatten(2, (-1, _BLOCK)).sum(-2, dtype=dt)


def _same_sums(x, sums, scale, dt) -> bool:
    """x's block sums equal `sums` up to the rounding of a sum of _BLOCK terms of size <= scale in another order."""
    tol = _BLOCK**2 * torch.finfo(dt).eps / 4 * scale[..., None, None]
    return bool(((_block_sums(x, dt) - sums).abs() <= tol).all())


def _matches(state, k, v, valid, spec, end, dt) -> bool:
    """Is `state` this cache's? The same padding, and per block the same key and value sums (beams that differ in
    one key or value of a block differ by it in some coordinate). One read of the absorbed K and V: no features,
    no exp."""
    if state is None or state.spec != spec or state.s.shape[:2] != k.shape[:2] or state.upto > end:
        return False
    if state.upto == 0:
        return True
    if not torch.equal(valid[:, : state.upto], state.valid):
        return False
    n = state.upto
    return (_same_sums(k[:, :, :n], state.ksum, state.kscale, dt)
            and _same_sums(v[:, :, :n], state.vsum, state.vscale, dt))


def _absorb(state, fmap, k, v, valid, end, dt, features=True) -> None:
    """Add the whole blocks of key slots [state.upto, end) to the state (each slot read once). features=False:
    S holds them already (a prefill's sweep computed it), only the key / value statistics are added."""
    lo, hi = state.upto, end // _BLOCK * _BLOCK
    if lo >= hi:
        return
    ksums, vsums = [state.ksum], [state.vsum]
    for at in range(lo, hi, _ABSORB):
        sl = slice(at, min(hi, at + _ABSORB))  # whole blocks: lo and _ABSORB are multiples of _BLOCK
        kk, vv = k[:, :, sl].to(dt), v[:, :, sl].to(dt)
        if features:
            state.s += fmap(kk).transpose(-1, -2) @ (_with_ones(vv) * valid[:, None, sl, None])
        kmax, ksq, _ = guard.key_moments(kk, valid[:, sl])
        state.kmax = torch.maximum(state.kmax, kmax)
        state.ksq += ksq
        state.kscale = torch.maximum(state.kscale, kk.abs().amax((-2, -1)))
        state.vscale = torch.maximum(state.vscale, vv.abs().amax((-2, -1)))
        ksums.append(_block_sums(kk, dt))
        vsums.append(_block_sums(vv, dt))
    state.ksum, state.vsum = torch.cat(ksums, dim=2), torch.cat(vsums, dim=2)
    state.valid = torch.cat([state.valid, valid[:, lo:hi]], dim=1)
    state.upto = hi


def _spec(q, v, scale, coeffs, band) -> tuple:
    """What a state's numbers depend on besides the keys: the function and the shapes / accumulation dtype."""
    return (float(scale), tuple(coeffs), int(band), q.shape[-1], v.shape[-1], acc_dtype(q.dtype))


def from_prefill(final, q, k, v, scale, coeffs, band=0, kv_valid=None) -> PolyDecodeState | None:
    """A decode state from a prefill's last prefix state `final` = (S, n) (`poly_chunk_attention(...,
    output_final_state=True)`: S over the key slots [0, n)), so that the first decoded token does not sweep the
    prefix's features again: only its key / value statistics are read (O(n D^2), not O(n r D)). None where S does not
    end on a block boundary (a chunk_size that is no multiple of _BLOCK) or holds no keys."""
    s, n = final
    if n <= 0 or n % _BLOCK:
        return None
    spec = _spec(q, v, scale, coeffs, band)
    fmap = FeatureMap.get(q.shape[-1], len(coeffs) - 1)
    valid = valid_slots(kv_valid, k)
    count("poly.state_from_prefill")
    state = _fresh(k, v, spec, fmap, spec[-1])
    state.s = s
    _absorb(state, fmap, k, v, valid, n, spec[-1], features=False)
    return state


def key_moments(state: PolyDecodeState, k: torch.Tensor, kv_valid: torch.Tensor | None) -> tuple:
    """`guard.key_moments` of the whole cache k from the state's sums and the slots after it (no pass over K)."""
    kmax, ksq, count = guard.key_moments(k[:, :, state.upto :], None if kv_valid is None else kv_valid[:, state.upto :])
    return torch.maximum(kmax, state.kmax), ksq + state.ksq, count + state.valid.sum(-1)


@torch.no_grad()
def poly_recurrent_attention(q, k, v, scale, coeffs, band=0, softcap=None, kv_valid=None, sinks=None, state=None):
    """The last Nq rows against the cache k, v: [B, Hkv, Nk, D], q: [B, H, Nq, D], with the far keys from
    `state` (None, or one built on another cache: a new one), the slots after its last block directly. Returns
    (out [B, H, Nq, Dv], state). Inference only (no autograd); the numbers are those of `poly_direct_attention` up
    to float32 rounding of S."""
    count("poly.recurrent")
    b, h, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    dt = acc_dtype(q.dtype)
    valid = valid_slots(kv_valid, k)
    fmap = FeatureMap.get(d, len(coeffs) - 1)
    spec = _spec(q, v, scale, coeffs, band)
    end = far_end(nk, nq, band)
    if not _matches(state, k, v, valid, spec, end, dt):
        count("poly.recurrent_build")
        state = _fresh(k, v, spec, fmap, dt)
    _absorb(state, fmap, k, v, valid, end, dt)

    q5 = q.view(b, hkv, h // hkv, nq, d).to(dt)
    far = None
    if state.upto:  # phi_q . S: [B, Hkv, G, Nq, Dv + 1], the weights on the query side (G Nq rows, not r x Dv)
        far = (fmap(q5) * state.coef) @ state.s[:, :, None]
    out = direct_form(q5, k, v, valid, state.upto, scale, coeffs, band, softcap, sinks, far, state.kmax)
    return out.reshape(b, h, nq, -1).to(q.dtype), state
