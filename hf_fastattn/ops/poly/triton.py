"""Fused Triton kernels of degree-2 polynomial attention (forward and backward). CUDA, or CPU under
`TRITON_INTERPRET=1` (how the test suite runs them).

Same function as `chunk.py`. Two tricks shape the kernels:

* Augmented vectors. P(z) = c0 + c1 z + c2 z^2 = c2 (z + delta)^2 + gamma with delta = c1 / (2 c2),
  gamma = c0 - c1^2 / (4 c2). With q~ = [sqrt(s) q, sign(delta) sqrt|delta|], k~ = [sqrt(s) k, sqrt|delta|]
  (D + 1 dims, zero-padded to whole blocks), s q.k + delta = q~.k~, so the far part is
  c2 sum_j (q~.k~_j)^2 [v_j, 1] plus the constant gamma sum_j [v_j, 1] (a prefix sum, done in torch).
  Only one feature family remains: products of two coordinates.
* Feature tiles. The D~ x D~ outer product is cut into blocks of BA x BA coordinates; a program owns one
  block pair (A <= B: the symmetric half, off-diagonal tiles counted twice), computes its BA^2 features of a
  chunk on the fly from two [BT, BA] loads (never written to HBM), and carries its [BA^2, BD] slice of the
  float32 state through the sequence. Partial outputs of the tiles meet with atomic adds (their summation
  order varies: results agree to float32 rounding run to run, not bit for bit).

Precision: dots of float32 inputs run on TF32 tensor cores (about 1e-3 relative, the tolerance of the GPU
tests); bf16/fp16 inputs are read as such and every product accumulates in float32.

Kernels: `_direct_fwd` (band + far keys of the diagonal and lagged chunks, exact row shift m_i),
`_far_fwd` (state sweep), `_direct_bwd`, `_far_bwd_dq` (forward state sweep), `_far_bwd_dkv` (reverse sweep
of the query-side state U). Variables follow fla: `i_` program ids, `o_` offsets, `m_` masks, `b_` blocks.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..masks import acc_dtype
from ..stats import count
from .chunk import far_log_bound, has_far_key, pad_to_chunks

BA = 8  # default coordinates per feature block: a tile holds BA * BA = 64 features


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _direct_weights(x, o_q, o_k, m_k, b_m, band, c0, c1, c2, softcap, HAS_SOFTCAP: tl.constexpr):
    """Weights and dW/dx of a directly computed block: exp(softcap(x) - m) in the band, P(x) e^{-m} beyond."""
    dist = o_q[:, None] - o_k[None, :]
    seen = (dist >= 0) & m_k[None, :]
    near = seen & (dist < band)
    far = seen & (dist >= band)
    if HAS_SOFTCAP:
        t = _tanh(x / softcap)
        xn = softcap * t
        dxn = 1.0 - t * t
    else:
        xn = x
        dxn = 1.0
    em = tl.exp(-b_m)[:, None]
    w_near = tl.exp(tl.where(near, xn - b_m[:, None], float("-inf")))
    w = tl.where(near, w_near, tl.where(far, (c0 + x * (c1 + c2 * x)) * em, 0.0))
    dw = tl.where(near, w_near * dxn, tl.where(far, (c1 + 2.0 * c2 * x) * em, 0.0))
    return w, dw, near, xn


@triton.jit
def _direct_fwd(
    Q, K, V, VALID, BOUND, HASFAR, ND, M,
    s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_nb, s_nh, s_nn,
    NQ, NK, H, G, scale, band, c0, c1, c2, softcap,
    LAG: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
):
    i_c, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    i_hk = i_h // G
    q_start = NK - NQ
    kc = q_start // BT + i_c  # key chunk of the diagonal
    o_t = tl.arange(0, BT)
    o_d, o_dv = tl.arange(0, BD), tl.arange(0, BDV)
    o_q = kc * BT + o_t  # key slots of the query rows
    rows = i_c * BT + o_t
    p_q = Q + i_b * s_qb + i_h * s_qh + rows[:, None] * s_qn + o_d[None, :]
    b_q = tl.load(p_q, mask=o_d[None, :] < D, other=0.0).to(tl.float32)  # [BT, BD]
    b_m = tl.full([BT], float("-inf"), tl.float32)
    lo = tl.maximum(kc - LAG, 0)
    for kb in range(lo, kc + 1):  # pass 1: the largest band logit of every row
        o_k = kb * BT + o_t
        b_k = tl.load(K + i_b * s_kb + i_hk * s_kh + o_k[:, None] * s_kn + o_d[None, :], mask=o_d[None, :] < D, other=0.0)
        m_k = tl.load(VALID + i_b * NK + o_k) > 0
        x = tl.dot(b_q, tl.trans(b_k.to(tl.float32))) * scale  # [BT, BT]
        dist = o_q[:, None] - o_k[None, :]
        near = (dist >= 0) & (dist < band) & m_k[None, :]
        if HAS_SOFTCAP:
            x = softcap * _tanh(x / softcap)
        b_m = tl.maximum(b_m, tl.max(tl.where(near, x, float("-inf")), 1))
    bound = tl.load(BOUND + i_bh * NQ + rows)
    hasfar = tl.load(HASFAR + i_b * NQ + rows) > 0
    b_m = tl.maximum(b_m, tl.where(hasfar, bound, float("-inf")))
    b_m = tl.where(b_m == float("-inf"), 0.0, b_m)
    b_acc = tl.zeros([BT, BDV], tl.float32)
    b_den = tl.zeros([BT], tl.float32)
    for kb in range(lo, kc + 1):  # pass 2: weights
        o_k = kb * BT + o_t
        b_k = tl.load(K + i_b * s_kb + i_hk * s_kh + o_k[:, None] * s_kn + o_d[None, :], mask=o_d[None, :] < D, other=0.0)
        b_v = tl.load(V + i_b * s_vb + i_hk * s_vh + o_k[:, None] * s_vn + o_dv[None, :], mask=o_dv[None, :] < DV, other=0.0)
        m_k = tl.load(VALID + i_b * NK + o_k) > 0
        x = tl.dot(b_q, tl.trans(b_k.to(tl.float32))) * scale
        w, _, _, _ = _direct_weights(x, o_q, o_k, m_k, b_m, band, c0, c1, c2, softcap, HAS_SOFTCAP)
        b_acc += tl.dot(w, b_v.to(tl.float32))
        b_den += tl.sum(w, 1)
    p_n = ND + i_b * s_nb + i_h * s_nh + rows[:, None] * s_nn
    tl.store(p_n + o_dv[None, :], b_acc, mask=o_dv[None, :] < DV)
    tl.store(ND + i_b * s_nb + i_h * s_nh + rows * s_nn + DV, b_den)
    tl.store(M + i_bh * NQ + rows, b_m)


@triton.jit
def _tile(TA, TB, i_t, i_bh, HKV, c2, BA_: tl.constexpr):
    """(batch, KV head, first coordinates of the tile's blocks A and B, its weight: off-diagonal tiles stand
    for both orders)."""
    a0, b0 = tl.load(TA + i_t) * BA_, tl.load(TB + i_t) * BA_
    return i_bh // HKV, i_bh % HKV, a0, b0, tl.where(a0 == b0, c2, 2.0 * c2)


@triton.jit
def _add_pair(p, a0, b0, da, db, BA_: tl.constexpr):
    """Atomically add the [BT, BA] gradients of coordinate blocks A and B at row pointers p."""
    o_a = tl.arange(0, BA_)
    tl.atomic_add(p + (a0 + o_a)[None, :], da)
    tl.atomic_add(p + (b0 + o_a)[None, :], db)


@triton.jit
def _load_pair(X, base, rows, s_n, a0, b0, BA_: tl.constexpr):
    """Coordinates A = [a0, a0 + BA) and B = [b0, b0 + BA) of rows: two [BT, BA] blocks."""
    o_a = tl.arange(0, BA_)
    xa = tl.load(X + base + rows[:, None] * s_n + (a0 + o_a)[None, :]).to(tl.float32)
    xb = tl.load(X + base + rows[:, None] * s_n + (b0 + o_a)[None, :]).to(tl.float32)
    return xa, xb


@triton.jit
def _pair_features(xa, xb, BT: tl.constexpr, BA_: tl.constexpr):
    return tl.reshape(xa[:, :, None] * xb[:, None, :], (BT, BA_ * BA_))  # [BT, BA^2]


@triton.jit
def _key_chunk(KA, V, VALID, k_base, v_base, o_k, s_kn, s_vn, valid_base, a0, b0, o_v, DV: tl.constexpr,
               BT: tl.constexpr, BA_: tl.constexpr, ONES: tl.constexpr):
    """One key chunk of a tile: coordinate blocks, validity, features (zero on padded slots) and the values
    (with the denominator's column of ones at index DV when ONES)."""
    ka, kb = _load_pair(KA, k_base, o_k, s_kn, a0, b0, BA_)
    valid = (tl.load(VALID + valid_base + o_k) > 0).to(tl.float32)
    fk = _pair_features(ka, kb, BT, BA_) * valid[:, None]
    b_v = tl.load(V + v_base + o_k[:, None] * s_vn + o_v[None, :], mask=o_v[None, :] < DV, other=0.0).to(tl.float32)
    if ONES:
        b_v = tl.where(o_v[None, :] == DV, 1.0, b_v)
    return ka, kb, valid, fk, b_v


@triton.jit
def _far_fwd(
    QA, KA, V, VALID, TA, TB, NF,
    s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_nb, s_nh, s_nn,
    NQ, NK, HKV, c2,
    G: tl.constexpr, LAG: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BDV: tl.constexpr, BA_: tl.constexpr,
):
    i_t, i_bh, i_d = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_hk, a0, b0, coef = _tile(TA, TB, i_t, i_bh, HKV, c2, BA_)
    o_t = tl.arange(0, BT)
    o_dv = i_d * BDV + tl.arange(0, BDV)
    NC = NK // BT
    C0 = (NK - NQ) // BT
    b_s = tl.zeros([BA_ * BA_, BDV], tl.float32)  # this tile's slice of the state
    b_sd = tl.zeros([BA_ * BA_], tl.float32)  # and of the denominator state
    for c in range(0, NC):
        j = c - LAG - 1
        if j >= 0:  # chunk j turns far for every later query chunk
            _, _, _, fk, b_v = _key_chunk(KA, V, VALID, i_b * s_kb + i_hk * s_kh, i_b * s_vb + i_hk * s_vh, j * BT + o_t,
                                          s_kn, s_vn, i_b * NK, a0, b0, o_dv, DV, BT, BA_, False)
            b_s += tl.dot(tl.trans(fk), b_v)
            b_sd += tl.sum(fk, 0)
            if c >= C0:
                rows = (c - C0) * BT + o_t
                for g in tl.static_range(G):
                    i_h = i_hk * G + g
                    qa, qb = _load_pair(QA, i_b * s_qb + i_h * s_qh, rows, s_qn, a0, b0, BA_)
                    fq = _pair_features(qa, qb, BT, BA_) * coef
                    p_n = NF + i_b * s_nb + i_h * s_nh + rows[:, None] * s_nn + o_dv[None, :]
                    tl.atomic_add(p_n, tl.dot(fq, b_s), mask=o_dv[None, :] < DV)
                    if i_d == 0:
                        tl.atomic_add(NF + i_b * s_nb + i_h * s_nh + rows * s_nn + DV, tl.sum(fq * b_sd[None, :], 1))


@triton.jit
def _direct_bwd(
    Q, K, V, VALID, M, DND, DQ, DK, DV_,
    s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_nb, s_nh, s_nn,
    NQ, NK, H, G, scale, band, c0, c1, c2, softcap,
    LAG: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
):
    """dND = dL/d[num, den] of the direct part; dW_ij = dND_i . [v_j, 1]. dq stored, dk/dv added atomically
    (several query chunks read the same keys)."""
    i_c, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    i_hk = i_h // G
    kc = (NK - NQ) // BT + i_c
    o_t = tl.arange(0, BT)
    o_d, o_dv = tl.arange(0, BD), tl.arange(0, BDV)
    o_q = kc * BT + o_t
    rows = i_c * BT + o_t
    b_q = tl.load(Q + i_b * s_qb + i_h * s_qh + rows[:, None] * s_qn + o_d[None, :], mask=o_d[None, :] < D,
                  other=0.0).to(tl.float32)
    p_dn = DND + i_b * s_nb + i_h * s_nh + rows[:, None] * s_nn
    b_dn = tl.load(p_dn + o_dv[None, :], mask=o_dv[None, :] < DV, other=0.0)  # [BT, BDV]
    b_dd = tl.load(DND + i_b * s_nb + i_h * s_nh + rows * s_nn + DV)  # [BT]
    b_m = tl.load(M + i_bh * NQ + rows)
    b_dq = tl.zeros([BT, BD], tl.float32)
    lo = tl.maximum(kc - LAG, 0)
    for kb in range(lo, kc + 1):
        o_k = kb * BT + o_t
        b_k = tl.load(K + i_b * s_kb + i_hk * s_kh + o_k[:, None] * s_kn + o_d[None, :], mask=o_d[None, :] < D,
                      other=0.0).to(tl.float32)
        b_v = tl.load(V + i_b * s_vb + i_hk * s_vh + o_k[:, None] * s_vn + o_dv[None, :], mask=o_dv[None, :] < DV,
                      other=0.0).to(tl.float32)
        m_k = tl.load(VALID + i_b * NK + o_k) > 0
        x = tl.dot(b_q, tl.trans(b_k)) * scale
        w, dwdx, _, _ = _direct_weights(x, o_q, o_k, m_k, b_m, band, c0, c1, c2, softcap, HAS_SOFTCAP)
        dw = tl.dot(b_dn, tl.trans(b_v)) + b_dd[:, None]
        dx = dwdx * dw * scale
        b_dq += tl.dot(dx, b_k)
        tl.atomic_add(DK + i_b * s_kb + i_hk * s_kh + o_k[:, None] * s_kn + o_d[None, :], tl.dot(tl.trans(dx), b_q),
                      mask=o_d[None, :] < D)
        tl.atomic_add(DV_ + i_b * s_vb + i_hk * s_vh + o_k[:, None] * s_vn + o_dv[None, :], tl.dot(tl.trans(w), b_dn),
                      mask=o_dv[None, :] < DV)
    tl.store(DQ + i_b * s_qb + i_h * s_qh + rows[:, None] * s_qn + o_d[None, :], b_dq, mask=o_d[None, :] < D)


@triton.jit
def _pair_vjp(gf, xa, xb, BT: tl.constexpr, BA_: tl.constexpr):
    """d/dx of sum(gf * features): the A and B coordinate blocks."""
    g3 = tl.reshape(gf, (BT, BA_, BA_))
    return tl.sum(g3 * xb[:, None, :], 2), tl.sum(g3 * xa[:, :, None], 1)


@triton.jit
def _far_bwd_dq(
    QA, KA, V, VALID, TA, TB, DNF, DQA,
    s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_nb, s_nh, s_nn,
    NQ, NK, HKV, c2,
    G: tl.constexpr, LAG: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BDP: tl.constexpr, BA_: tl.constexpr,
):
    """Forward sweep of the key state S (all D + 1 value channels): dq~ = J^T (dNF S^T)."""
    i_b, i_hk, a0, b0, coef = _tile(TA, TB, tl.program_id(0), tl.program_id(1), HKV, c2, BA_)
    o_t, o_p = tl.arange(0, BT), tl.arange(0, BDP)
    NC = NK // BT
    C0 = (NK - NQ) // BT
    b_s = tl.zeros([BA_ * BA_, BDP], tl.float32)
    for c in range(0, NC):
        j = c - LAG - 1
        if j >= 0:
            _, _, _, fk, b_v = _key_chunk(KA, V, VALID, i_b * s_kb + i_hk * s_kh, i_b * s_vb + i_hk * s_vh, j * BT + o_t,
                                          s_kn, s_vn, i_b * NK, a0, b0, o_p, DV, BT, BA_, True)
            b_s += tl.dot(tl.trans(fk), b_v)
            if c >= C0:
                rows = (c - C0) * BT + o_t
                for g in tl.static_range(G):
                    i_h = i_hk * G + g
                    b_dn = tl.load(DNF + i_b * s_nb + i_h * s_nh + rows[:, None] * s_nn + o_p[None, :],
                                   mask=o_p[None, :] <= DV, other=0.0)
                    gf = tl.dot(b_dn, tl.trans(b_s)) * coef  # [BT, BA^2]
                    qa, qb = _load_pair(QA, i_b * s_qb + i_h * s_qh, rows, s_qn, a0, b0, BA_)
                    da, db = _pair_vjp(gf, qa, qb, BT, BA_)
                    _add_pair(DQA + i_b * s_qb + i_h * s_qh + rows[:, None] * s_qn, a0, b0, da, db, BA_)


@triton.jit
def _far_bwd_dkv(
    QA, KA, V, VALID, TA, TB, DNF, DKA, DV_,
    s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_nb, s_nh, s_nn,
    NQ, NK, HKV, c2,
    G: tl.constexpr, LAG: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BDP: tl.constexpr, BA_: tl.constexpr,
):
    """Reverse sweep of U = sum_i coef phi(q~_i) dNF_i^T over the query chunks that see chunk j as far:
    dv_j = phi(k~_j) U, dk~_j = J^T ([v_j, 1] U^T)."""
    i_b, i_hk, a0, b0, coef = _tile(TA, TB, tl.program_id(0), tl.program_id(1), HKV, c2, BA_)
    o_t, o_p = tl.arange(0, BT), tl.arange(0, BDP)
    NC = NK // BT
    C0 = (NK - NQ) // BT
    b_u = tl.zeros([BA_ * BA_, BDP], tl.float32)
    for jj in range(0, NC - LAG - 1):
        j = NC - LAG - 2 - jj
        c = j + LAG + 1
        if c >= C0:
            rows = (c - C0) * BT + o_t
            for g in tl.static_range(G):
                i_h = i_hk * G + g
                qa, qb = _load_pair(QA, i_b * s_qb + i_h * s_qh, rows, s_qn, a0, b0, BA_)
                fq = _pair_features(qa, qb, BT, BA_) * coef
                b_dn = tl.load(DNF + i_b * s_nb + i_h * s_nh + rows[:, None] * s_nn + o_p[None, :],
                               mask=o_p[None, :] <= DV, other=0.0)
                b_u += tl.dot(tl.trans(fq), b_dn)
        o_k = j * BT + o_t
        ka, kb, valid, fk, b_v = _key_chunk(KA, V, VALID, i_b * s_kb + i_hk * s_kh, i_b * s_vb + i_hk * s_vh, o_k,
                                            s_kn, s_vn, i_b * NK, a0, b0, o_p, DV, BT, BA_, True)
        b_v = b_v * valid[:, None]
        tl.atomic_add(DV_ + i_b * s_vb + i_hk * s_vh + o_k[:, None] * s_vn + o_p[None, :], tl.dot(fk, b_u),
                      mask=o_p[None, :] < DV)
        gk = tl.dot(b_v, tl.trans(b_u))  # [BT, BA^2]
        da, db = _pair_vjp(gk, ka, kb, BT, BA_)
        _add_pair(DKA + i_b * s_kb + i_hk * s_kh + o_k[:, None] * s_kn, a0, b0, da, db, BA_)


# ------------------------------------------------------------------------------------------- wrappers
def _tiles(da: int, ba: int, device):
    nb = da // ba
    pairs = [(a, b) for a in range(nb) for b in range(a, nb)]
    ta = torch.tensor([p[0] for p in pairs], dtype=torch.int32, device=device)
    tb = torch.tensor([p[1] for p in pairs], dtype=torch.int32, device=device)
    return ta, tb


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, 1 << (n - 1).bit_length())


class PolyTritonFunction(torch.autograd.Function):
    """(q, k, v, qa, ka) -> (ND direct [num, den], NF far quadratic [num, den], m). See the module docstring."""

    @staticmethod
    def forward(ctx, q, k, v, qa, ka, valid, bound, hasfar, scale, coeffs, band, chunk, softcap, tile):
        count("poly_triton.forward")
        b, h, nq, d = q.shape
        hkv, nk, dv = k.shape[1], k.shape[2], v.shape[-1]
        g = h // hkv
        c0, c1, c2 = (float(c) for c in coeffs)
        lag = math.ceil(band / chunk) if band > 0 else 0
        nd = torch.zeros(b, h, nq, dv + 1, dtype=torch.float32, device=q.device)
        nf = torch.zeros_like(nd)
        m = torch.zeros(b, h, nq, dtype=torch.float32, device=q.device)
        bd, bdv = _pow2(d), _pow2(dv)
        _direct_fwd[(nq // chunk, b * h)](
            q, k, v, valid, bound, hasfar, nd, m, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *nd.stride()[:3],
            nq, nk, h, g, float(scale), int(band), c0, c1, c2, float(softcap or 0.0),
            LAG=lag, D=d, DV=dv, BT=chunk, BD=bd, BDV=bdv, HAS_SOFTCAP=softcap is not None,
        )
        ta, tb = _tiles(qa.shape[-1], tile, q.device)
        bdv_far = min(bdv, 64)
        _far_fwd[(len(ta), b * hkv, triton.cdiv(dv, bdv_far))](
            qa, ka, v, valid, ta, tb, nf, *qa.stride()[:3], *ka.stride()[:3], *v.stride()[:3], *nf.stride()[:3],
            nq, nk, hkv, c2, G=g, LAG=lag, DV=dv, BT=chunk, BDV=bdv_far, BA_=tile,
        )
        ctx.save_for_backward(q, k, v, qa, ka, valid, m)
        ctx.args = (scale, coeffs, band, chunk, softcap, tile)
        ctx.mark_non_differentiable(m)
        return nd, nf, m

    @staticmethod
    def backward(ctx, dnd, dnf, _dm):
        count("poly_triton.backward")
        q, k, v, qa, ka, valid, m = ctx.saved_tensors
        scale, coeffs, band, chunk, softcap, tile = ctx.args
        b, h, nq, d = q.shape
        hkv, nk, dv = k.shape[1], k.shape[2], v.shape[-1]
        g = h // hkv
        c0, c1, c2 = (float(c) for c in coeffs)
        lag = math.ceil(band / chunk) if band > 0 else 0
        dnd, dnf = dnd.float().contiguous(), dnf.float().contiguous()
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
        dvv = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
        _direct_bwd[(nq // chunk, b * h)](
            q, k, v, valid, m, dnd, dq, dk, dvv, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *dnd.stride()[:3],
            nq, nk, h, g, float(scale), int(band), c0, c1, c2, float(softcap or 0.0),
            LAG=lag, D=d, DV=dv, BT=chunk, BD=_pow2(d), BDV=_pow2(dv), HAS_SOFTCAP=softcap is not None,
            num_stages=1,  # unpipelined, to save shared memory (at D = 128 the backward still overflows an H100's)
        )
        dqa = torch.zeros(qa.shape, dtype=torch.float32, device=q.device)
        dka = torch.zeros(ka.shape, dtype=torch.float32, device=q.device)
        ta, tb = _tiles(qa.shape[-1], tile, q.device)
        args = (*qa.stride()[:3], *ka.stride()[:3], *v.stride()[:3], *dnf.stride()[:3], nq, nk, hkv, c2)
        meta = dict(G=g, LAG=lag, DV=dv, BT=chunk, BDP=_pow2(dv + 1), BA_=tile)
        _far_bwd_dq[(len(ta), b * hkv)](qa, ka, v, valid, ta, tb, dnf, dqa, *args, **meta)
        _far_bwd_dkv[(len(ta), b * hkv)](qa, ka, v, valid, ta, tb, dnf, dka, dvv, *args, **meta)
        return (dq.to(q.dtype), dk.to(k.dtype), dvv.to(v.dtype), dqa.to(qa.dtype), dka.to(ka.dtype),
                None, None, None, None, None, None, None, None, None)


def augment(x: torch.Tensor, scale: float, delta: float, query: bool, tile: int = BA) -> torch.Tensor:
    """[.., D] -> [.., D~]: [sqrt(s) x, sign(delta) sqrt|delta| (query side) or sqrt|delta|], zero-padded to a
    multiple of the tile."""
    d = x.shape[-1]
    da = tile * math.ceil((d + 1) / tile)
    const = math.copysign(math.sqrt(abs(delta)), delta) if query else math.sqrt(abs(delta))
    extra = torch.zeros(*x.shape[:-1], da - d, dtype=x.dtype, device=x.device)
    extra[..., 0] = const
    return torch.cat([x * math.sqrt(scale), extra], -1).contiguous()


def poly_triton_attention(q, k, v, scale, coeffs, band=0, chunk=64, softcap=None, kv_valid=None, tile=BA):
    """Degree-2 polynomial attention with the fused kernels: same signature and function as
    `poly_chunk_attention`. q: [B, H, Nq, D], k, v: [B, Hkv, Nk, D]. `tile`: coordinates per feature block
    (8 or 16; a program carries tile^2 features of the state). Measured on an H100 (benchmarks/results/h100):
    fwd+bwd compiles for D <= 64 with tile 8; tile 16 forward only (its backward, and any D = 128 backward,
    overflows shared memory)."""
    if tile not in (8, 16):
        raise ValueError(f"tile must be 8 or 16, got {tile}")
    if len(coeffs) != 3:
        raise ValueError(f"the Triton kernels implement degree 2; got degree {len(coeffs) - 1} (use kernel='torch')")
    if chunk < 16 or chunk & (chunk - 1):
        raise ValueError(f"the Triton kernels need chunk_size a power of two >= 16, got {chunk}")
    c0, c1, c2 = (float(c) for c in coeffs)
    if c2 <= 0:
        raise ValueError("the Triton kernels need a positive leading coefficient")
    nq = q.shape[2]
    qp, kp, vp, valid = pad_to_chunks(q, k, v, kv_valid, chunk)
    b, h, nqp, d = qp.shape
    hkv, nkp = kp.shape[1], kp.shape[2]
    dt = acc_dtype(q.dtype)
    # row shift inputs (as in chunk.py): the far bound and whether a row has far keys at all
    kmax = kp.to(dt).norm(dim=-1).masked_fill(~valid[:, None, :], 0.0).amax(-1)
    bound = far_log_bound(qp.view(b, hkv, h // hkv, nqp, d).to(dt), kmax, scale, coeffs).reshape(b, h, nqp)
    slots = torch.arange(nkp - nqp, nkp, device=q.device)[None]
    hasfar = has_far_key(valid, slots, band).to(torch.int32).contiguous()
    delta = c1 / (2 * c2)
    gamma = c0 - c1 * c1 / (4 * c2)
    qa, ka = augment(qp, scale, delta, True, tile), augment(kp, scale, delta, False, tile)
    valid_i = valid.to(torch.int32).contiguous()
    nd, nf, m = PolyTritonFunction.apply(qp, kp, vp, qa, ka, valid_i,
                                         bound.float().contiguous(), hasfar, float(scale), (c0, c1, c2), int(band),
                                         int(chunk), softcap, int(tile))
    # constant part gamma sum_j [v_j, 1] over the chunks in the state (chunks <= c - lag - 1), in torch
    lag = math.ceil(band / chunk) if band > 0 else 0
    vv = torch.cat([vp.float(), torch.ones_like(vp[..., :1], dtype=torch.float32)], -1) * valid[:, None, :, None]
    per_chunk = vv.view(b, hkv, nkp // chunk, chunk, -1).sum(3).cumsum(2)  # [B, Hkv, NC, D+1]
    c0_chunk = (nkp - nqp) // chunk
    idx = torch.arange(c0_chunk, nkp // chunk, device=q.device) - lag - 1
    state = torch.where((idx >= 0)[:, None], per_chunk[:, :, idx.clamp_min(0)], torch.zeros((), device=q.device))
    const = (gamma * state).repeat_interleave(chunk, dim=2).repeat_interleave(h // hkv, dim=1)  # [B, H, Nq, D+1]
    tot = nd + torch.exp(-m)[..., None] * (nf + const)
    out = tot[..., :-1] / tot[..., -1:].clamp_min(torch.finfo(torch.float32).tiny)
    return out[:, :, :nq].to(q.dtype)
