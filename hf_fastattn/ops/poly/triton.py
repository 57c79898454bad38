"""Fused Triton kernels of degree-2 polynomial attention (forward and backward). CUDA, or CPU under
`TRITON_INTERPRET=1` (how the test suite runs them).

Same function as `chunk.py`, scheduled for tensor cores:

* Augmented vectors. P(z) = c0 + c1 z + c2 z^2 = c2 (z + delta)^2 + gamma with delta = c1 / (2 c2),
  gamma = c0 - c1^2 / (4 c2). With q~ = [sqrt(s) q, sign(delta) sqrt|delta|], k~ = [sqrt(s) k, sqrt|delta|]
  (D + 1 dims, zero-padded to whole blocks), s q.k + delta = q~.k~, so the far part is
  c2 sum_j (q~.k~_j)^2 [v_j, 1] plus the constant gamma sum_j [v_j, 1] (a prefix sum, done in torch).
  Only one feature family remains: products of two coordinates.
* Feature tiles. The D~ x D~ outer product is cut into blocks of BA x BA coordinates; tile (A, B), A <= B,
  holds F = BA^2 features x_a x_b (off-diagonal tiles weigh twice: the symmetric half). A tile's features of
  a block of rows are built on the fly, as the register outer product of two [rows, BA] loads (never written
  to HBM); the VJPs fold the gradient back the same way and add it with atomics (tiles share coordinates).
* Segments instead of a per-chunk state. The prefix state S = sum_j phi(k~_j) v_j^T is stored only at
  segment boundaries (every SEG chunks; `segment` tokens). Query chunk c reads the state of its segment
  boundary s(c) and computes every later key directly (band keys exact, the rest P(x)), like a sliding-window
  flash kernel. So every product is a large tensor-core GEMM with no cross-program reduction of outputs:
  `_state_fwd` sweeps the keys once per (tile, value block) and stores S at the boundaries (float32
  accumulation, stored in the dot dtype), `_far_fwd` reads all tiles of one boundary state per block of
  queries. The backward mirrors it: `_far_bwd_dq` reads S, `_state_bwd` sweeps the query-side state
  U = sum_i coef phi(q~_i) dNF_i^T in reverse, `_far_bwd_v` / `_far_bwd_k` read U per key block.
  State memory is B Hkv (N / segment) r D: `segment` is chosen to keep it under a budget.

Precision: dots of float32 inputs run on TF32 tensor cores (about 1e-3 relative, the tolerance of the GPU
tests); 16-bit inputs feed bf16 dots (fp16 values would overflow in the states), products accumulate in
float32, and the boundary states are accumulated in float32 and stored in bf16 (the operand precision of the
readout GEMM that consumes them).

Measured on an H100 (bf16, H = 16, fwd+bwd; README, benchmarks/results/h100/*-segmented.json): 2.9x SDPA at
128k and 22.7x at 1M for D = 64, 1.2x at 128k and 2.3x at 256k for D = 128; 4-8 % of tensor-core peak.

Variables follow fla: `i_` program ids, `o_` offsets, `m_` masks, `b_` blocks.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..masks import acc_dtype
from ..stats import count
from .chunk import far_log_bound, has_far_key, pad_to_chunks

BA = 16  # default coordinates per feature block: a tile holds BA * BA = 256 features
# Schedule knobs that do not change the function (benchmarks flip them): features flattened in registers or
# gathered, value columns per program of the readouts and of the register-resident state sweeps.
TUNING = {"reshape": True, "bdv_read": 128, "bdv_state": 128}
STATE_BUDGET = 8 * 2**30  # bytes of boundary states `segment="auto"` stays under (the backward adds as much for U)


@triton.jit
def _tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _state_of(c, C0, LAG: tl.constexpr, SEG: tl.constexpr, R: tl.constexpr):
    """Boundary state read by key chunk c's queries: keys of chunks < s * SEG. Chunks of one block of R
    query chunks share it (so `_far_fwd` reads one state per block); s * SEG <= c - LAG keeps the band out."""
    first = C0 + ((c - C0) // R) * R
    return tl.maximum(first - LAG, 0) // SEG


@triton.jit
def _first_reader(s, C0, LAG: tl.constexpr, SEG: tl.constexpr, R: tl.constexpr):
    """The first key chunk whose queries read state s or later (`_state_of` is non-decreasing)."""
    return C0 + R * tl.cdiv(tl.maximum(s * SEG + LAG - C0, 0), R)


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
    return w, dw


@triton.jit
def _direct_fwd(
    Q, K, V, VALID, BOUND, HASFAR, ND, M,
    s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_nb, s_nh, s_nn,
    NQ, NK, H, G, scale, band, c0, c1, c2, softcap,
    LAG: tl.constexpr, SEG: tl.constexpr, R: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr,
    BD: tl.constexpr, BDV: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DT: tl.constexpr,
):
    """Query chunk i_c against the keys after its boundary state (sliding window): ND = [num, den], M = row shift."""
    i_c, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    i_hk = i_h // G
    C0 = (NK - NQ) // BT
    kc = C0 + i_c  # key chunk of the diagonal
    o_t = tl.arange(0, BT)
    o_d, o_dv = tl.arange(0, BD), tl.arange(0, BDV)
    o_q = kc * BT + o_t  # key slots of the query rows
    rows = i_c * BT + o_t
    b_q = tl.load(Q + i_b * s_qb + i_h * s_qh + rows[:, None] * s_qn + o_d[None, :], mask=o_d[None, :] < D, other=0.0)
    p_k = K + i_b * s_kb + i_hk * s_kh + o_d[None, :]
    p_v = V + i_b * s_vb + i_hk * s_vh + o_dv[None, :]
    b_m = tl.full([BT], float("-inf"), tl.float32)
    for kb in range(tl.maximum(kc - LAG, 0), kc + 1):  # pass 1: the largest band logit of every row
        o_k = kb * BT + o_t
        b_k = tl.load(p_k + o_k[:, None] * s_kn, mask=o_d[None, :] < D, other=0.0)
        m_k = tl.load(VALID + i_b * NK + o_k) > 0
        x = tl.dot(b_q, tl.trans(b_k)) * scale  # [BT, BT]
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
    for kb in range(_state_of(kc, C0, LAG, SEG, R) * SEG, kc + 1):  # pass 2: weights
        o_k = kb * BT + o_t
        b_k = tl.load(p_k + o_k[:, None] * s_kn, mask=o_d[None, :] < D, other=0.0)
        b_v = tl.load(p_v + o_k[:, None] * s_vn, mask=o_dv[None, :] < DV, other=0.0)
        m_k = tl.load(VALID + i_b * NK + o_k) > 0
        x = tl.dot(b_q, tl.trans(b_k)) * scale
        w, _ = _direct_weights(x, o_q, o_k, m_k, b_m, band, c0, c1, c2, softcap, HAS_SOFTCAP)
        b_acc += tl.dot(w.to(DT), b_v.to(DT))
        b_den += tl.sum(w, 1)
    p_n = ND + i_b * s_nb + i_h * s_nh + rows[:, None] * s_nn
    tl.store(p_n + o_dv[None, :], b_acc, mask=o_dv[None, :] < DV)
    tl.store(ND + i_b * s_nb + i_h * s_nh + rows * s_nn + DV, b_den)
    tl.store(M + i_bh * NQ + rows, b_m)


@triton.jit
def _direct_bwd(
    Q, K, V, VALID, M, DND, DQ, DK, DV_,
    s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_nb, s_nh, s_nn,
    NQ, NK, H, G, scale, band, c0, c1, c2, softcap,
    LAG: tl.constexpr, SEG: tl.constexpr, R: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr,
    BD: tl.constexpr, BDV: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DT: tl.constexpr,
):
    """dND = dL/d[num, den] of the direct part; dW_ij = dND_i . [v_j, 1]. dq stored, dk/dv added atomically
    (several query chunks read the same keys)."""
    i_c, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    i_hk = i_h // G
    C0 = (NK - NQ) // BT
    kc = C0 + i_c
    o_t = tl.arange(0, BT)
    o_d, o_dv = tl.arange(0, BD), tl.arange(0, BDV)
    o_q = kc * BT + o_t
    rows = i_c * BT + o_t
    b_q = tl.load(Q + i_b * s_qb + i_h * s_qh + rows[:, None] * s_qn + o_d[None, :], mask=o_d[None, :] < D, other=0.0)
    p_dn = DND + i_b * s_nb + i_h * s_nh + rows[:, None] * s_nn
    b_dn = tl.load(p_dn + o_dv[None, :], mask=o_dv[None, :] < DV, other=0.0).to(DT)  # [BT, BDV]
    b_dd = tl.load(DND + i_b * s_nb + i_h * s_nh + rows * s_nn + DV)  # [BT]
    b_m = tl.load(M + i_bh * NQ + rows)
    b_dq = tl.zeros([BT, BD], tl.float32)
    k_off = i_b * s_kb + i_hk * s_kh + o_d[None, :]
    v_off = i_b * s_vb + i_hk * s_vh + o_dv[None, :]
    for kb in range(_state_of(kc, C0, LAG, SEG, R) * SEG, kc + 1):
        o_k = kb * BT + o_t
        b_k = tl.load(K + k_off + o_k[:, None] * s_kn, mask=o_d[None, :] < D, other=0.0)
        b_v = tl.load(V + v_off + o_k[:, None] * s_vn, mask=o_dv[None, :] < DV, other=0.0).to(DT)
        m_k = tl.load(VALID + i_b * NK + o_k) > 0
        x = tl.dot(b_q, tl.trans(b_k)) * scale
        w, dwdx = _direct_weights(x, o_q, o_k, m_k, b_m, band, c0, c1, c2, softcap, HAS_SOFTCAP)
        dw = tl.dot(b_dn, tl.trans(b_v)) + b_dd[:, None]
        dx = (dwdx * dw * scale).to(DT)
        b_dq += tl.dot(dx, b_k.to(DT))
        tl.atomic_add(DK + k_off + o_k[:, None] * s_kn, tl.dot(tl.trans(dx), b_q.to(DT)), mask=o_d[None, :] < D)
        tl.atomic_add(DV_ + v_off + o_k[:, None] * s_vn, tl.dot(tl.trans(w.to(DT)), b_dn), mask=o_dv[None, :] < DV)
    tl.store(DQ + i_b * s_qb + i_h * s_qh + rows[:, None] * s_qn + o_d[None, :], b_dq, mask=o_d[None, :] < D)


# ------------------------------------------------------------------------------------ feature tiles
@triton.jit
def _tile(TA, TB, i_t, BA_: tl.constexpr):
    """First coordinates of tile i_t's blocks A and B."""
    return tl.load(TA + i_t) * BA_, tl.load(TB + i_t) * BA_


@triton.jit
def _coef(a0, b0, c2):
    """A tile's weight: off-diagonal tiles stand for both orders of their coordinate pairs."""
    return tl.where(a0 == b0, c2, 2.0 * c2)


@triton.jit
def _tile_rows(state, t, NT, F: tl.constexpr):
    """Flat row offsets of tile t's F features in state `state` of a [states, NT, F, DV] buffer (int64: the
    buffers pass 2^31 elements at long contexts)."""
    return (state * NT + t).to(tl.int64) * F + tl.arange(0, F)


@triton.jit
def _query_block(i_c, i_bh, NQ, NK, NS, H, G, LAG: tl.constexpr, SEG: tl.constexpr, R: tl.constexpr,
                 BT: tl.constexpr):
    """A readout program's block of R query chunks: batch, head, rows [R BT], row mask [R BT, 1], and the
    boundary state it reads, as (its number s, its index in the [B Hkv NS] states)."""
    i_b, i_h = i_bh // H, i_bh % H
    C0 = (NK - NQ) // BT
    s = _state_of(C0 + i_c * R, C0, LAG, SEG, R)
    rows = i_c * (R * BT) + tl.arange(0, R * BT)
    return i_b, i_h, rows, rows[:, None] < NQ, s, (i_b * (H // G) + i_h // G) * NS + s


@triton.jit
def _key_block(i_j, i_b, VALID, NK, R: tl.constexpr, BT: tl.constexpr):
    """A key program's block of R key chunks: key slots [R BT], row mask [R BT, 1], validity (float)."""
    o_k = i_j * (R * BT) + tl.arange(0, R * BT)
    valid = (tl.load(VALID + i_b * NK + o_k, mask=o_k < NK, other=0) > 0).to(tl.float32)
    return o_k, o_k[:, None] < NK, valid


@triton.jit
def _factors(X, p_rows, a0, b0, m_r, BA_: tl.constexpr):
    """The two gathered factors of the features x_{a0 + f // BA} x_{b0 + f % BA} of a block of rows
    ([rows, F] each, float32). p_rows: [rows, 1] row pointers of X; m_r: [rows, 1] row mask."""
    o_f = tl.arange(0, BA_ * BA_)
    xa = tl.load(X + p_rows + (a0 + o_f // BA_)[None, :], mask=m_r, other=0.0).to(tl.float32)
    xb = tl.load(X + p_rows + (b0 + o_f % BA_)[None, :], mask=m_r, other=0.0).to(tl.float32)
    return xa, xb


@triton.jit
def _features(X, p_rows, a0, b0, m_r, BA_: tl.constexpr, RESHAPE: tl.constexpr):
    """Features of a block of rows, [rows, F] float32: the outer product of two [rows, BA] loads flattened in
    registers (RESHAPE), or the product of the two gathered [rows, F] factors."""
    if RESHAPE:
        o_a = tl.arange(0, BA_)
        xa = tl.load(X + p_rows + (a0 + o_a)[None, :], mask=m_r, other=0.0).to(tl.float32)
        xb = tl.load(X + p_rows + (b0 + o_a)[None, :], mask=m_r, other=0.0).to(tl.float32)
        return tl.reshape(xa[:, :, None] * xb[:, None, :], (p_rows.shape[0], BA_ * BA_))
    else:
        xa, xb = _factors(X, p_rows, a0, b0, m_r, BA_)
        return xa * xb


@triton.jit
def _feature_vjp(X, p_x, G_, p_g, a0, b0, g, rs, m_r, D: tl.constexpr, BA_: tl.constexpr, BS: tl.constexpr,
                 DT: tl.constexpr, RESHAPE: tl.constexpr):
    """Add d/dx of sum(g * features(X rows)) to the same rows of G_ (gradients w.r.t. the unscaled inputs:
    x~ = rs x; the constant coordinate D and the padding are dropped). RESHAPE: g viewed as [rows, BA, BA] and
    summed against the partner block; else products with 0/1 selector matrices [F, BS] (BS = max(BA, 16),
    the smallest tl.dot width) of the gathered factors."""
    if RESHAPE:
        o_a = tl.arange(0, BA_)
        xa = tl.load(X + p_x + (a0 + o_a)[None, :], mask=m_r, other=0.0).to(tl.float32)
        xb = tl.load(X + p_x + (b0 + o_a)[None, :], mask=m_r, other=0.0).to(tl.float32)
        g3 = tl.reshape(g, (p_x.shape[0], BA_, BA_))
        da = tl.sum(g3 * xb[:, None, :], 2) * rs  # [rows, BA]
        db = tl.sum(g3 * xa[:, :, None], 1) * rs
        tl.atomic_add(G_ + p_g + (a0 + o_a)[None, :], da, mask=m_r & ((a0 + o_a)[None, :] < D))
        tl.atomic_add(G_ + p_g + (b0 + o_a)[None, :], db, mask=m_r & ((b0 + o_a)[None, :] < D))
    else:
        xa, xb = _factors(X, p_x, a0, b0, m_r, BA_)
        o_f, o_s = tl.arange(0, BA_ * BA_), tl.arange(0, BS)
        sel_a = ((o_f[:, None] // BA_) == o_s[None, :]).to(DT)
        sel_b = ((o_f[:, None] % BA_) == o_s[None, :]).to(DT)
        da = tl.dot((g * xb).to(DT), sel_a) * rs  # [rows, BS]
        db = tl.dot((g * xa).to(DT), sel_b) * rs
        ok = o_s[None, :] < BA_
        tl.atomic_add(G_ + p_g + (a0 + o_s)[None, :], da, mask=m_r & ok & ((a0 + o_s)[None, :] < D))
        tl.atomic_add(G_ + p_g + (b0 + o_s)[None, :], db, mask=m_r & ok & ((b0 + o_s)[None, :] < D))


@triton.jit
def _state_fwd(
    KA, V, VALID, TA, TB, S, SD,
    s_kb, s_kh, s_kn, s_vb, s_vh, s_vn,
    NK, HKV, NS, NT,
    SEG: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BDV: tl.constexpr, BA_: tl.constexpr, DT: tl.constexpr,
    RESHAPE: tl.constexpr,
):
    """Keys sweep of tile i_t, value block i_e: stores S_s = sum over chunks < s SEG of phi(k~) v^T for every
    boundary s < NS ([F, BDV] float32 in registers, stored as DT) and the denominator state SD_s = sum phi(k~)."""
    i_t, i_bh, i_e = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2)
    i_b, i_hk = i_bh // HKV, i_bh % HKV
    a0, b0 = _tile(TA, TB, i_t, BA_)
    F: tl.constexpr = BA_ * BA_
    o_t = tl.arange(0, BT)
    o_e = i_e * BDV + tl.arange(0, BDV)
    m_e = o_e[None, :] < DV
    b_s = tl.zeros([F, BDV], tl.float32)
    b_sd = tl.zeros([F], tl.float32)
    for s in range(0, NS):
        p_s = _tile_rows(i_bh * NS + s, i_t, NT, F)
        tl.store(S + p_s[:, None] * DV + o_e[None, :], b_s.to(DT), mask=m_e)
        if i_e == 0:
            tl.store(SD + p_s, b_sd)
        if s < NS - 1:
            for j in range(s * SEG, (s + 1) * SEG):
                o_k = j * BT + o_t
                valid = (tl.load(VALID + i_b * NK + o_k) > 0).to(tl.float32)
                fk = _features(KA, i_b * s_kb + i_hk * s_kh + o_k[:, None] * s_kn, a0, b0, o_t[:, None] < BT, BA_,
                               RESHAPE) * valid[:, None]
                b_v = tl.load(V + i_b * s_vb + i_hk * s_vh + o_k[:, None] * s_vn + o_e[None, :], mask=m_e, other=0.0)
                b_s += tl.dot(tl.trans(fk.to(DT)), b_v.to(DT))
                b_sd += tl.sum(fk, 0)


@triton.jit
def _far_fwd(
    QA, S, SD, TA, TB, NF,
    s_qb, s_qh, s_qn, s_nb, s_nh, s_nn,
    NQ, NK, H, G, NS, NT, c2,
    LAG: tl.constexpr, SEG: tl.constexpr, R: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BDV: tl.constexpr,
    BA_: tl.constexpr, DT: tl.constexpr, RESHAPE: tl.constexpr,
):
    """Far part NF = [num, den] of a block of R query chunks, value block i_e: sum over tiles of
    coef phi(q~) S_s (all tiles of one boundary state; no cross-program reduction)."""
    i_c, i_bh, i_e = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2)
    i_b, i_h, rows, m_r, s, state = _query_block(i_c, i_bh, NQ, NK, NS, H, G, LAG, SEG, R, BT)
    F: tl.constexpr = BA_ * BA_
    o_e = i_e * BDV + tl.arange(0, BDV)
    m_e = o_e[None, :] < DV
    b_acc = tl.zeros([R * BT, BDV], tl.float32)
    b_den = tl.zeros([R * BT], tl.float32)
    if s > 0:
        p_q = i_b * s_qb + i_h * s_qh + rows[:, None] * s_qn
        for t in range(0, NT):
            a0, b0 = _tile(TA, TB, t, BA_)
            coef = _coef(a0, b0, c2)
            fq = _features(QA, p_q, a0, b0, m_r, BA_, RESHAPE) * coef
            p_s = _tile_rows(state, t, NT, F)
            b_s = tl.load(S + p_s[:, None] * DV + o_e[None, :], mask=m_e, other=0.0)
            b_acc += tl.dot(fq.to(DT), b_s.to(DT))
            if i_e == 0:
                b_den += tl.sum(fq * tl.load(SD + p_s)[None, :], 1)
    p_n = NF + i_b * s_nb + i_h * s_nh + rows[:, None] * s_nn
    tl.store(p_n + o_e[None, :], b_acc, mask=m_r & m_e)
    if i_e == 0:
        tl.store(NF + i_b * s_nb + i_h * s_nh + rows * s_nn + DV, b_den, mask=rows < NQ)


@triton.jit
def _far_bwd_dq(
    QA, S, SD, TA, TB, DNF, DQ,
    s_qb, s_qh, s_qn, s_nb, s_nh, s_nn, s_db, s_dh, s_dn,
    NQ, NK, H, G, NS, NT, c2, rs,
    LAG: tl.constexpr, SEG: tl.constexpr, R: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr,
    BDV: tl.constexpr, BA_: tl.constexpr, BS: tl.constexpr, DT: tl.constexpr, RESHAPE: tl.constexpr,
):
    """dq of the far part: per tile, g = coef (dNF_num S^T + dNF_den SD) [rows, F], then the features' VJP."""
    i_c, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    i_b, i_h, rows, m_r, s, state = _query_block(i_c, i_bh, NQ, NK, NS, H, G, LAG, SEG, R, BT)
    F: tl.constexpr = BA_ * BA_
    if s > 0:
        p_q = i_b * s_qb + i_h * s_qh + rows[:, None] * s_qn
        p_dq = i_b * s_db + i_h * s_dh + rows[:, None] * s_dn
        p_dn = DNF + i_b * s_nb + i_h * s_nh + rows[:, None] * s_nn
        b_dd = tl.load(DNF + i_b * s_nb + i_h * s_nh + rows * s_nn + DV, mask=rows < NQ, other=0.0)
        for t in range(0, NT):
            a0, b0 = _tile(TA, TB, t, BA_)
            coef = _coef(a0, b0, c2)
            p_s = _tile_rows(state, t, NT, F)
            g = b_dd[:, None] * tl.load(SD + p_s)[None, :]
            for e0 in tl.static_range(0, DV, BDV):
                o_e = e0 + tl.arange(0, BDV)
                b_dn = tl.load(p_dn + o_e[None, :], mask=m_r & (o_e[None, :] < DV), other=0.0)
                b_s = tl.load(S + p_s[:, None] * DV + o_e[None, :], mask=o_e[None, :] < DV, other=0.0)
                g += tl.dot(b_dn.to(DT), tl.trans(b_s.to(DT)))
            _feature_vjp(QA, p_q, DQ, p_dq, a0, b0, g * coef, rs, m_r, D, BA_, BS, DT, RESHAPE)


@triton.jit
def _state_bwd(
    QA, DNF, TA, TB, U, UD,
    s_qb, s_qh, s_qn, s_nb, s_nh, s_nn,
    NQ, NK, HKV, NS, NT, c2,
    G: tl.constexpr, LAG: tl.constexpr, SEG: tl.constexpr, R: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr,
    BDV: tl.constexpr, BA_: tl.constexpr, DT: tl.constexpr, RESHAPE: tl.constexpr,
):
    """Reverse sweep of the query-side state: U_s = sum over query chunks c with state(c) > s of
    coef phi(q~_c)^T dNF_c (numerator columns, value block i_e) and UD_s the same with the denominator
    column; stored for key segments s < NS - 1 (segment s is in the states s + 1, s + 2, ...)."""
    i_t, i_bh, i_e = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2)
    i_b, i_hk = i_bh // HKV, i_bh % HKV
    a0, b0 = _tile(TA, TB, i_t, BA_)
    coef = _coef(a0, b0, c2)
    F: tl.constexpr = BA_ * BA_
    o_t = tl.arange(0, BT)
    o_e = i_e * BDV + tl.arange(0, BDV)
    m_e = o_e[None, :] < DV
    NC = NK // BT
    C0 = (NK - NQ) // BT
    b_u = tl.zeros([F, BDV], tl.float32)
    b_ud = tl.zeros([F], tl.float32)
    for ss in range(0, NS - 1):
        s = NS - 2 - ss
        # the query chunks whose state is exactly s + 1 (bounds recomputed: a loop-carried bound miscompiles)
        lo = _first_reader(s + 1, C0, LAG, SEG, R)
        hi = tl.minimum(_first_reader(s + 2, C0, LAG, SEG, R), NC)
        for c in range(lo, hi):
            rows = (c - C0) * BT + o_t
            for g in tl.static_range(G):
                i_h = i_hk * G + g
                fq = _features(QA, i_b * s_qb + i_h * s_qh + rows[:, None] * s_qn, a0, b0, o_t[:, None] < BT, BA_,
                               RESHAPE) * coef
                p_dn = DNF + i_b * s_nb + i_h * s_nh + rows[:, None] * s_nn
                b_dn = tl.load(p_dn + o_e[None, :], mask=m_e, other=0.0)
                b_u += tl.dot(tl.trans(fq.to(DT)), b_dn.to(DT))
                if i_e == 0:
                    b_ud += tl.sum(fq * tl.load(DNF + i_b * s_nb + i_h * s_nh + rows * s_nn + DV)[:, None], 0)
        p_u = _tile_rows(i_bh * (NS - 1) + s, i_t, NT, F)
        tl.store(U + p_u[:, None] * DV + o_e[None, :], b_u.to(DT), mask=m_e)
        if i_e == 0:
            tl.store(UD + p_u, b_ud)


@triton.jit
def _far_bwd_v(
    KA, VALID, U, TA, TB, DV_,
    s_kb, s_kh, s_kn, s_vb, s_vh, s_vn,
    NK, HKV, NS, NT,
    SEG: tl.constexpr, R: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BDV: tl.constexpr, BA_: tl.constexpr,
    DT: tl.constexpr, RESHAPE: tl.constexpr,
):
    """dv of the far part for a block of R key chunks (one segment): sum over tiles of phi(k~) U_s."""
    i_j, i_bh, i_e = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2)
    i_b, i_hk = i_bh // HKV, i_bh % HKV
    F: tl.constexpr = BA_ * BA_
    s = (i_j * R) // SEG
    if s < NS - 1:
        o_k, m_r, valid = _key_block(i_j, i_b, VALID, NK, R, BT)
        o_e = i_e * BDV + tl.arange(0, BDV)
        m_e = o_e[None, :] < DV
        p_k = i_b * s_kb + i_hk * s_kh + o_k[:, None] * s_kn
        b_acc = tl.zeros([R * BT, BDV], tl.float32)
        for t in range(0, NT):
            a0, b0 = _tile(TA, TB, t, BA_)
            fk = _features(KA, p_k, a0, b0, m_r, BA_, RESHAPE)
            p_u = _tile_rows(i_bh * (NS - 1) + s, t, NT, F)
            b_u = tl.load(U + p_u[:, None] * DV + o_e[None, :], mask=m_e, other=0.0)
            b_acc += tl.dot(fk.to(DT), b_u.to(DT))
        p_dv = DV_ + i_b * s_vb + i_hk * s_vh + o_k[:, None] * s_vn + o_e[None, :]
        # one program per key block: a plain read-add-write after `_direct_bwd` (same stream) is race-free
        tl.store(p_dv, tl.load(p_dv, mask=m_r & m_e) + b_acc * valid[:, None], mask=m_r & m_e)


@triton.jit
def _far_bwd_k(
    KA, V, VALID, U, UD, TA, TB, DK,
    s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_db, s_dh, s_dn,
    NK, HKV, NS, NT, rs,
    SEG: tl.constexpr, R: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BDV: tl.constexpr,
    BA_: tl.constexpr, BS: tl.constexpr, DT: tl.constexpr, RESHAPE: tl.constexpr,
):
    """dk of the far part: per tile, g = v U_s^T + UD_s ([rows, F], the values' column of ones gives UD),
    then the features' VJP."""
    i_j, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    i_b, i_hk = i_bh // HKV, i_bh % HKV
    F: tl.constexpr = BA_ * BA_
    s = (i_j * R) // SEG
    if s < NS - 1:
        o_k, m_r, valid = _key_block(i_j, i_b, VALID, NK, R, BT)
        p_k = i_b * s_kb + i_hk * s_kh + o_k[:, None] * s_kn
        p_dk = i_b * s_db + i_hk * s_dh + o_k[:, None] * s_dn
        p_v = V + i_b * s_vb + i_hk * s_vh + o_k[:, None] * s_vn
        for t in range(0, NT):
            a0, b0 = _tile(TA, TB, t, BA_)
            p_u = _tile_rows(i_bh * (NS - 1) + s, t, NT, F)
            g = tl.zeros([R * BT, F], tl.float32) + tl.load(UD + p_u)[None, :]
            for e0 in tl.static_range(0, DV, BDV):
                o_e = e0 + tl.arange(0, BDV)
                b_v = tl.load(p_v + o_e[None, :], mask=m_r & (o_e[None, :] < DV), other=0.0)
                b_u = tl.load(U + p_u[:, None] * DV + o_e[None, :], mask=o_e[None, :] < DV, other=0.0)
                g += tl.dot(b_v.to(DT), tl.trans(b_u.to(DT)))
            _feature_vjp(KA, p_k, DK, p_dk, a0, b0, g * valid[:, None], rs, m_r, D, BA_, BS, DT, RESHAPE)


# ------------------------------------------------------------------------------------------- wrappers
def _tiles(da: int, ba: int, device):
    nb = da // ba
    pairs = [(a, b) for a in range(nb) for b in range(a, nb)]
    ta = torch.tensor([p[0] for p in pairs], dtype=torch.int32, device=device)
    tb = torch.tensor([p[1] for p in pairs], dtype=torch.int32, device=device)
    return ta, tb


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, 1 << (n - 1).bit_length())


def _dot_dtypes(dtype: torch.dtype):
    """(triton dot dtype, torch state dtype): 16-bit inputs use bf16 (fp16 states would overflow), else float32."""
    if dtype in (torch.bfloat16, torch.float16):
        return tl.bfloat16, torch.bfloat16
    return tl.float32, torch.float32


def state_of_chunks(nq_chunks: int, nk_chunks: int, lag: int, seg: int, r: int) -> torch.Tensor:
    """The boundary state index of every query chunk (torch twin of the `_state_of` jit helper)."""
    c0 = nk_chunks - nq_chunks
    c = torch.arange(c0, nk_chunks)
    first = c0 + ((c - c0) // r) * r
    return (first - lag).clamp_min(0) // seg


class _Plan:
    """Launch geometry shared by the forward and backward: chunk, band lag, segment, tiles, blocks."""

    def __init__(self, q, k, v, band, chunk, tile, segment, rows_per_block):
        b, h, nq, d = q.shape
        self.b, self.h, self.nq, self.d = b, h, nq, d
        self.hkv, self.nk, self.dv = k.shape[1], k.shape[2], v.shape[-1]
        self.g = h // self.hkv
        self.chunk, self.tile = chunk, tile
        self.lag = math.ceil(band / chunk) if band > 0 else 0
        self.r = rows_per_block
        self.da = tile * math.ceil((d + 1) / tile)
        self.nt = (self.da // tile) * (self.da // tile + 1) // 2
        self.seg = segment // chunk
        nc = self.nk // chunk
        self.ns = int(state_of_chunks(nq // chunk, nc, self.lag, self.seg, self.r).max()) + 1
        self.dt, self.state_dtype = _dot_dtypes(q.dtype)
        self.bd, self.bdv = _pow2(d), _pow2(self.dv)
        self.bdv_read, self.bdv_state = min(self.bdv, TUNING["bdv_read"]), min(self.bdv, TUNING["bdv_state"])
        self.reshape = TUNING["reshape"]
        self.bs = max(tile, 16)
        # warps: a [256, 128] float32 state slice (tile 16) needs 8 to stay (mostly) in registers
        self.nw_far = 8 if tile == 16 or rows_per_block * chunk > 128 else 4
        self.nw_direct = 8 if d > 64 else 4
        self.stages_far = 1 if tile == 16 else 2  # tile 16's [rows, 256] operands overflow shared memory pipelined

    def meta(self, **extra):
        """Compile-time arguments every feature-tile kernel takes."""
        return dict(DV=self.dv, BT=self.chunk, BA_=self.tile, DT=self.dt, num_warps=self.nw_far,
                    num_stages=self.stages_far, **extra)


def auto_segment(b, hkv, nk, d, dv, chunk, tile, itemsize, budget=STATE_BUDGET):
    """Smallest power-of-two segment (>= 8 chunks, >= 512 tokens) whose boundary states fit `budget` bytes."""
    da = tile * math.ceil((d + 1) / tile)
    per_state = b * hkv * da * (da + tile) // 2 * (dv * itemsize + 4)
    seg = max(512, 8 * chunk)
    while (nk // seg + 1) * per_state > budget and seg < nk:
        seg *= 2
    return seg


class PolyTritonFunction(torch.autograd.Function):
    """(q, k, v) -> (ND direct [num, den], NF far quadratic [num, den], m). See the module docstring."""

    @staticmethod
    def forward(ctx, q, k, v, valid, bound, hasfar, scale, coeffs, band, chunk, softcap, tile, segment, rows):
        count("poly_triton.forward")
        p = _Plan(q, k, v, band, chunk, tile, segment, rows)
        c0, c1, c2 = (float(c) for c in coeffs)
        nd = torch.zeros(p.b, p.h, p.nq, p.dv + 1, dtype=torch.float32, device=q.device)
        nf = torch.zeros_like(nd)
        m = torch.zeros(p.b, p.h, p.nq, dtype=torch.float32, device=q.device)
        _direct_fwd[(p.nq // chunk, p.b * p.h)](
            q, k, v, valid, bound, hasfar, nd, m, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *nd.stride()[:3],
            p.nq, p.nk, p.h, p.g, float(scale), int(band), c0, c1, c2, float(softcap or 0.0),
            LAG=p.lag, SEG=p.seg, R=p.r, D=p.d, DV=p.dv, BT=chunk, BD=p.bd, BDV=p.bdv,
            HAS_SOFTCAP=softcap is not None, DT=p.dt, num_warps=p.nw_direct,
        )
        states = ()
        if p.ns > 1:  # some query chunk reads a non-empty state
            qa, ka = _augmented(q, k, scale, coeffs, tile)
            ta, tb = _tiles(p.da, tile, q.device)
            n_s = p.b * p.hkv * p.ns * p.nt * tile * tile
            st = torch.empty(n_s, p.dv, dtype=p.state_dtype, device=q.device)
            sd = torch.empty(n_s, dtype=torch.float32, device=q.device)
            _state_fwd[(p.nt, p.b * p.hkv, triton.cdiv(p.dv, p.bdv_state))](
                ka, v, valid, ta, tb, st, sd, *ka.stride()[:3], *v.stride()[:3], p.nk, p.hkv, p.ns, p.nt,
                SEG=p.seg, BDV=p.bdv_state, **p.meta(RESHAPE=p.reshape),
            )
            _far_fwd[(triton.cdiv(p.nq, chunk * p.r), p.b * p.h, triton.cdiv(p.dv, p.bdv_read))](
                qa, st, sd, ta, tb, nf, *qa.stride()[:3], *nf.stride()[:3], p.nq, p.nk, p.h, p.g, p.ns, p.nt, c2,
                LAG=p.lag, SEG=p.seg, R=p.r, BDV=p.bdv_read, **p.meta(RESHAPE=p.reshape),
            )
            states = (st, sd)
        ctx.save_for_backward(q, k, v, valid, m, *states)
        ctx.args = (scale, coeffs, band, chunk, softcap, tile, segment, rows)
        ctx.mark_non_differentiable(m)
        return nd, nf, m

    @staticmethod
    def backward(ctx, dnd, dnf, _dm):
        count("poly_triton.backward")
        q, k, v, valid, m, *states = ctx.saved_tensors
        scale, coeffs, band, chunk, softcap, tile, segment, rows = ctx.args
        p = _Plan(q, k, v, band, chunk, tile, segment, rows)
        c0, c1, c2 = (float(c) for c in coeffs)
        dnd, dnf = dnd.float().contiguous(), dnf.float().contiguous()
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
        dvv = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
        _direct_bwd[(p.nq // chunk, p.b * p.h)](
            q, k, v, valid, m, dnd, dq, dk, dvv, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *dnd.stride()[:3],
            p.nq, p.nk, p.h, p.g, float(scale), int(band), c0, c1, c2, float(softcap or 0.0),
            LAG=p.lag, SEG=p.seg, R=p.r, D=p.d, DV=p.dv, BT=chunk, BD=p.bd, BDV=p.bdv,
            HAS_SOFTCAP=softcap is not None, DT=p.dt, num_warps=p.nw_direct,
        )
        if states:
            st, sd = states
            qa, ka = _augmented(q, k, scale, coeffs, tile)
            ta, tb = _tiles(p.da, tile, q.device)
            F, rs = tile * tile, math.sqrt(scale)
            nqb, nkb = triton.cdiv(p.nq, chunk * p.r), triton.cdiv(p.nk, chunk * p.r)
            _far_bwd_dq[(nqb, p.b * p.h)](
                qa, st, sd, ta, tb, dnf, dq, *qa.stride()[:3], *dnf.stride()[:3], *dq.stride()[:3],
                p.nq, p.nk, p.h, p.g, p.ns, p.nt, c2, rs,
                LAG=p.lag, SEG=p.seg, R=p.r, D=p.d, BDV=p.bdv_read, BS=p.bs, **p.meta(RESHAPE=p.reshape),
            )
            n_u = p.b * p.hkv * (p.ns - 1) * p.nt * F
            u = torch.empty(n_u, p.dv, dtype=p.state_dtype, device=q.device)
            ud = torch.empty(n_u, dtype=torch.float32, device=q.device)
            _state_bwd[(p.nt, p.b * p.hkv, triton.cdiv(p.dv, p.bdv_state))](
                qa, dnf, ta, tb, u, ud, *qa.stride()[:3], *dnf.stride()[:3], p.nq, p.nk, p.hkv, p.ns, p.nt, c2,
                G=p.g, LAG=p.lag, SEG=p.seg, R=p.r, BDV=p.bdv_state, **p.meta(RESHAPE=p.reshape),
            )
            _far_bwd_v[(nkb, p.b * p.hkv, triton.cdiv(p.dv, p.bdv_read))](
                ka, valid, u, ta, tb, dvv, *ka.stride()[:3], *dvv.stride()[:3], p.nk, p.hkv, p.ns, p.nt,
                SEG=p.seg, R=p.r, BDV=p.bdv_read, **p.meta(RESHAPE=p.reshape),
            )
            _far_bwd_k[(nkb, p.b * p.hkv)](
                ka, v, valid, u, ud, ta, tb, dk, *ka.stride()[:3], *v.stride()[:3], *dk.stride()[:3],
                p.nk, p.hkv, p.ns, p.nt, rs,
                SEG=p.seg, R=p.r, D=p.d, BDV=p.bdv_read, BS=p.bs, **p.meta(RESHAPE=p.reshape),
            )
        return (dq.to(q.dtype), dk.to(k.dtype), dvv.to(v.dtype)) + (None,) * 11


def augment(x: torch.Tensor, scale: float, delta: float, query: bool, tile: int = BA) -> torch.Tensor:
    """[.., D] -> [.., D~]: [sqrt(s) x, sign(delta) sqrt|delta| (query side) or sqrt|delta|], zero-padded to a
    multiple of the tile."""
    d = x.shape[-1]
    da = tile * math.ceil((d + 1) / tile)
    const = math.copysign(math.sqrt(abs(delta)), delta) if query else math.sqrt(abs(delta))
    extra = torch.zeros(*x.shape[:-1], da - d, dtype=x.dtype, device=x.device)
    extra[..., 0] = const
    return torch.cat([x * math.sqrt(scale), extra], -1).contiguous()


def _augmented(q, k, scale, coeffs, tile):
    delta = coeffs[1] / (2 * coeffs[2])
    return augment(q, scale, delta, True, tile), augment(k, scale, delta, False, tile)


def poly_triton_attention(q, k, v, scale, coeffs, band=0, chunk=64, softcap=None, kv_valid=None, tile=BA,
                          segment="auto", rows_per_block=2):
    """Degree-2 polynomial attention with the fused kernels: same signature and function as
    `poly_chunk_attention`. q: [B, H, Nq, D], k, v: [B, Hkv, Nk, D].

    tile: coordinates per feature block (8 or 16; a tile is tile^2 features). segment: tokens between stored
    prefix states (a power of two, >= chunk * rows_per_block; "auto" keeps the states under 8 GiB). Keys after a
    query's boundary state are computed directly, so larger segments trade state memory for direct work.
    rows_per_block: query chunks per program of the state readouts (1, 2 or 4)."""
    if tile not in (8, 16):
        raise ValueError(f"tile must be 8 or 16, got {tile}")
    if rows_per_block not in (1, 2, 4):
        raise ValueError(f"rows_per_block must be 1, 2 or 4, got {rows_per_block}")
    if len(coeffs) != 3:
        raise ValueError(f"the Triton kernels implement degree 2; got degree {len(coeffs) - 1} (use kernel='torch')")
    if chunk < 16 or chunk & (chunk - 1):
        raise ValueError(f"the Triton kernels need chunk_size a power of two >= 16, got {chunk}")
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"the Triton kernels take float32, bfloat16 or float16 inputs, got {q.dtype} "
                         "(use kernel='torch')")
    c0, c1, c2 = (float(c) for c in coeffs)
    if c2 <= 0:
        raise ValueError("the Triton kernels need a positive leading coefficient")
    nq = q.shape[2]
    qp, kp, vp, valid = pad_to_chunks(q, k, v, kv_valid, chunk)
    b, h, nqp, d = qp.shape
    hkv, nkp, dv = kp.shape[1], kp.shape[2], vp.shape[-1]
    if segment == "auto":
        item = 4 if q.dtype == torch.float32 else 2
        segment = auto_segment(b, hkv, nkp, d, dv, chunk, tile, item)
    if not isinstance(segment, int) or segment & (segment - 1) or segment < chunk * rows_per_block:
        raise ValueError(f"segment must be 'auto' or a power of two >= chunk_size * rows_per_block "
                         f"({chunk * rows_per_block}), got {segment!r}")
    dt = acc_dtype(q.dtype)
    # row shift inputs (as in chunk.py): the far bound and whether a row has far keys at all
    kmax = kp.to(dt).norm(dim=-1).masked_fill(~valid[:, None, :], 0.0).amax(-1)
    bound = far_log_bound(qp.view(b, hkv, h // hkv, nqp, d).to(dt), kmax, scale, coeffs).reshape(b, h, nqp)
    slots = torch.arange(nkp - nqp, nkp, device=q.device)[None]
    hasfar = has_far_key(valid, slots, band).to(torch.int32).contiguous()
    valid_i = valid.to(torch.int32).contiguous()
    nd, nf, m = PolyTritonFunction.apply(qp, kp, vp, valid_i, bound.float().contiguous(), hasfar, float(scale),
                                         (c0, c1, c2), int(band), int(chunk), softcap, int(tile), int(segment),
                                         int(rows_per_block))
    # constant part gamma sum_j [v_j, 1] over the keys in each query chunk's boundary state, in torch
    lag = math.ceil(band / chunk) if band > 0 else 0
    gamma = c0 - c1 * c1 / (4 * c2)
    vv = torch.cat([vp.float(), torch.ones_like(vp[..., :1], dtype=torch.float32)], -1) * valid[:, None, :, None]
    per_chunk = vv.view(b, hkv, nkp // chunk, chunk, -1).sum(3).cumsum(2)  # [B, Hkv, NC, D+1]
    last = state_of_chunks(nqp // chunk, nkp // chunk, lag, segment // chunk, rows_per_block).to(q.device)
    last = last * (segment // chunk) - 1  # the last chunk inside the state
    state = torch.where((last >= 0)[:, None], per_chunk[:, :, last.clamp_min(0)], torch.zeros((), device=q.device))
    const = (gamma * state).repeat_interleave(chunk, dim=2).repeat_interleave(h // hkv, dim=1)  # [B, H, Nq, D+1]
    tot = nd + torch.exp(-m)[..., None] * (nf + const)
    den = tot[..., -1:]
    # a row that sees no valid key (left padding) has num = den = 0: output 0 with a finite gradient
    out = tot[..., :-1] / torch.where(den > 0, den, torch.ones_like(den))
    return out[:, :, :nq].to(q.dtype)
