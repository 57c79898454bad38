"""Polynomial-method attention in linear time: chunked forward, recompute backward (torch; CPU and GPU).

Per query row i (key slot t_i) and key slot j <= t_i the weight is
    w_ij = exp(softcap(x_ij) - m_i)   if t_i - j < band      (exact local band)
    w_ij = P(x_ij) exp(-m_i)          otherwise              (far part, P(x) = phi_q(q_i) . phi_k(k_j))
with x_ij = s q_i.k_j, and o_i = sum_j w_ij v_j / sum_j w_ij. The shift m_i cancels; it only keeps the
numbers finite: m_i = max(largest band logit, log of a bound on the far P values), where the far bound
is sum_t |c_t| (s |q_i| max_j |k_j|)^t. So every weight is <= 1, no exp overflows at logits in the
hundreds, and a row's denominator cannot underflow to 0 when it has a far key (P >= min P > 0).

Chunks of C key slots: queries of chunk c read the far keys of chunks < c - L (L = ceil(band / C)) from a
float32 prefix state S = sum_j phi_k(k_j) [v_j, 1]^T ([r, D+1], numerator and denominator in one matmul)
and compute the keys of chunks c - L .. c directly (band and far weights mixed). The backward recomputes
S in a forward sweep (for dq) and the query-side state U = sum_i phi_q(q_i) e^{-m_i} [do_i/den_i, -rho_i]^T
in a reverse sweep (for dk, dv): memory O(N D + r D) per head, never O(N r) or O(N^2).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..masks import acc_dtype, valid_slots
from ..sinks import fold_sink, sink_grad
from ..stats import count
from .features import FeatureMap, abs_poly, poly_deriv, poly_eval

NEG_INF = float("-inf")


# --------------------------------------------------------------------------- shared pieces (fwd, bwd, direct)
def max_key_norm(k, valid=None):
    """[B, Hkv]: max |k_j| over the valid keys of k [B, Hkv, Nk, D] (0 without any), accumulated in the
    accumulation dtype without a converted copy of k (gigabytes at 1M tokens)."""
    norms = torch.linalg.vector_norm(k, dim=-1, dtype=acc_dtype(k.dtype))
    if valid is not None:
        norms = norms.masked_fill(~valid[:, None, :], 0.0)
    return norms.amax(-1) if norms.shape[-1] else norms.new_zeros(norms.shape[:-1])


def far_log_bound(q5, k, valid, scale, coeffs, kmax=None):
    """log of sum_t |c_t| (s |q_i| max_j |k_j|)^t >= log P(x_ij) for every valid key j: [B, Hkv, G, Nq] from
    q5 [B, Hkv, G, Nq, D], k [B, Hkv, Nk, D], valid [B, Nk]. `kmax` [B, Hkv]: the max |k| of keys held elsewhere
    (a decode state's), joined with k's."""
    km = max_key_norm(k, valid)
    if kmax is not None:
        km = torch.maximum(km, kmax)
    beta = scale * torch.linalg.vector_norm(q5, dim=-1, dtype=acc_dtype(q5.dtype)) * km[:, :, None, None]
    return torch.log(abs_poly(coeffs, beta))


def has_far_key(valid, slots, band):
    """[B, Nq] bool: does the row at key slot `slots` see any valid key at slot <= slot - band?"""
    count = valid.long().cumsum(-1)
    idx = slots - band
    seen = count.gather(-1, idx.clamp_min(0).expand(valid.shape[0], -1))
    return (idx >= 0) & (seen > 0)


def far_scale(m, has_far):
    """e^{-m_i} for rows with far keys, 0 for the others. A row without far keys is shifted by its band maximum,
    which can be below -88, where e^{-m} overflows float32: its far terms are all 0, and inf * 0 would make them
    NaN (in the forward, or in autograd's backward through a masked branch)."""
    return torch.where(has_far, torch.exp(-m), 0.0)


def direct_weights(x, dist, valid, band, coeffs, softcap, m, has_far, slope=True):
    """Weights of directly computed keys and dW/dx.

    x: [B, Hkv, G, R, K] scaled logits; dist: [R, K] slot distance t_i - j; valid: [B, K] bool;
    m: [B, Hkv, G, R] row shift; has_far: [B, 1, 1, R] (`has_far_key`). Returns (w, dw_dx) of x's shape
    (0 where masked); dw_dx is None unless `slope` (the forwards do not need it).
    """
    seen = (dist >= 0) & valid[:, None, None, None, :]
    near = seen & (dist < band)
    far = seen & (dist >= band)
    em = far_scale(m, has_far)[..., None]
    if softcap is not None:
        t = torch.tanh(x / softcap)
        xn = softcap * t
    else:
        xn = x
    w_near = torch.exp(torch.where(near, xn - m[..., None], NEG_INF))
    w_far = poly_eval(coeffs, x) * em
    w = torch.where(near, w_near, torch.where(far, w_far, 0.0))
    if not slope:
        return w, None
    d_near = w_near if softcap is None else w_near * (1 - t * t)
    dw_dx = torch.where(near, d_near, torch.where(far, poly_deriv(coeffs, x) * em, 0.0))
    return w, dw_dx


def row_shift(band_max, far_bound, has_far):
    """m_i = max(largest band logit, far bound if the row has far keys); 0 for rows that see nothing."""
    m = torch.maximum(band_max, torch.where(has_far, far_bound, NEG_INF))
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m))


def _with_ones(v):
    return torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)


def _values(v, valid, sl, dt):
    """[v_j, 1] for the key slots `sl`, zero on padded slots: [B, Hkv, C, D+1]."""
    return _with_ones(v[:, :, sl].to(dt)) * valid[:, None, sl, None]


def _add_chunk(state, fmap, k, v, valid, j, c, dt):
    """state += phi(k_j)^T [v_j, 1] for key chunk j (one [r, C] x [C, D+1] product)."""
    ks = slice(j * c, (j + 1) * c)
    state += fmap(k[:, :, ks].to(dt)).transpose(-1, -2) @ _values(v, valid, ks, dt)


class _Layout:
    """Chunk geometry of padded inputs: key slots [0, nc*C), queries in chunks c0..nc-1."""

    def __init__(self, q, k, chunk, band):
        self.b, self.h, self.nq, self.d = q.shape
        self.hkv, self.nk = k.shape[1], k.shape[2]
        self.g = self.h // self.hkv
        self.c = chunk
        self.nc = self.nk // chunk
        self.c0 = (self.nk - self.nq) // chunk
        self.lag = math.ceil(band / chunk) if band > 0 else 0  # chunks computed directly behind the diagonal
        self.band = band

    def direct_range(self, c):
        return max(0, c - self.lag), c + 1

    def query_slice(self, c):
        """Query rows of key chunk c (c >= c0)."""
        return slice((c - self.c0) * self.c, (c - self.c0 + 1) * self.c)

    def dist(self, c, lo, device):
        rows = torch.arange(c * self.c, (c + 1) * self.c, device=device)
        cols = torch.arange(lo * self.c, (c + 1) * self.c, device=device)
        return rows[:, None] - cols[None, :]


def _forward_sweep(lay, state, fmap, k, v, valid, dt):
    """The query chunks in order, as (c, j, qi, lo, hi): chunk c's query rows `qi`, its directly computed key
    chunks [lo, hi), and j = the newest far chunk (j >= 0: `state` then holds phi(k)^T [v, 1] of chunks <= j)."""
    for c in range(lay.nc):
        j = c - lay.lag - 1
        if j >= 0:  # chunk j becomes far for every later query chunk
            _add_chunk(state, fmap, k, v, valid, j, lay.c, dt)
        if c >= lay.c0:
            yield (c, j, lay.query_slice(c), *lay.direct_range(c))


def _prepare(q, k, v, valid, scale, coeffs, lay):
    """Views, feature coefficients and the per-row far bounds shared by the forward and the backward."""
    dt = acc_dtype(q.dtype)
    q5 = q.view(lay.b, lay.hkv, lay.g, lay.nq, lay.d)
    fmap = FeatureMap.get(lay.d, len(coeffs) - 1)
    coef = fmap.coefficients(coeffs, scale, dt, q.device)  # coef * fmap(q) . fmap(k) = P(s q.k)
    bound = far_log_bound(q5, k, valid, scale, coeffs)  # [B, Hkv, G, Nq]
    slots = torch.arange(lay.nk - lay.nq, lay.nk, device=q.device)[None]
    has_far = has_far_key(valid, slots, lay.band)[:, None, None, :]  # [B, 1, 1, Nq]
    return dt, q5, fmap, coef, bound, has_far


# ------------------------------------------------------------------------------------------- forward
def poly_chunk_fwd(q, k, v, valid, scale, coeffs, band, chunk, softcap):
    """Inputs padded so that Nk and the query start are multiples of `chunk`. Returns (o, m, den, S), S the
    prefix state of the key chunks the sweep made far (`final_slots`)."""
    lay = _Layout(q, k, chunk, band)
    dt, q5, fmap, coef, bound, has_far = _prepare(q, k, v, valid, scale, coeffs, lay)
    b, hkv, g, c_, d = lay.b, lay.hkv, lay.g, lay.c, lay.d
    r = coef.numel()
    state = torch.zeros(b, hkv, r, v.shape[-1] + 1, dtype=dt, device=q.device)
    out = torch.zeros(b, hkv, g, lay.nq, v.shape[-1], dtype=q.dtype, device=q.device)
    m_all = torch.zeros(b, hkv, g, lay.nq, dtype=dt, device=q.device)
    den_all = torch.zeros(b, hkv, g, lay.nq, dtype=dt, device=q.device)
    for c, j, qi, lo, hi in _forward_sweep(lay, state, fmap, k, v, valid, dt):
        kd, vd, vald = k[:, :, lo * c_ : hi * c_], v[:, :, lo * c_ : hi * c_], valid[:, lo * c_ : hi * c_]
        qs = q5[:, :, :, qi].to(dt) * scale  # [B, Hkv, G, C, D]
        x = qs @ kd.to(dt)[:, :, None].transpose(-1, -2)  # [B, Hkv, G, C, K]
        dist = lay.dist(c, lo, q.device)
        xn = x if softcap is None else softcap * torch.tanh(x / softcap)
        near = (dist >= 0) & (dist < band) & vald[:, None, None, None, :]
        band_max = torch.where(near, xn, NEG_INF).amax(-1)
        m = row_shift(band_max, bound[:, :, :, qi], has_far[..., qi])
        w, _ = direct_weights(x, dist, vald, band, coeffs, softcap, m, has_far[..., qi], slope=False)
        nd = w @ _with_ones(vd.to(dt))[:, :, None]  # [B, Hkv, G, C, D+1]
        if j >= 0:
            phq = fmap(q5[:, :, :, qi].to(dt)).reshape(b, hkv, g * c_, r)
            far = (phq @ (coef[:, None] * state)).view(b, hkv, g, c_, -1)
            nd = nd + far_scale(m, has_far[..., qi])[..., None] * far
        den = nd[..., -1]
        out[:, :, :, qi] = (nd[..., :-1] / den.clamp_min(torch.finfo(dt).tiny)[..., None]).to(q.dtype)
        m_all[:, :, :, qi], den_all[:, :, :, qi] = m, den
    return out.view(b, lay.h, lay.nq, -1), m_all, den_all, state


def final_slots(nk: int, chunk: int, band: int) -> int:
    """Padded key slots [0, final_slots) in the forward sweep's last state: the chunks far for the last one."""
    lag = math.ceil(band / chunk) if band > 0 else 0
    return max(0, nk // chunk - lag - 1) * chunk


# ------------------------------------------------------------------------------------------ backward
def poly_chunk_bwd(do, q, k, v, valid, out, m_all, den_all, scale, coeffs, band, chunk, softcap):
    lay = _Layout(q, k, chunk, band)
    dt, q5, fmap, coef, _, has_far = _prepare(q, k, v, valid, scale, coeffs, lay)
    b, hkv, g, c_, d = lay.b, lay.hkv, lay.g, lay.c, lay.d
    r, dv_dim = coef.numel(), v.shape[-1]
    do5 = do.view(b, hkv, g, lay.nq, dv_dim).to(dt)
    o5 = out.view(b, hkv, g, lay.nq, dv_dim).to(dt)
    inv = torch.where(den_all > 0, 1.0 / den_all.clamp_min(torch.finfo(dt).tiny), 0.0)
    # D'_i = [do_i / den_i, -(do_i . o_i) / den_i]: dL/dw_ij = D'_i . [v_j, 1]
    dprime = torch.cat([do5 * inv[..., None], -(do5 * o5).sum(-1, keepdim=True) * inv[..., None]], dim=-1)
    dq = torch.zeros(b, hkv, g, lay.nq, d, dtype=dt, device=q.device)
    dk = torch.zeros(b, hkv, lay.nk, d, dtype=dt, device=q.device)
    dv = torch.zeros(b, hkv, lay.nk, dv_dim, dtype=dt, device=q.device)

    # forward sweep: key state S for dq (far part) and the directly computed blocks
    state = torch.zeros(b, hkv, r, dv_dim + 1, dtype=dt, device=q.device)
    for c, j, qi, lo, hi in _forward_sweep(lay, state, fmap, k, v, valid, dt):
        kslc = slice(lo * c_, hi * c_)
        kd, vd, vald = k[:, :, kslc].to(dt), v[:, :, kslc].to(dt), valid[:, kslc]
        qc, m, dp, hf = q5[:, :, :, qi].to(dt), m_all[:, :, :, qi], dprime[:, :, :, qi], has_far[..., qi]
        x = (qc * scale) @ kd[:, :, None].transpose(-1, -2)
        w, dw_dx = direct_weights(x, lay.dist(c, lo, q.device), vald, band, coeffs, softcap, m, hf)
        dx = dw_dx * (dp @ _with_ones(vd)[:, :, None].transpose(-1, -2))  # [B, Hkv, G, C, K]
        dq[:, :, :, qi] = scale * (dx @ kd[:, :, None])
        dk[:, :, kslc] += scale * torch.einsum("bhgck,bhgcd->bhkd", dx, qc)
        dv[:, :, kslc] += torch.einsum("bhgck,bhgcd->bhkd", w, dp[..., :-1])
        if j >= 0:
            dps = (dp * far_scale(m, hf)[..., None]).reshape(b, hkv, g * c_, -1)
            g_feat = (dps @ (coef[:, None] * state).transpose(-1, -2)).view(b, hkv, g, c_, r)
            dq[:, :, :, qi] += fmap.vjp(qc, g_feat)

    # reverse sweep: query state U = sum_i phi(q_i) e^{-m_i} D'_i^T over the query chunks that see chunk j
    # as far (chunks >= j + lag + 1); with the coefficients it gives the far part of dk and dv
    ustate = torch.zeros(b, hkv, r, dv_dim + 1, dtype=dt, device=q.device)
    for j in range(lay.nc - lay.lag - 2, -1, -1):
        c = j + lay.lag + 1
        if c >= lay.c0:
            qi = lay.query_slice(c)
            phq = fmap(q5[:, :, :, qi].to(dt)).reshape(b, hkv, g * c_, r)
            scaled = dprime[:, :, :, qi] * far_scale(m_all[:, :, :, qi], has_far[..., qi])[..., None]
            ustate += phq.transpose(-1, -2) @ scaled.reshape(b, hkv, g * c_, -1)
        ks = slice(j * c_, (j + 1) * c_)
        kc, vc = k[:, :, ks].to(dt), _values(v, valid, ks, dt)
        uc = coef[:, None] * ustate
        dv[:, :, ks] += (fmap(kc) @ uc)[..., :-1] * valid[:, None, ks, None]
        dk[:, :, ks] += fmap.vjp(kc, vc @ uc.transpose(-1, -2))
    return dq.view(b, lay.h, lay.nq, d).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class PolyChunkFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, valid, scale, coeffs, band, chunk, softcap, sinks):
        count("poly.forward")
        out, m, den, state = poly_chunk_fwd(q, k, v, valid, scale, coeffs, band, chunk, softcap)
        if sinks is not None:  # see ops/sinks.py: the backward below is exact for the folded (out, m, den)
            rows = q.shape[:3]  # m, den: [B, Hkv, G, N] -> [B, H, N]
            out, m2, den2 = fold_sink(out, m.view(rows), den.view(rows), sinks)
            m, den = m2.view_as(m), den2.view_as(den)
        ctx.save_for_backward(q, k, v, valid, out, m, den, sinks)
        ctx.args = (scale, coeffs, band, chunk, softcap)
        ctx.mark_non_differentiable(state)
        return out, state

    @staticmethod
    def backward(ctx, do, _):
        count("poly.backward")
        q, k, v, valid, out, m, den, sinks = ctx.saved_tensors
        do = do.contiguous()
        dq, dk, dv = poly_chunk_bwd(do, q, k, v, valid, out, m, den, *ctx.args)
        dsinks = None
        if sinks is not None and ctx.needs_input_grad[9]:
            dsinks = sink_grad(do, out, m.view(q.shape[:3]), den.view(q.shape[:3]), sinks)
        return dq, dk, dv, None, None, None, None, None, None, dsinks


def poly_chunk_attention(q, k, v, scale, coeffs, band=0, chunk=64, softcap=None, kv_valid=None, sinks=None,
                         output_final_state=False):
    """Linear-time polynomial attention. q: [B, H, Nq, D], k, v: [B, Hkv, Nk, D] -> [B, H, Nq, D].
    sinks: [H] attention-sink logits or None (`ops.sinks`). output_final_state: also return (S, n), the sweep's
    last prefix state S = sum_{j < n} phi(k_j) [v_j, 1]^T ([B, Hkv, r, Dv + 1], accumulation dtype, padded slots
    left out) over the key slots [0, n) (n <= 0: none), which a decode state can start from.

    Pads the key slots on the left (so the first query starts a chunk) and both on the right (to whole
    chunks) with invalid slots; the padding is sliced off the result.
    """
    qp, kp, vp, valid = pad_to_chunks(q, k, v, kv_valid, chunk)
    out, state = PolyChunkFunction.apply(qp, kp, vp, valid, float(scale), tuple(coeffs), int(band), int(chunk),
                                         softcap, sinks)
    out = out[:, :, : q.shape[2]]
    if not output_final_state:
        return out
    left = kp.shape[2] - k.shape[2] - (qp.shape[2] - q.shape[2])  # pad_to_chunks' left padding
    return out, (state, final_slots(kp.shape[2], chunk, band) - left)


def pad_to_chunks(q, k, v, kv_valid, chunk):
    """Invalid key slots on the left (so the first query starts a chunk) and on both right ends (whole
    chunks): (q, k, v) padded and contiguous, and the [B, Nk'] validity of the slots."""
    nq, nk = q.shape[2], k.shape[2]
    left = (-(nk - nq)) % chunk
    right = (-(left + nk)) % chunk
    valid = valid_slots(kv_valid, k)
    if left == right == 0:  # no copies (q, k, v take gigabytes at 1M tokens)
        return q.contiguous(), k.contiguous(), v.contiguous(), valid
    valid = F.pad(valid, (left, right), value=False)
    kp, vp = F.pad(k, (0, 0, left, right)), F.pad(v, (0, 0, left, right))
    return F.pad(q, (0, 0, 0, right)).contiguous(), kp.contiguous(), vp.contiguous(), valid


def direct_form(q5, k, v, valid, first, scale, coeffs, band, softcap, sinks, far=None, kmax=None):
    """The last Nq rows against the keys [first, Nk) of the cache k, v [B, Hkv, Nk, D] (valid [B, Nk]), computed
    directly: [B, Hkv, G, Nq, Dv] from q5 [B, Hkv, G, Nq, D] in the accumulation dtype. The keys before `first`
    come from a decode state (`recurrent.py`): `far` [B, Hkv, G, Nq, Dv + 1] = sum_j P(x_ij) [v_j, 1] unshifted,
    `kmax` their max |k|; neither with first = 0. Autograd runs through it (the direct form's backward)."""
    _, hkv, g, nq, _ = q5.shape
    nk, dt = k.shape[2], q5.dtype
    kd, vd, vald = k[:, :, first:], v[:, :, first:], valid[:, first:]
    bound = far_log_bound(q5, kd, vald, scale, coeffs, kmax)
    slots = torch.arange(nk - nq, nk, device=q5.device)
    has_far = has_far_key(valid, slots[None], band)[:, None, None, :]
    x = (q5 * scale) @ kd.to(dt)[:, :, None].transpose(-1, -2)  # [B, Hkv, G, Nq, Nk - first]
    dist = slots[:, None] - torch.arange(first, nk, device=q5.device)[None, :]
    sink = None if sinks is None else sinks.to(dt).view(1, hkv, g, 1)
    with torch.no_grad():
        xn = x if softcap is None else softcap * torch.tanh(x / softcap)
        near = (dist >= 0) & (dist < band) & vald[:, None, None, None, :]
        band_max = torch.where(near, xn, NEG_INF).amax(-1) if nk > first else torch.full_like(bound, NEG_INF)
        m = row_shift(band_max, bound, has_far)
        if sink is not None:
            m = torch.maximum(m, sink)
    w, _ = direct_weights(x, dist, vald, band, coeffs, softcap, m, has_far, slope=False)
    nd = w @ _with_ones(vd.to(dt))[:, :, None]
    if far is not None:
        nd = nd + far_scale(m, has_far)[..., None] * far
    den = nd[..., -1:]
    if sink is not None:
        den = den + torch.exp(sink - m)[..., None]
    return nd[..., :-1] / den.clamp_min(torch.finfo(dt).tiny)


def poly_direct_attention(q, k, v, scale, coeffs, band=0, softcap=None, kv_valid=None, sinks=None):
    """The same function computed directly against every key (decode: O(Nq Nk D)); autograd backward."""
    count("poly.direct")
    b, h, nq, d = q.shape
    hkv = k.shape[1]
    valid = valid_slots(kv_valid, k)
    q5 = q.view(b, hkv, h // hkv, nq, d).to(acc_dtype(q.dtype))
    out = direct_form(q5, k, v, valid, 0, scale, coeffs, band, softcap, sinks)
    return out.reshape(b, h, nq, -1).to(q.dtype)
