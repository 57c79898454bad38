"""Fused Triton kernels of degree-2 polynomial attention (forward and backward). CUDA, or CPU under
`TRITON_INTERPRET=1` (how the test suite runs them).

Same function as `chunk.py`, scheduled for tensor cores:

* Feature blocks. P(s q.k) = c2 s^2 (q.k)^2 + c1 s q.k + c0 = sum over features phi_q(q) phi_k(k), features
  of the unscaled q and k; the weights (scale included) are multiplied into the stored states (S, U below) by
  the sweeps, so every feature is a plain product of coordinates (exact in bf16 for bf16 inputs, which are
  multiplied in bf16: half the instructions of a float32 build and round). Two kinds of blocks:
  quadratic tiles (A, B), A <= B, of BA x BA coordinates, F = BA^2 features x_a x_b (weight c2 s^2, or twice
  that off the diagonal: the symmetric half), built as the register outer product of two [rows, BA] loads;
  and linear blocks of BL = 16 coordinates of [x, 1], F = 16 features (weight c1 s, and c0 on the constant
  coordinate D). So D = 128 has 36 tiles + 9 linear blocks (9360 feature rows), with no padding of the
  quadratic part; features are never written to HBM. Invalid (padding) keys enter as zero rows, so only the
  constant feature needs their mask. The VJPs fold a block's gradient back onto its coordinates and add it
  with atomics (blocks share coordinates).
* Segments instead of a per-chunk state. The prefix state S = sum_j phi_k(k_j) v_j^T is stored only at
  segment boundaries (every SEG chunks; `segment` tokens). A block of R query chunks reads the state of its
  boundary and computes every later key directly (band keys exact, the rest P(x)), like a sliding-window
  flash kernel. So every product is a tensor-core GEMM with no cross-program reduction of outputs:
  `_state_fwd` sweeps the keys once per (block, value block) and stores S at the boundaries (float32
  accumulation, stored in the dot dtype); `_fwd` reads all blocks of one boundary state, adds the direct
  window and writes the normalised output (plus the row shift m and denominator: no [N, D] float32 partials).
  The backward mirrors it: `_direct_bwd_q` forms dL/d[num, den] from (dout, out, den) on the fly and
  `_direct_bwd_kv` takes the direct windows key-major (no atomics),
  `_far_bwd_dq` reads S, `_state_bwd` sweeps the query-side state U = sum_i phi_q(q_i) dNF_i^T in reverse,
  `_far_bwd_v` / `_far_bwd_k` read U per key block. State memory is B Hkv (N / segment) 9360 D (D = 128):
  `segment` is chosen to keep it under a budget. Between forward and backward only q, k, v, out and two
  floats per row are kept, as in FlashAttention: the backward reruns the key sweep (`save_states=True`
  keeps the states instead, one sweep less for up to the budget per layer until the backward).

Precision: dots of float32 inputs run on TF32 tensor cores (about 1e-3 relative, the tolerance of the GPU
tests); 16-bit inputs feed bf16 dots (fp16 values would overflow in the states), products accumulate in
float32, and the boundary states are accumulated in float32 and stored in bf16 (the operand precision of the
readout GEMM that consumes them). A tile's denominator column is kept as a [BA, BA] float32 matrix, updated /
read with small dots of float32 precision (sum_r w_r xa_r xb_r^T, xa^T SD xb): on the FMA units, or for bf16
inputs on the tensor cores, where bf16 coordinates are exact operands and a float32 factor enters as the sum of
two bf16 terms (about 2^-17 of itself).

Measured on an H100 with the previous layout (augmented [sqrt(s) x, sqrt|delta|] coordinates padded to 144,
a torch epilogue; README, benchmarks/results/h100/*-segmented.json): 2.9x SDPA at 128k and 22.7x at 1M for
D = 64, 1.2x at 128k and 2.3x at 256k for D = 128. This layout has 19 % (D = 128) to 31 % (D = 64) fewer
feature rows and no float32 [N, D + 1] buffers. Its schedule was read off the sm_90 compile report of
`scripts/compile_poly.py`, which compiles every launch as Triton specialises it: the measured kernels ran every
feature-block loop unpipelined (num_stages=1) and spilled 4.2 KB at D = 128 (bf16); here every loop that loads is
software-pipelined (`TUNING` stages_read / stages_sweep; `_launch` lowers the depth where a variant exceeds the
GPU's shared memory), no kernel's wgmma is serialised, and only the key sweep spills (1.5 KB at D = 128, at
segment boundaries). Direct-window blocks whose keys are all at least `band` before every row skip the band's
masks and exponentials. At 1M tokens and D = 128 a forward + backward holds about 54 GiB (125 before: out of
memory). Its GPU timings are owed.

Variables follow fla: `i_` program ids, `o_` offsets, `m_` masks, `b_` blocks.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from ..sinks import fold_sink, sink_grad
from ..stats import count
from .chunk import far_log_bound, has_far_key, pad_to_chunks

BA = 16  # default coordinates per quadratic tile: a tile holds BA * BA = 256 features
READ_ROWS = 128  # query rows per readout program by default (`default_rows`): every [F, BDV] state slice it
# reads from L2 serves that many rows (64 rows make 64 FLOP per byte, under the ~180 an H100's L2 feeds); 2 chunks
# of 64 measured faster than 1 on an H100 (02f0c00)
BL = 16  # coordinates per linear block (the smallest bf16 tl.dot width)
_BL = tl.constexpr(BL)  # the same, for jit code (globals read there must be constexpr)
# Schedule knobs that do not change the function (benchmarks flip them): features flattened in registers or
# gathered, value columns per program of the readouts and of the register-resident state sweeps (a sweep builds
# the same features for every value block; at 64 the static model of `scripts/compile_poly.py` had the key sweep
# issue-bound at 50 % of the tensor-core rate, at 128 MMA-bound, before its bf16 features halved its loop),
# key_major: the direct window's dk / dv in a key-major pass (stored) instead of atomic adds from the query
# pass, and the software-pipelining depth of the loops of the
# readouts (feature blocks: the next [F, BDV] state slice loads while this one multiplies) and of the sweeps (the
# next chunk's keys and values). With 1 stage no load is pipelined (`scripts/compile_poly.py` counts the
# cp.async copies); 2 is the deepest whose readouts fit an H100's shared memory at D = 128 in 16-bit.
TUNING = {"reshape": True, "bdv_read": 128, "bdv_state": 128, "key_major": True, "stages_read": 2, "stages_sweep": 3}
# bytes of boundary states `segment="auto"` stays under: an H100's 80 GB / 8 (`state_budget`: an eighth of a
# smaller GPU). The backward frees them before it builds U (as large), so at 1M tokens, D = 128 a forward +
# backward peaks at 54 GiB with 4096-token segments (`scripts/compile_poly.py --memory`); every halving of the
# segment halves the direct window's work
STATE_BUDGET = 10 * 2**30


@triton.jit
def _tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _state_of(c, C0, LAG: tl.constexpr, SEG: tl.constexpr, R: tl.constexpr):
    """Boundary state read by key chunk c's queries: keys of chunks < s * SEG. Chunks of one block of R
    query chunks share it (so `_fwd` reads one state per block); s * SEG <= c - LAG keeps the band out."""
    first = C0 + ((c - C0) // R) * R
    return tl.maximum(first - LAG, 0) // SEG


@triton.jit
def _first_reader(s, C0, LAG: tl.constexpr, SEG: tl.constexpr, R: tl.constexpr):
    """The first key chunk whose queries read state s or later (`_state_of` is non-decreasing)."""
    return C0 + R * tl.cdiv(tl.maximum(s * SEG + LAG - C0, 0), R)


@triton.jit
def _far_chunks(q0, band, BT: tl.constexpr):
    """Key chunks 0 .. n - 1 are at least `band` before query slot q0 and every later one: n (>= 0)."""
    return tl.maximum(q0 - band + 1, 0) // BT


@triton.jit
def _direct_weights(y, o_q, o_k, m_k, b_m, scale, band, c0, c1, c2, softcap, HAS_SOFTCAP: tl.constexpr,
                    KEY_MAJOR: tl.constexpr = False, FAR: tl.constexpr = False):
    """Weights and dW/dy of a directly computed block of raw products y = q.k (logits x = scale y):
    exp(softcap(x) - m) in the band, P(x) e^{-m} beyond. y: [queries, keys], or [keys, queries] when KEY_MAJOR
    (the key-major backward pass). FAR: the caller knows every pair of the block is at least `band` apart (so
    causal too), and folds the rows' e^{-m} into its row factors: P(x) = c0 + y (c1 s + c2 s^2 y) on valid keys,
    two FMAs per element, no masks of distance, no exponential (most blocks of a long window; `_far_chunks`).
    Its dW/dy is left unmasked at invalid keys: they are zero rows of k (no dq) and autograd zeroes their dk."""
    if FAR:
        a1, a2 = c1 * scale, c2 * scale * scale
        valid = m_k[:, None] if KEY_MAJOR else m_k[None, :]
        return tl.where(valid, c0 + y * (a1 + a2 * y), 0.0), a1 + (2.0 * a2) * y
    if KEY_MAJOR:
        dist = o_q[None, :] - o_k[:, None]
        seen = (dist >= 0) & m_k[:, None]
        m = b_m[None, :]
    else:
        dist = o_q[:, None] - o_k[None, :]
        seen = (dist >= 0) & m_k[None, :]
        m = b_m[:, None]
    em = tl.exp(-m)
    near = seen & (dist < band)
    far = seen & (dist >= band)
    x = y * scale
    if HAS_SOFTCAP:
        t = _tanh(x / softcap)
        xn = softcap * t
        dxn = 1.0 - t * t
    else:
        xn = x
        dxn = 1.0
    w_near = tl.exp(tl.where(near, xn - m, float("-inf")))
    w = tl.where(near, w_near, tl.where(far, (c0 + x * (c1 + c2 * x)) * em, 0.0))
    dw = tl.where(near, w_near * dxn, tl.where(far, (c1 + 2.0 * c2 * x) * em, 0.0))
    return w, dw * scale


@triton.jit
def _mma_zeros(M: tl.constexpr, N: tl.constexpr, DT: tl.constexpr):
    """A zero [M, N] float32 accumulator made by a (tiny) tensor-core dot, for loops that may run zero times: with
    `tl.zeros` the zero-trip path writes the accumulator's registers with plain moves, and ptxas then serialises
    every wgmma of the kernel (C7515, reported by `scripts/compile_poly.py`)."""
    return tl.dot(tl.zeros([M, 16], DT), tl.zeros([16, N], DT))


# ----------------------------------------------------------------------------------- feature blocks
@triton.jit
def _block(TA, TB, t, state, NR, BASE, BA_: tl.constexpr, F: tl.constexpr, LIN: tl.constexpr):
    """Block t's first coordinates (a0, b0) and the flat row offsets of its F features in state `state` of a
    [states, NR, DV] buffer (quadratic tiles first, linear blocks from row BASE; int64: the buffers pass 2^31
    elements at long contexts)."""
    rows = state.to(tl.int64) * NR + BASE + t * F + tl.arange(0, F)
    if LIN:
        return t * BA_, t * BA_, rows
    else:
        return tl.load(TA + t) * BA_, tl.load(TB + t) * BA_, rows


@triton.jit
def _coef(a0, b0, c0, c1, c2, scale, D: tl.constexpr, BA_: tl.constexpr, LIN: tl.constexpr):
    """A block's feature weights, the logit scale s included (features are of the unscaled q, k): c2 s^2, 2 c2 s^2
    off the diagonal (both orders of a coordinate pair); linear blocks c1 s, and c0 on the constant coordinate D
    ([BL]). The sweeps multiply them into the states they store (`_store_state`), so no feature carries one."""
    if LIN:
        return tl.where(tl.arange(0, BA_) + a0 == D, c0, c1 * scale)
    else:
        return tl.where(a0 == b0, c2, 2.0 * c2) * (scale * scale)


@triton.jit
def _coords(X, p_rows, a0, m_r, D: tl.constexpr, BA_: tl.constexpr, TY: tl.constexpr = tl.float32):
    """Coordinates a0 .. a0 + BA of x for a block of rows, [rows, BA] as TY (0 beyond D).
    p_rows: [rows, 1] row pointers of X; m_r: [rows, 1] row mask."""
    o_a = tl.arange(0, BA_) + a0  # tensor first: a0 can be a constexpr (linear blocks, interpreter)
    return tl.load(X + p_rows + o_a[None, :], mask=m_r & (o_a[None, :] < D), other=0.0).to(TY)


@triton.jit
def _factors(X, p_rows, a0, b0, m_r, D: tl.constexpr, BA_: tl.constexpr):
    """The two gathered factors x_{a0 + f // BA}, x_{b0 + f % BA} of a tile's features, [rows, F] each."""
    o_f = tl.arange(0, BA_ * BA_)
    o_a, o_b = a0 + o_f // BA_, b0 + o_f % BA_
    xa = tl.load(X + p_rows + o_a[None, :], mask=m_r & (o_a[None, :] < D), other=0.0).to(tl.float32)
    xb = tl.load(X + p_rows + o_b[None, :], mask=m_r & (o_b[None, :] < D), other=0.0).to(tl.float32)
    return xa, xb


@triton.jit
def _phi(X, p_rows, a0, b0, m_r, wa, D: tl.constexpr, BA_: tl.constexpr, LIN: tl.constexpr,
         RESHAPE: tl.constexpr):
    """Features of a block of rows times wa, [rows, F] float32. Linear: [x, 1] (1 on coordinate D of rows in
    m_r). Quadratic: the outer product of two [rows, BA] loads flattened in registers (RESHAPE), or the
    product of the two gathered [rows, F] factors. wa (a scalar or [rows, 1]: row weights, validity)
    multiplies the first factor: BA values per row instead of BA^2 features."""
    if LIN:
        o_a = tl.arange(0, BA_) + a0
        return tl.where((o_a[None, :] == D) & m_r, 1.0, _coords(X, p_rows, a0, m_r, D, BA_)) * wa
    elif RESHAPE:
        xa = _coords(X, p_rows, a0, m_r, D, BA_) * wa
        xb = _coords(X, p_rows, b0, m_r, D, BA_)
        return tl.reshape(xa[:, :, None] * xb[:, None, :], (p_rows.shape[0], BA_ * BA_))
    else:
        xa, xb = _factors(X, p_rows, a0, b0, m_r, D, BA_)
        return (xa * wa) * xb


@triton.jit
def _phi_t(X, p_rows, a0, b0, m_r, D: tl.constexpr, BA_: tl.constexpr):
    """A tile's features of a block of rows, transposed: [F, rows], the outer product of two [BA, rows] loads
    flattened in registers. Triton 3.6 (the H100 machine's) moved the [rows, F] outer product of `_phi` into a
    readout's operand layout through shared memory one element at a time; built this way it converts cheaply, or
    is staged in shared memory for the query sweep's transposed operand. float32, or bf16 for bf16 X: a product
    of two bf16 values is exact in float32, so multiplied in bf16 it is the float32 feature rounded once (what
    the dots take), at half the instructions (`scripts/compile_poly.py`: query sweep 552 -> 433 at D = 64)."""
    o_a = tl.arange(0, BA_)
    p_t, m_t = X + tl.trans(p_rows), tl.trans(m_r)
    xa = tl.load(p_t + (a0 + o_a)[:, None], mask=m_t & ((a0 + o_a)[:, None] < D), other=0.0)
    xb = tl.load(p_t + (b0 + o_a)[:, None], mask=m_t & ((b0 + o_a)[:, None] < D), other=0.0)
    if X.dtype.element_ty != tl.bfloat16:  # fp16 -> bf16 would round twice
        xa, xb = xa.to(tl.float32), xb.to(tl.float32)
    return tl.reshape(xa[:, None, :] * xb[None, :, :], (BA_ * BA_, p_rows.shape[0]))


@triton.jit
def _feature_vjp(X, p_x, G_, p_g, a0, b0, g, wg, m_r, D: tl.constexpr, BA_: tl.constexpr, BS: tl.constexpr,
                 DT: tl.constexpr, LIN: tl.constexpr, RESHAPE: tl.constexpr):
    """Add d/dx of sum(wg g * phi(X rows)) to the same rows of G_ (the constant coordinate and the padding beyond
    D are dropped). wg (a scalar or [rows, 1]: row validity) scales the [rows, BA] coordinate gradients, not the
    [rows, F] g. Quadratic, RESHAPE: g viewed as [rows, BA, BA] and summed against the partner block; else
    products with 0/1 selector matrices [F, BS] (BS = max(BA, 16), the smallest tl.dot width) of the gathered
    factors."""
    o_a = tl.arange(0, BA_)
    if LIN:
        tl.atomic_add(G_ + p_g + (o_a + a0)[None, :], g * wg, mask=m_r & ((o_a + a0)[None, :] < D))
    elif RESHAPE:
        xa = _coords(X, p_x, a0, m_r, D, BA_)
        xb = _coords(X, p_x, b0, m_r, D, BA_)
        g3 = tl.reshape(g, (p_x.shape[0], BA_, BA_))
        da = tl.sum(g3 * xb[:, None, :], 2) * wg  # [rows, BA]
        db = tl.sum(g3 * xa[:, :, None], 1) * wg
        tl.atomic_add(G_ + p_g + (a0 + o_a)[None, :], da, mask=m_r & ((a0 + o_a)[None, :] < D))
        tl.atomic_add(G_ + p_g + (b0 + o_a)[None, :], db, mask=m_r & ((b0 + o_a)[None, :] < D))
    else:
        xa, xb = _factors(X, p_x, a0, b0, m_r, D, BA_)
        o_f, o_s = tl.arange(0, BA_ * BA_), tl.arange(0, BS)
        sel_a = ((o_f[:, None] // BA_) == o_s[None, :]).to(DT)
        sel_b = ((o_f[:, None] % BA_) == o_s[None, :]).to(DT)
        da = tl.dot((g * xb).to(DT), sel_a) * wg  # [rows, BS]
        db = tl.dot((g * xa).to(DT), sel_b) * wg
        ok = o_s[None, :] < BA_
        tl.atomic_add(G_ + p_g + (a0 + o_s)[None, :], da, mask=m_r & ok & ((a0 + o_s)[None, :] < D))
        tl.atomic_add(G_ + p_g + (b0 + o_s)[None, :], db, mask=m_r & ok & ((b0 + o_s)[None, :] < D))


@triton.jit
def _den_sum(X, p_rows, a0, b0, m_r, w, D: tl.constexpr, BA_: tl.constexpr, LIN: tl.constexpr):
    """sum_r w_r phi(x_r), the denominator column of a state: [F] for linear blocks; for tiles the [BA, BA]
    matrix sum_r w_r xa_r xb_r^T (feature order when flattened): one small float32 dot, so no [rows, F] float32
    feature block lives next to the bf16 one (it made the sweeps spill)."""
    if LIN:
        return tl.sum(_phi(X, p_rows, a0, b0, m_r, w[:, None], D, BA_, True, True), 0)
    else:
        xa = _coords(X, p_rows, a0, m_r, D, BA_) * w[:, None]
        return tl.dot(tl.trans(xa), _coords(X, p_rows, b0, m_r, D, BA_), input_precision="ieee")


@triton.jit
def _split_bf16(x):
    """x (float32) as hi + lo, both bf16: x to about 2^-17 of itself, for tensor-core dots of float32 precision."""
    hi = x.to(tl.bfloat16)
    return hi, (x - hi.to(tl.float32)).to(tl.bfloat16)


@triton.jit
def _den_rows(X, p_rows, a0, b0, m_r, SD, p_s, D: tl.constexpr, BA_: tl.constexpr):
    """A tile's phi(x_r) . SD per row ([rows]), as the quadratic form xa_r^T SD xb_r of its [BA, BA] matrix."""
    sdm = tl.load(SD + tl.reshape(p_s, (BA_, BA_)))
    xb = _coords(X, p_rows, b0, m_r, D, BA_)
    if BA_ < 16:  # Triton < 3.9 rejects dots with K < 16; BA^2 = 64 products per row are cheap without one
        xa = _coords(X, p_rows, a0, m_r, D, BA_)
        return tl.sum(tl.sum(xa[:, :, None] * sdm[None, :, :], 1) * xb, 1)
    elif X.dtype.element_ty == tl.bfloat16:
        # bf16 coordinates are exact tensor-core operands and SD splits into two bf16 terms: two MMAs with float32
        # accumulation instead of BA^2 FMAs per row on the FMA units (the readout loop's largest share)
        xa = _coords(X, p_rows, a0, m_r, D, BA_, tl.bfloat16)
        hi, lo = _split_bf16(sdm)
        return tl.sum(tl.dot(xa, lo, tl.dot(xa, hi)) * xb, 1)
    else:
        xa = _coords(X, p_rows, a0, m_r, D, BA_)
        return tl.sum(tl.dot(xa, sdm, input_precision="ieee") * xb, 1)


@triton.jit
def _den_zeros(BA_: tl.constexpr, LIN: tl.constexpr):
    """An empty `_den_sum` accumulator: [BL] for linear blocks, [BA, BA] for tiles."""
    if LIN:
        return tl.zeros([BA_], tl.float32)
    else:
        return tl.zeros([BA_, BA_], tl.float32)


@triton.jit
def _store_state(S, SD, p_s, o_e, m_e, b_s, b_sd, coef, i_e, DV: tl.constexpr, BA_: tl.constexpr,
                 DT: tl.constexpr, LIN: tl.constexpr):
    """Store a sweep's state of one block times its weights coef (`_coef`; before the rounding to DT, so it
    costs no precision): numerator b_s [F, BDV] at value columns o_e, and for value block 0 the float32
    denominator b_sd (a `_den_sum`)."""
    if LIN:
        tl.store(S + p_s[:, None] * DV + o_e[None, :], (b_s * coef[:, None]).to(DT), mask=m_e)
        if i_e == 0:
            tl.store(SD + p_s, b_sd * coef)
    else:
        tl.store(S + p_s[:, None] * DV + o_e[None, :], (b_s * coef).to(DT), mask=m_e)
        if i_e == 0:
            tl.store(SD + tl.reshape(p_s, (BA_, BA_)), b_sd * coef)


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


# ------------------------------------------------------------------------------------------ forward
@triton.jit
def _sweep_keys(K, V, VALID, TA, TB, S, SD, i_bh, i_b, i_hk, t, i_e, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn,
                NK, NS, NR, BASE, scale, c0, c1, c2, SEG: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                BT: tl.constexpr, BDV: tl.constexpr, BA_: tl.constexpr, F: tl.constexpr, DT: tl.constexpr,
                LIN: tl.constexpr, RESHAPE: tl.constexpr):
    """Block t's key sweep (see `_state_fwd`)."""
    o_t = tl.arange(0, BT)
    o_e = i_e * BDV + tl.arange(0, BDV)
    m_e = o_e[None, :] < DV
    b_s = tl.zeros([F, BDV], tl.float32)
    b_sd = _den_zeros(BA_, LIN)
    for s in range(0, NS):
        a0, b0, p_s = _block(TA, TB, t, i_bh * NS + s, NR, BASE, BA_, F, LIN)
        _store_state(S, SD, p_s, o_e, m_e, b_s, b_sd, _coef(a0, b0, c0, c1, c2, scale, D, BA_, LIN), i_e, DV, BA_,
                     DT, LIN)
        if s < NS - 1:
            for j in range(s * SEG, (s + 1) * SEG):
                o_k = j * BT + o_t
                if LIN:  # invalid keys are zero rows: the constant feature is the only one they need masked
                    valid = (tl.load(VALID + i_b * NK + o_k) > 0).to(tl.float32)
                else:
                    valid = tl.full([BT], 1.0, tl.float32)
                p_k = i_b * s_kb + i_hk * s_kh + o_k[:, None] * s_kn
                m_t = o_t[:, None] < BT
                b_v = tl.load(V + i_b * s_vb + i_hk * s_vh + o_k[:, None] * s_vn + o_e[None, :], mask=m_e, other=0.0)
                if (K.dtype.element_ty == tl.bfloat16) and (not LIN) and RESHAPE:
                    # bf16 keys: a product of two bf16 values is exact in float32, so a tile's features multiplied
                    # in bf16 are the float32 ones rounded once, as below, and its denominator sums the same exact
                    # products on the tensor cores (float32 accumulation): no float32 widening of the loads, no
                    # FMA-unit dot (the loop's instructions halve: `scripts/compile_poly.py`)
                    xa = _coords(K, p_k, a0, m_t, D, BA_, tl.bfloat16)
                    xb = _coords(K, p_k, b0, m_t, D, BA_, tl.bfloat16)
                    b_s += tl.dot(tl.trans(tl.reshape(xa[:, :, None] * xb[:, None, :], (BT, BA_ * BA_))), b_v.to(DT))
                    if i_e == 0:
                        b_sd += tl.dot(tl.trans(xa), xb)
                else:
                    fk = _phi(K, p_k, a0, b0, m_t, valid[:, None], D, BA_, LIN, RESHAPE)
                    b_s += tl.dot(tl.trans(fk.to(DT)), b_v.to(DT))
                    if i_e == 0 and LIN:  # a linear block's denominator terms are its features: sum fk, no reload
                        b_sd += tl.sum(fk, 0)
                    elif i_e == 0:
                        b_sd += _den_sum(K, p_k, a0, b0, m_t, valid, D, BA_, LIN)


@triton.jit
def _state_fwd(
    K, V, VALID, TA, TB, S, SD,
    s_kb, s_kh, s_kn, s_vb, s_vh, s_vn,
    NK, HKV, NS, NT, NR, BASE, scale, c0, c1, c2,
    SEG: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BDV: tl.constexpr, BA_: tl.constexpr,
    DT: tl.constexpr, RESHAPE: tl.constexpr,
):
    """Key sweep of feature block i_t (tiles, then linear blocks), value block i_e: stores
    S_s = coef sum over chunks < s SEG of phi_k(k) v^T for every boundary s < NS ([F, BDV] float32 in registers,
    stored as DT) and the denominator state SD_s = coef sum phi_k(k)."""
    i_t, i_bh, i_e = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2)
    i_b, i_hk = i_bh // HKV, i_bh % HKV
    # (no tuple unpacking in jit code: the two calls spell out their arguments)
    if i_t < NT:
        _sweep_keys(K, V, VALID, TA, TB, S, SD, i_bh, i_b, i_hk, i_t, i_e, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn,
                    NK, NS, NR, 0, scale, c0, c1, c2, SEG, D, DV, BT, BDV, BA_, BA_ * BA_, DT, False, RESHAPE)
    else:
        _sweep_keys(K, V, VALID, TA, TB, S, SD, i_bh, i_b, i_hk, i_t - NT, i_e, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn,
                    NK, NS, NR, BASE, scale, c0, c1, c2, SEG, D, DV, BT, BDV, _BL, _BL, DT, True, RESHAPE)


@triton.jit
def _read_block(acc, den, X, p_x, m_r, S, SD, TA, TB, t, state, NR, BASE, o_e, m_e, D: tl.constexpr,
                DV: tl.constexpr, BA_: tl.constexpr, F: tl.constexpr, DT: tl.constexpr, LIN: tl.constexpr,
                RESHAPE: tl.constexpr):
    """acc += phi_q(x) S_t, den += phi_q(x) . SD_t for feature block t of one boundary state."""
    a0, b0, p_s = _block(TA, TB, t, state, NR, BASE, BA_, F, LIN)
    b_s = tl.load(S + p_s[:, None] * DV + o_e[None, :], mask=m_e, other=0.0)
    if LIN or not RESHAPE:
        fq = _phi(X, p_x, a0, b0, m_r, 1.0, D, BA_, LIN, RESHAPE)
        acc += tl.dot(fq.to(DT), b_s.to(DT))
    else:  # built transposed: 1480 -> 900 instructions per tile under Triton 3.6 when chosen (float32 features)
        acc += tl.dot(tl.trans(_phi_t(X, p_x, a0, b0, m_r, D, BA_).to(DT)), b_s.to(DT))
    if LIN:
        den += tl.sum(fq * tl.load(SD + p_s)[None, :], 1)
    else:
        den += _den_rows(X, p_x, a0, b0, m_r, SD, p_s, D, BA_)
    return acc, den


@triton.jit
def _direct_fwd(acc, den, b_q, p_k, p_v, VALID, i_b, kb, o_q, b_m, s_kn, s_vn, NK, scale, band, c0, c1, c2, softcap,
                D: tl.constexpr, BT: tl.constexpr, m_e, o_d, HAS_SOFTCAP: tl.constexpr, DT: tl.constexpr,
                FAR: tl.constexpr):
    """acc += W v, den += W 1 for key chunk kb of a query block's direct window (`_direct_weights`)."""
    o_k = kb * BT + tl.arange(0, BT)
    b_k = tl.load(p_k + o_k[:, None] * s_kn, mask=o_d[None, :] < D, other=0.0)
    b_v = tl.load(p_v + o_k[:, None] * s_vn, mask=m_e, other=0.0)
    m_k = tl.load(VALID + i_b * NK + o_k) > 0
    w, _ = _direct_weights(tl.dot(b_q, tl.trans(b_k)), o_q, o_k, m_k, b_m, scale, band, c0, c1, c2, softcap,
                           HAS_SOFTCAP, False, FAR)
    return acc + tl.dot(w.to(DT), b_v.to(DT)), den + tl.sum(w, 1)


@triton.jit
def _fwd(
    Q, K, V, VALID, BOUND, HASFAR, S, SD, TA, TB, O, M, DEN,
    s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_ob, s_oh, s_on,
    NQ, NK, H, G, NS, NT, NL, NR, BASE, scale, band, c0, c1, c2, softcap,
    LAG: tl.constexpr, SEG: tl.constexpr, R: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr,
    BD: tl.constexpr, BDV: tl.constexpr, BA_: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DT: tl.constexpr,
    RESHAPE: tl.constexpr,
):
    """Output of a block of R query chunks, value block i_e: the boundary state's far part (all feature
    blocks) plus the keys after the boundary computed directly, normalised. Also stores the row shift M and
    the denominator DEN (the backward's only per-row state)."""
    i_c, i_bh, i_e = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2)
    i_b, i_h, rows, m_r, s, state = _query_block(i_c, i_bh, NQ, NK, NS, H, G, LAG, SEG, R, BT)
    i_hk = i_h // G
    C0 = (NK - NQ) // BT
    kc0 = C0 + i_c * R  # key chunk of the block's first query chunk
    kc1 = tl.minimum(kc0 + R, NK // BT)  # one past its last (the last block can be partial)
    o_q = C0 * BT + rows  # key slots of the query rows
    o_t, o_d = tl.arange(0, BT), tl.arange(0, BD)
    o_e = i_e * BDV + tl.arange(0, BDV)
    m_e = o_e[None, :] < DV
    p_q = i_b * s_qb + i_h * s_qh + rows[:, None] * s_qn
    b_q = tl.load(Q + p_q + o_d[None, :], mask=m_r & (o_d[None, :] < D), other=0.0)
    p_k = K + i_b * s_kb + i_hk * s_kh + o_d[None, :]
    b_m = tl.full([R * BT], float("-inf"), tl.float32)
    for kb in range(tl.maximum(kc0 - LAG, 0), kc1):  # the largest band logit of every row
        o_k = kb * BT + o_t
        b_k = tl.load(p_k + o_k[:, None] * s_kn, mask=o_d[None, :] < D, other=0.0)
        m_k = tl.load(VALID + i_b * NK + o_k) > 0
        x = tl.dot(b_q, tl.trans(b_k)) * scale  # [R BT, BT]
        dist = o_q[:, None] - o_k[None, :]
        near = (dist >= 0) & (dist < band) & m_k[None, :]
        if HAS_SOFTCAP:
            x = softcap * _tanh(x / softcap)
        b_m = tl.maximum(b_m, tl.max(tl.where(near, x, float("-inf")), 1))
    bound = tl.load(BOUND + i_bh * NQ + rows, mask=rows < NQ, other=0.0)
    hasfar = tl.load(HASFAR + i_b * NQ + rows, mask=rows < NQ, other=0) > 0
    b_m = tl.maximum(b_m, tl.where(hasfar, bound, float("-inf")))
    b_m = tl.where(b_m == float("-inf"), 0.0, b_m)
    b_acc = _mma_zeros(R * BT, BDV, DT)
    b_den = tl.zeros([R * BT], tl.float32)
    # far keys in the boundary state (none before the first boundary), scaled by e^{-m} after the far direct
    # keys. Skipped by trip count, not by an `if`: the branch's zero accumulator made ptxas serialise every
    # wgmma of the kernel (C7515, `scripts/compile_poly.py` reports it); the accumulator is a tensor-core zero
    # for the same reason (the tile loop keeps its wgmma in flight past its end)
    for t in range(0, tl.where(s > 0, NT, 0)):
        b_acc, b_den = _read_block(b_acc, b_den, Q, p_q, m_r, S, SD, TA, TB, t, state, NR, 0, o_e, m_e, D, DV,
                                   BA_, BA_ * BA_, DT, False, RESHAPE)
    for t in range(0, tl.where(s > 0, NL, 0)):
        b_acc, b_den = _read_block(b_acc, b_den, Q, p_q, m_r, S, SD, TA, TB, t, state, NR, BASE, o_e, m_e, D, DV,
                                   _BL, _BL, DT, True, RESHAPE)
    # the keys after the boundary, directly: first those at least `band` before every row of the block, whose
    # weights P(x) take their e^{-m} with the state's below
    p_v = V + i_b * s_vb + i_hk * s_vh + o_e[None, :]
    kfar = tl.minimum(tl.maximum(_far_chunks(kc0 * BT, band, BT), s * SEG), kc1)
    for kb in range(s * SEG, kfar):
        b_acc, b_den = _direct_fwd(b_acc, b_den, b_q, p_k, p_v, VALID, i_b, kb, o_q, b_m, s_kn, s_vn, NK, scale,
                                   band, c0, c1, c2, softcap, D, BT, m_e, o_d, HAS_SOFTCAP, DT, True)
    em = tl.where(hasfar, tl.exp(-b_m), 0.0)  # a row without far keys: e^{-m} may overflow, its far terms are 0
    b_acc *= em[:, None]
    b_den *= em
    for kb in range(kfar, kc1):
        b_acc, b_den = _direct_fwd(b_acc, b_den, b_q, p_k, p_v, VALID, i_b, kb, o_q, b_m, s_kn, s_vn, NK, scale,
                                   band, c0, c1, c2, softcap, D, BT, m_e, o_d, HAS_SOFTCAP, DT, False)
    # a row that sees no valid key (left padding) has num = den = 0: output 0 (finite gradient, see backward)
    out = b_acc / tl.where(b_den > 0, b_den, 1.0)[:, None]
    tl.store(O + i_b * s_ob + i_h * s_oh + rows[:, None] * s_on + o_e[None, :], out.to(O.dtype.element_ty),
             mask=m_r & m_e)
    if i_e == 0:
        tl.store(M + i_bh * NQ + rows, b_m, mask=rows < NQ)
        tl.store(DEN + i_bh * NQ + rows, b_den, mask=rows < NQ)


# ----------------------------------------------------------------------------------------- backward
@triton.jit
def _direct_pair(b_q, b_k, b_v, b_dn, b_dd, o_q, o_k, m_k, b_m, scale, band, c0, c1, c2, softcap,
                 HAS_SOFTCAP: tl.constexpr, DT: tl.constexpr, FAR: tl.constexpr):
    """One (query chunk, key chunk) block of a direct window: its weights W and dL/dx, with
    dW_ij = dL/dnum_i . v_j + dL/dden_i (b_dn = dout / den, b_dd = -dout.out / den; FAR blocks, whose weights
    leave e^{-m} out, take both times e^{-m})."""
    w, dwdy = _direct_weights(tl.dot(b_q, tl.trans(b_k)), o_q, o_k, m_k, b_m, scale, band, c0, c1, c2, softcap,
                              HAS_SOFTCAP, False, FAR)
    dw = tl.dot(b_dn, tl.trans(b_v)) + b_dd[:, None]
    return w, (dwdy * dw).to(DT)


@triton.jit
def _dout_times(DO, p_do, o_e, m_r, f, DV: tl.constexpr, DT: tl.constexpr):
    """dout's columns o_e of a block of rows times a row factor f ([rows]), in the dot dtype: [rows, len(o_e)].
    p_do: [rows, 1] row offsets; m_r: [rows, 1] row mask."""
    b_do = tl.load(DO + p_do + o_e[None, :], mask=m_r & (o_e[None, :] < DV), other=0.0).to(tl.float32)
    return (b_do * f[:, None]).to(DT)


@triton.jit
def _rcp(den):
    """1 / den, and 0 for rows that see no valid key (their output is 0 and so is its gradient)."""
    return tl.where(den > 0, 1.0 / tl.where(den > 0, den, 1.0), 0.0)


@triton.jit
def _direct_q_block(b_dq, b_q, K, V, VALID, DK, DV_, k_off, v_off, i_b, kb, o_q, b_m, b_dn, b_dd, s_kn, s_vn, NK,
                    scale, band, c0, c1, c2, softcap, D: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, o_d,
                    o_dv, HAS_SOFTCAP: tl.constexpr, DT: tl.constexpr, ATOMIC_KV: tl.constexpr, FAR: tl.constexpr):
    """b_dq += dx k for key chunk kb of a query chunk's direct window (and, ATOMIC_KV, its dk / dv added)."""
    o_k = kb * BT + tl.arange(0, BT)
    b_k = tl.load(K + k_off + o_k[:, None] * s_kn, mask=o_d[None, :] < D, other=0.0)
    b_v = tl.load(V + v_off + o_k[:, None] * s_vn, mask=o_dv[None, :] < DV, other=0.0).to(DT)
    m_k = tl.load(VALID + i_b * NK + o_k) > 0
    w, dx = _direct_pair(b_q, b_k, b_v, b_dn, b_dd, o_q, o_k, m_k, b_m, scale, band, c0, c1, c2, softcap,
                         HAS_SOFTCAP, DT, FAR)
    if ATOMIC_KV:
        tl.atomic_add(DK + k_off + o_k[:, None] * s_kn, tl.dot(tl.trans(dx), b_q.to(DT)), mask=o_d[None, :] < D)
        tl.atomic_add(DV_ + v_off + o_k[:, None] * s_vn, tl.dot(tl.trans(w.to(DT)), b_dn), mask=o_dv[None, :] < DV)
    return b_dq + tl.dot(dx, b_k.to(DT))


@triton.jit
def _direct_bwd_q(
    Q, K, V, VALID, HASFAR, O, DO, M, DEN, FA, FB, DD, DQ, DK, DV_,
    s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_ob, s_oh, s_on,
    NQ, NK, H, G, scale, band, c0, c1, c2, softcap,
    LAG: tl.constexpr, SEG: tl.constexpr, R: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr,
    BD: tl.constexpr, BDV: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DT: tl.constexpr, ATOMIC_KV: tl.constexpr,
):
    """Query chunk i_c: with out = num / den, dL/d[num, den] = [dout, -dout.out] / den. Stores dq of its direct
    window, DD = -dout.out / den (for `_direct_bwd_kv`) and the far part's row factors dL/dNF = [dout FA, FB]
    (FA = e^{-m} / den, FB = e^{-m} DD), read by the far kernels instead of a [N, D + 1] float32 buffer.
    ATOMIC_KV: also add the window's dk / dv atomically (then `_direct_bwd_kv` does not run)."""
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
    p_r = i_b * s_ob + i_h * s_oh + rows[:, None] * s_on  # dout / out rows
    p_o = p_r + o_dv[None, :]
    b_do = tl.load(DO + p_o, mask=o_dv[None, :] < DV, other=0.0).to(tl.float32)  # [BT, BDV]
    b_o = tl.load(O + p_o, mask=o_dv[None, :] < DV, other=0.0).to(tl.float32)
    rden = _rcp(tl.load(DEN + i_bh * NQ + rows))
    b_m = tl.load(M + i_bh * NQ + rows)
    b_dd = -tl.sum(b_do * b_o, 1) * rden  # [BT]
    em = tl.where(tl.load(HASFAR + i_b * NQ + rows) > 0, tl.exp(-b_m), 0.0)  # as in `_fwd`
    tl.store(DD + i_bh * NQ + rows, b_dd)
    b_fb = em * b_dd
    tl.store(FA + i_bh * NQ + rows, em * rden)
    tl.store(FB + i_bh * NQ + rows, b_fb)
    b_dnf = (b_do * (em * rden)[:, None]).to(DT)  # the far blocks' (their weights P(x) leave e^{-m} out)
    b_dq = _mma_zeros(BT, BD, DT)
    k_off = i_b * s_kb + i_hk * s_kh + o_d[None, :]
    v_off = i_b * s_vb + i_hk * s_vh + o_dv[None, :]
    lo = _state_of(kc, C0, LAG, SEG, R) * SEG
    kfar = tl.minimum(tl.maximum(_far_chunks(kc * BT, band, BT), lo), kc + 1)  # chunks before: `FAR` blocks
    for kb in range(lo, kfar):
        b_dq = _direct_q_block(b_dq, b_q, K, V, VALID, DK, DV_, k_off, v_off, i_b, kb, o_q, b_m, b_dnf, b_fb, s_kn,
                               s_vn, NK, scale, band, c0, c1, c2, softcap, D, DV, BT, o_d, o_dv, HAS_SOFTCAP, DT,
                               ATOMIC_KV, True)
    # dout reloaded (L2): one [BT, DV] operand live per loop (keeping both spilled under Triton 3.9)
    b_dn = _dout_times(DO, p_r, o_dv, o_t[:, None] < BT, rden, DV, DT)  # (every row of a chunk is a query row)
    for kb in range(kfar, kc + 1):
        b_dq = _direct_q_block(b_dq, b_q, K, V, VALID, DK, DV_, k_off, v_off, i_b, kb, o_q, b_m, b_dn, b_dd, s_kn,
                               s_vn, NK, scale, band, c0, c1, c2, softcap, D, DV, BT, o_d, o_dv, HAS_SOFTCAP, DT,
                               ATOMIC_KV, False)
    tl.store(DQ + i_b * s_qb + i_h * s_qh + rows[:, None] * s_qn + o_d[None, :], b_dq, mask=o_d[None, :] < D)


@triton.jit
def _direct_kv_block(b_dk, b_dv, b_k, b_v, m_k, o_k, Q, DO, M, RA, RB, i_b, i_h, qb, C0, NQ, H, s_qb, s_qh, s_qn,
                     s_ob, s_oh, s_on, scale, band, c0, c1, c2, softcap, D: tl.constexpr, DV: tl.constexpr,
                     BT: tl.constexpr, BQ: tl.constexpr, o_d, o_dv, HAS_SOFTCAP: tl.constexpr, DT: tl.constexpr,
                     FAR: tl.constexpr):
    """dk, dv of a key chunk from query block qb (BQ rows) of head i_h, in [keys, queries] blocks (so the
    products need no transposed register tensors). Row factors (RA, RB): (DEN, DD), or for FAR blocks, whose
    weights leave e^{-m} out, (FA, FB) = e^{-m} (1 / den, DD)."""
    o_s = qb * BQ + tl.arange(0, BQ)  # key slots of the query rows
    rows = o_s - C0 * BT
    r_off = (i_b * H + i_h) * NQ  # the [B, H, NQ] row buffers
    b_q = tl.load(Q + i_b * s_qb + i_h * s_qh + rows[:, None] * s_qn + o_d[None, :], mask=o_d[None, :] < D,
                  other=0.0)
    b_do = tl.load(DO + i_b * s_ob + i_h * s_oh + rows[:, None] * s_on + o_dv[None, :], mask=o_dv[None, :] < DV,
                   other=0.0).to(tl.float32)  # (no row mask: `_dout_times` with one costs 4 % of the far loop)
    ra = tl.load(RA + r_off + rows)
    b_dn = (b_do * (ra if FAR else _rcp(ra))[:, None]).to(DT)
    wt, dwdy = _direct_weights(tl.dot(b_k, tl.trans(b_q)), o_s, o_k, m_k, tl.load(M + r_off + rows), scale, band,
                               c0, c1, c2, softcap, HAS_SOFTCAP, True, FAR)
    dwt = tl.dot(b_v, tl.trans(b_dn)) + tl.load(RB + r_off + rows)[None, :]
    return b_dk + tl.dot((dwdy * dwt).to(DT), b_q.to(DT)), b_dv + tl.dot(wt.to(DT), b_dn)


@triton.jit
def _direct_bwd_kv(
    Q, K, V, VALID, DO, M, DEN, DD, FA, FB, DK, DV_,
    s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_ob, s_oh, s_on,
    NQ, NK, HKV, G, scale, band, c0, c1, c2, softcap,
    LAG: tl.constexpr, SEG: tl.constexpr, R: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr,
    BD: tl.constexpr, BDV: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DT: tl.constexpr, BQ: tl.constexpr,
):
    """Key chunk i_j: dk, dv of every direct window that holds it (query chunks kc with
    state(kc) SEG <= i_j <= kc, all G query heads of its K/V head), accumulated in registers and stored: the
    key-major pass of flash attention's backward, no atomics (neighbouring query chunks share their keys, and
    atomic adds to the same rows serialise)."""
    i_j, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    i_b, i_hk = i_bh // HKV, i_bh % HKV
    C0 = (NK - NQ) // BT
    o_t = tl.arange(0, BT)
    o_d, o_dv = tl.arange(0, BD), tl.arange(0, BDV)
    o_k = i_j * BT + o_t
    k_off = i_b * s_kb + i_hk * s_kh + o_k[:, None] * s_kn + o_d[None, :]  # dk, dv share k's and v's strides
    v_off = i_b * s_vb + i_hk * s_vh + o_k[:, None] * s_vn + o_dv[None, :]
    b_k = tl.load(K + k_off, mask=o_d[None, :] < D, other=0.0)
    b_v = tl.load(V + v_off, mask=o_dv[None, :] < DV, other=0.0).to(DT)
    m_k = tl.load(VALID + i_b * NK + o_k) > 0
    lo = tl.maximum(i_j, C0)
    hi = tl.minimum(_first_reader(i_j // SEG + 1, C0, LAG, SEG, R), NK // BT)  # first chunk past i_j's state
    b_dk = _mma_zeros(BT, BD, DT)
    b_dv = _mma_zeros(BT, BDV, DT)
    # blocks of BQ query rows (a chunk: with the far blocks split off, 64 rows no longer spill and issue 30 % fewer
    # instructions per FLOP than 32); those from qfar on are `FAR` from every key (their loop first, like the
    # other direct loops: `scripts/compile_poly.py` models the first of equal loops)
    qfar = tl.minimum(tl.maximum(tl.cdiv(i_j * BT + BT - 1 + band, BQ), lo * (BT // BQ)), hi * (BT // BQ))
    for g in range(0, G):
        i_h = i_hk * G + g
        for qb in range(qfar, hi * (BT // BQ)):
            b_dk, b_dv = _direct_kv_block(b_dk, b_dv, b_k, b_v, m_k, o_k, Q, DO, M, FA, FB, i_b, i_h, qb, C0, NQ,
                                          HKV * G, s_qb, s_qh, s_qn, s_ob, s_oh, s_on, scale, band, c0, c1, c2,
                                          softcap, D, DV, BT, BQ, o_d, o_dv, HAS_SOFTCAP, DT, True)
        for qb in range(lo * (BT // BQ), qfar):
            b_dk, b_dv = _direct_kv_block(b_dk, b_dv, b_k, b_v, m_k, o_k, Q, DO, M, DEN, DD, i_b, i_h, qb, C0, NQ,
                                          HKV * G, s_qb, s_qh, s_qn, s_ob, s_oh, s_on, scale, band, c0, c1, c2,
                                          softcap, D, DV, BT, BQ, o_d, o_dv, HAS_SOFTCAP, DT, False)
    tl.store(DK + k_off, b_dk, mask=o_d[None, :] < D)
    tl.store(DV_ + v_off, b_dv, mask=o_dv[None, :] < DV)


@triton.jit
def _dq_block(Q, p_q, DQ, p_dq, DO, p_do, b_dnf, fa, fb, m_r, S, SD, TA, TB, t, state, NR, BASE, D: tl.constexpr,
              DV: tl.constexpr, BDV: tl.constexpr, RB: tl.constexpr, BA_: tl.constexpr, F: tl.constexpr,
              BS: tl.constexpr, DT: tl.constexpr, LIN: tl.constexpr, RESHAPE: tl.constexpr):
    """Feature block t's part of dq: g = dNF_num S_t^T + dNF_den SD_t [rows, F], then the VJP of phi.
    b_dnf: dNF_num's first BDV columns (dout FA, in the dot dtype), built once per program."""
    a0, b0, p_s = _block(TA, TB, t, state, NR, BASE, BA_, F, LIN)
    g = tl.zeros([RB, F], tl.float32)  # (the denominator term added after the dots: a zero-initialised
    for e0 in tl.static_range(0, DV, BDV):  # accumulator keeps the dot's layout, which spills less)
        o_e = e0 + tl.arange(0, BDV)
        b_dn = b_dnf if e0 == 0 else _dout_times(DO, p_do, o_e, m_r, fa, DV, DT)
        b_s = tl.load(S + p_s[:, None] * DV + o_e[None, :], mask=o_e[None, :] < DV, other=0.0)
        g += tl.dot(b_dn, tl.trans(b_s.to(DT)))
    g += fb[:, None] * tl.load(SD + p_s)[None, :]
    _feature_vjp(Q, p_q, DQ, p_dq, a0, b0, g, 1.0, m_r, D, BA_, BS, DT, LIN, RESHAPE)


@triton.jit
def _far_bwd_dq(
    Q, DO, FA, FB, S, SD, TA, TB, DQ,
    s_qb, s_qh, s_qn, s_ob, s_oh, s_on, s_db, s_dh, s_dn,
    NQ, NK, H, G, NS, NT, NL, NR, BASE,
    LAG: tl.constexpr, SEG: tl.constexpr, R: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr,
    BDV: tl.constexpr, BA_: tl.constexpr, BS: tl.constexpr, DT: tl.constexpr, RESHAPE: tl.constexpr,
):
    """dq of the far part of a block of R query chunks: all feature blocks of its boundary state."""
    i_c, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    i_b, i_h, rows, m_r, s, state = _query_block(i_c, i_bh, NQ, NK, NS, H, G, LAG, SEG, R, BT)
    if s > 0:
        p_q = i_b * s_qb + i_h * s_qh + rows[:, None] * s_qn
        p_dq = i_b * s_db + i_h * s_dh + rows[:, None] * s_dn
        p_do = i_b * s_ob + i_h * s_oh + rows[:, None] * s_on
        fa = tl.load(FA + i_bh * NQ + rows, mask=rows < NQ, other=0.0)
        fb = tl.load(FB + i_bh * NQ + rows, mask=rows < NQ, other=0.0)
        # hoisted out of the feature blocks: 1170 -> 922 instructions per tile (Triton 3.6), 1240 -> 995 (3.9)
        b_dnf = _dout_times(DO, p_do, tl.arange(0, BDV), m_r, fa, DV, DT)
        for t in range(0, NT):
            _dq_block(Q, p_q, DQ, p_dq, DO, p_do, b_dnf, fa, fb, m_r, S, SD, TA, TB, t, state, NR, 0, D, DV, BDV,
                      R * BT, BA_, BA_ * BA_, BS, DT, False, RESHAPE)
        for t in range(0, NL):
            _dq_block(Q, p_q, DQ, p_dq, DO, p_do, b_dnf, fa, fb, m_r, S, SD, TA, TB, t, state, NR, BASE, D, DV, BDV,
                      R * BT, _BL, _BL, BS, DT, True, RESHAPE)


@triton.jit
def _sweep_queries(Q, DO, FA, FB, TA, TB, U, UD, i_bh, i_b, i_hk, t, i_e, s_qb, s_qh, s_qn, s_ob, s_oh, s_on,
                   NQ, NK, H, NS, NR, BASE, scale, c0, c1, c2, G: tl.constexpr, LAG: tl.constexpr, SEG: tl.constexpr,
                   R: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BDV: tl.constexpr,
                   BA_: tl.constexpr, F: tl.constexpr, DT: tl.constexpr, LIN: tl.constexpr, RESHAPE: tl.constexpr):
    """Block t's reverse query sweep (see `_state_bwd`)."""
    o_t = tl.arange(0, BT)
    m_t = o_t[:, None] < BT  # every row of a chunk is a query row
    o_e = i_e * BDV + tl.arange(0, BDV)
    m_e = o_e[None, :] < DV
    NC = NK // BT
    C0 = (NK - NQ) // BT
    b_u = tl.zeros([F, BDV], tl.float32)
    b_ud = _den_zeros(BA_, LIN)
    for ss in range(0, NS - 1):
        s = NS - 2 - ss
        a0, b0, p_u = _block(TA, TB, t, i_bh * (NS - 1) + s, NR, BASE, BA_, F, LIN)
        # the query chunks whose state is exactly s + 1 (bounds recomputed: a loop-carried bound miscompiles)
        lo = _first_reader(s + 1, C0, LAG, SEG, R)
        hi = tl.minimum(_first_reader(s + 2, C0, LAG, SEG, R), NC)
        for c in range(lo, hi):
            rows = (c - C0) * BT + o_t
            for g in tl.static_range(G):
                i_h = i_b * H + i_hk * G + g  # flat (batch, head) of the [B, H, NQ] row factors
                p_q = i_b * s_qb + (i_hk * G + g) * s_qh + rows[:, None] * s_qn
                p_do = i_b * s_ob + (i_hk * G + g) * s_oh + rows[:, None] * s_on
                b_dn = _dout_times(DO, p_do, o_e, m_t, tl.load(FA + i_h * NQ + rows), DV, DT)
                if LIN or not RESHAPE:
                    fq = _phi(Q, p_q, a0, b0, m_t, 1.0, D, BA_, LIN, RESHAPE)
                    b_u += tl.dot(tl.trans(fq.to(DT)), b_dn)
                else:  # built transposed: 941 -> 665 instructions per chunk under Triton 3.6 when chosen
                    b_u += tl.dot(_phi_t(Q, p_q, a0, b0, m_t, D, BA_).to(DT), b_dn)
                if i_e == 0:
                    b_ud += _den_sum(Q, p_q, a0, b0, m_t, tl.load(FB + i_h * NQ + rows), D, BA_, LIN)
        _store_state(U, UD, p_u, o_e, m_e, b_u, b_ud, _coef(a0, b0, c0, c1, c2, scale, D, BA_, LIN), i_e, DV, BA_,
                     DT, LIN)


@triton.jit
def _state_bwd(
    Q, DO, FA, FB, TA, TB, U, UD,
    s_qb, s_qh, s_qn, s_ob, s_oh, s_on,
    NQ, NK, HKV, NS, NT, NR, BASE, scale, c0, c1, c2,
    G: tl.constexpr, LAG: tl.constexpr, SEG: tl.constexpr, R: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BT: tl.constexpr, BDV: tl.constexpr, BA_: tl.constexpr, DT: tl.constexpr, RESHAPE: tl.constexpr,
):
    """Reverse sweep of the query-side state of feature block i_t: U_s = sum over query chunks c with
    state(c) > s of phi_q(q_c)^T dNF_c (numerator columns, value block i_e) and UD_s the same with the
    denominator column; stored for key segments s < NS - 1 (segment s is in the states s + 1, s + 2, ...)."""
    i_t, i_bh, i_e = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2)
    i_b, i_hk = i_bh // HKV, i_bh % HKV
    if i_t < NT:
        _sweep_queries(Q, DO, FA, FB, TA, TB, U, UD, i_bh, i_b, i_hk, i_t, i_e, s_qb, s_qh, s_qn, s_ob, s_oh, s_on,
                       NQ, NK, HKV * G, NS, NR, 0, scale, c0, c1, c2, G, LAG, SEG, R, D, DV, BT, BDV, BA_, BA_ * BA_,
                       DT, False, RESHAPE)
    else:
        _sweep_queries(Q, DO, FA, FB, TA, TB, U, UD, i_bh, i_b, i_hk, i_t - NT, i_e, s_qb, s_qh, s_qn, s_ob, s_oh,
                       s_on, NQ, NK, HKV * G, NS, NR, BASE, scale, c0, c1, c2, G, LAG, SEG, R, D, DV, BT, BDV, _BL, _BL,
                       DT, True, RESHAPE)


@triton.jit
def _dv_block(acc, K, p_k, m_r, U, TA, TB, t, state, NR, BASE, o_e, m_e, D: tl.constexpr, DV: tl.constexpr,
              BA_: tl.constexpr, F: tl.constexpr, DT: tl.constexpr, LIN: tl.constexpr, RESHAPE: tl.constexpr):
    """acc += phi_k(k) U_t."""
    a0, b0, p_u = _block(TA, TB, t, state, NR, BASE, BA_, F, LIN)
    fk = _phi(K, p_k, a0, b0, m_r, 1.0, D, BA_, LIN, RESHAPE)
    b_u = tl.load(U + p_u[:, None] * DV + o_e[None, :], mask=m_e, other=0.0)
    return acc + tl.dot(fk.to(DT), b_u.to(DT))


@triton.jit
def _far_bwd_v(
    K, VALID, U, TA, TB, DV_,
    s_kb, s_kh, s_kn, s_vb, s_vh, s_vn,
    NK, HKV, NS, NT, NL, NR, BASE,
    SEG: tl.constexpr, R: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BDV: tl.constexpr,
    BA_: tl.constexpr, DT: tl.constexpr, RESHAPE: tl.constexpr,
):
    """dv of the far part for a block of R key chunks (one segment): sum over feature blocks of phi_k(k) U_s."""
    i_j, i_bh, i_e = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2)
    i_b, i_hk = i_bh // HKV, i_bh % HKV
    s = (i_j * R) // SEG
    if s < NS - 1:
        o_k, m_r, valid = _key_block(i_j, i_b, VALID, NK, R, BT)
        o_e = i_e * BDV + tl.arange(0, BDV)
        m_e = o_e[None, :] < DV
        p_k = i_b * s_kb + i_hk * s_kh + o_k[:, None] * s_kn
        state = i_bh * (NS - 1) + s
        b_acc = tl.zeros([R * BT, BDV], tl.float32)
        for t in range(0, NT):
            b_acc = _dv_block(b_acc, K, p_k, m_r, U, TA, TB, t, state, NR, 0, o_e, m_e, D, DV, BA_, BA_ * BA_,
                              DT, False, RESHAPE)
        for t in range(0, NL):
            b_acc = _dv_block(b_acc, K, p_k, m_r, U, TA, TB, t, state, NR, BASE, o_e, m_e, D, DV, _BL, _BL, DT,
                              True, RESHAPE)
        p_dv = DV_ + i_b * s_vb + i_hk * s_vh + o_k[:, None] * s_vn + o_e[None, :]
        # one program per key block: a plain read-add-write after the direct passes (same stream) is race-free
        tl.store(p_dv, tl.load(p_dv, mask=m_r & m_e) + b_acc * valid[:, None], mask=m_r & m_e)


@triton.jit
def _dk_block(K, p_k, DK, p_dk, p_v, m_r, valid, U, UD, TA, TB, t, state, NR, BASE, D: tl.constexpr,
              DV: tl.constexpr, BDV: tl.constexpr, RB: tl.constexpr, BA_: tl.constexpr, F: tl.constexpr,
              BS: tl.constexpr, DT: tl.constexpr, LIN: tl.constexpr, RESHAPE: tl.constexpr):
    """Feature block t's part of dk: g = v U_t^T + UD_t ([rows, F], the values' column of ones gives UD), then
    the VJP."""
    a0, b0, p_u = _block(TA, TB, t, state, NR, BASE, BA_, F, LIN)
    g = tl.zeros([RB, F], tl.float32)
    for e0 in tl.static_range(0, DV, BDV):
        o_e = e0 + tl.arange(0, BDV)
        b_v = tl.load(p_v + o_e[None, :], mask=m_r & (o_e[None, :] < DV), other=0.0)
        b_u = tl.load(U + p_u[:, None] * DV + o_e[None, :], mask=o_e[None, :] < DV, other=0.0)
        g += tl.dot(b_v.to(DT), tl.trans(b_u.to(DT)))
    g += tl.load(UD + p_u)[None, :]
    wg = valid[:, None] if LIN else 1.0  # a tile's VJP vanishes on zero (invalid) key rows; [x, 1]'s does not
    _feature_vjp(K, p_k, DK, p_dk, a0, b0, g, wg, m_r, D, BA_, BS, DT, LIN, RESHAPE)


@triton.jit
def _far_bwd_k(
    K, V, VALID, U, UD, TA, TB, DK,
    s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_db, s_dh, s_dn,
    NK, HKV, NS, NT, NL, NR, BASE,
    SEG: tl.constexpr, R: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BDV: tl.constexpr,
    BA_: tl.constexpr, BS: tl.constexpr, DT: tl.constexpr, RESHAPE: tl.constexpr,
):
    """dk of the far part for a block of R key chunks: all feature blocks of its segment's U."""
    i_j, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    i_b, i_hk = i_bh // HKV, i_bh % HKV
    s = (i_j * R) // SEG
    if s < NS - 1:
        o_k, m_r, valid = _key_block(i_j, i_b, VALID, NK, R, BT)
        p_k = i_b * s_kb + i_hk * s_kh + o_k[:, None] * s_kn
        p_dk = i_b * s_db + i_hk * s_dh + o_k[:, None] * s_dn
        p_v = V + i_b * s_vb + i_hk * s_vh + o_k[:, None] * s_vn
        state = i_bh * (NS - 1) + s
        for t in range(0, NT):
            _dk_block(K, p_k, DK, p_dk, p_v, m_r, valid, U, UD, TA, TB, t, state, NR, 0, D, DV, BDV, R * BT,
                      BA_, BA_ * BA_, BS, DT, False, RESHAPE)
        for t in range(0, NL):
            _dk_block(K, p_k, DK, p_dk, p_v, m_r, valid, U, UD, TA, TB, t, state, NR, BASE, D, DV, BDV, R * BT,
                      _BL, _BL, BS, DT, True, RESHAPE)


# ------------------------------------------------------------------------------------------- wrappers
def _tiles(d: int, ba: int, device):
    nb = math.ceil(d / ba)
    pairs = [(a, b) for a in range(nb) for b in range(a, nb)]
    ta = torch.tensor([p[0] for p in pairs], dtype=torch.int32, device=device)
    tb = torch.tensor([p[1] for p in pairs], dtype=torch.int32, device=device)
    return ta, tb


def feature_rows(d: int, tile: int) -> tuple[int, int, int]:
    """(quadratic tiles, linear blocks, feature rows per state) of head dim d: tiles of tile^2 coordinate
    pairs over ceil(d / tile) blocks, then linear blocks of BL coordinates of [x, 1]."""
    nb = math.ceil(d / tile)
    nt, nl = nb * (nb + 1) // 2, math.ceil((d + 1) / BL)
    return nt, nl, nt * tile * tile + nl * BL


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
    """Launch geometry shared by the forward and backward: chunk, band lag, segment, feature blocks, warps."""

    def __init__(self, q, k, v, band, chunk, tile, segment, rows_per_block):
        b, h, nq, d = q.shape
        self.b, self.h, self.nq, self.d = b, h, nq, d
        self.hkv, self.nk, self.dv = k.shape[1], k.shape[2], v.shape[-1]
        self.g = h // self.hkv
        self.chunk, self.tile = chunk, tile
        self.lag = math.ceil(band / chunk) if band > 0 else 0
        self.r = rows_per_block
        self.nt, self.nl, self.nr = feature_rows(d, tile)
        self.base = self.nt * tile * tile  # first row of the linear blocks
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
        # pipelining depths; `_launch` lowers them where a variant exceeds the GPU's shared memory (float32
        # operands take twice as much: at D = 128 its readouts only fit unpipelined, in 64-wide value blocks)
        self.stages_read, self.stages_sweep, self.stages_direct = TUNING["stages_read"], TUNING["stages_sweep"], 3
        self.bdv_fwd = min(self.bdv_read, 64) if q.element_size() == 4 and d > 64 else self.bdv_read

    def geometry(self):
        """Runtime arguments every feature-block kernel takes after its shapes: NT, NL, NR, BASE."""
        return self.nt, self.nl, self.nr, self.base

    def meta(self, sweep=False, **extra):
        """Compile-time arguments every feature-block kernel takes (sweep: a state sweep, else a readout)."""
        return dict(D=self.d, DV=self.dv, BT=self.chunk, BA_=self.tile, DT=self.dt, RESHAPE=self.reshape,
                    num_warps=self.nw_far, num_stages=self.stages_sweep if sweep else self.stages_read, **extra)


def state_budget(device) -> int:
    """Bytes of boundary states `segment="auto"` may use on `device`: STATE_BUDGET, or an eighth of a smaller
    GPU's memory (the states and U are each that large at the backward's peak, beside the inputs and gradients)."""
    device = torch.device(device)
    if device.type != "cuda":
        return STATE_BUDGET
    return min(STATE_BUDGET, torch.cuda.get_device_properties(device).total_memory // 8)


def auto_segment(b, hkv, nk, d, dv, chunk, tile, itemsize, budget=STATE_BUDGET):
    """Smallest power-of-two segment (>= 8 chunks, >= 512 tokens) whose boundary states fit `budget` bytes."""
    per_state = b * hkv * feature_rows(d, tile)[2] * (dv * itemsize + 4)
    seg = max(512, 8 * chunk)
    while (nk // seg + 1) * per_state > budget and seg < nk:
        seg *= 2
    return seg


_FIT = {}  # (kernel, device, compile-time arguments) -> the pipelining depth that fit its shared memory


def _launch(kernel, grid, *args, **meta):
    """kernel[grid](*args, **meta), lowering meta["num_stages"] until the compiled kernel fits the device's
    shared memory (Triton raises OutOfResources at the launch of a variant that does not, before it runs). The
    depth is a speed choice, so a GPU with less shared memory than the one a default was chosen on (an A100's
    163 KiB, or a float32 / D = 256 variant on an H100) gets a shallower pipeline instead of an error. What fit
    is remembered per variant; `scripts/compile_poly.py` applies the same rule without a GPU."""
    device = next(a.device for a in args if isinstance(a, torch.Tensor))
    key = (kernel, str(device), tuple(sorted((k, str(v)) for k, v in meta.items())))
    stages = _FIT.get(key, meta.get("num_stages", 3))
    while True:
        try:
            kernel[grid](*args, **dict(meta, num_stages=stages))
        except OutOfResources as err:
            if err.name != "shared memory":
                raise
            if stages <= 1:
                raise ValueError(f"poly Triton kernel {getattr(kernel, '__name__', kernel)} needs {err.required} B of "
                                 f"shared memory even unpipelined; this GPU has {err.limit} B per block. Use a "
                                 "smaller chunk_size, rows_per_block=1, 16-bit inputs, or kernel='torch'") from err
            stages -= 1
        else:
            _FIT[key] = stages
            return


def _key_states(p, k, v, valid, ta, tb, weights):
    """The boundary states (S [states, Dv] in the state dtype, SD [states] float32) of the key sweep.
    weights: (scale, c0, c1, c2), multiplied into the states."""
    n_s = p.b * p.hkv * p.ns * p.nr
    st = torch.empty(n_s if p.ns > 1 else 1, p.dv, dtype=p.state_dtype, device=k.device)
    sd = torch.empty(n_s if p.ns > 1 else 1, dtype=torch.float32, device=k.device)
    if p.ns > 1:  # some query block reads a non-empty state
        count("poly_triton.key_sweep")
        _launch(_state_fwd, (p.nt + p.nl, p.b * p.hkv, triton.cdiv(p.dv, p.bdv_state)),
            k, v, valid, ta, tb, st, sd, *k.stride()[:3], *v.stride()[:3], p.nk, p.hkv, p.ns, p.nt, p.nr,
            p.base, *weights, SEG=p.seg, BDV=p.bdv_state, **p.meta(sweep=True),
        )
    return st, sd


def _readout(p, q, k, v, valid, bound, hasfar, ta, tb, st, sd, weights, band, softcap):
    """`_fwd` over the key states: out [B, H, Nq, Dv] and the row shift m and denominator den ([B, H, Nq], float32;
    all the backward keeps per row)."""
    out = torch.empty(p.b, p.h, p.nq, p.dv, dtype=q.dtype, device=q.device)
    m = torch.empty(p.b, p.h, p.nq, dtype=torch.float32, device=q.device)
    den = torch.empty_like(m)
    _launch(_fwd, (triton.cdiv(p.nq, p.chunk * p.r), p.b * p.h, triton.cdiv(p.dv, p.bdv_fwd)),
        q, k, v, valid, bound, hasfar, st, sd, ta, tb, out, m, den,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        p.nq, p.nk, p.h, p.g, p.ns, *p.geometry(), weights[0], int(band), *weights[1:],
        float(softcap or 0.0), LAG=p.lag, SEG=p.seg, R=p.r, BD=p.bd, BDV=p.bdv_fwd,
        HAS_SOFTCAP=softcap is not None, **p.meta(),
    )
    return out, m, den


def _query_states(p, q, do, fa, fb, ta, tb, weights):
    """The reverse query sweep's states for key segments 0 .. NS - 2 (U [states, Dv] in the state dtype, UD
    [states] float32). fa, fb: the far row factors of `_direct_bwd_q`; weights: (scale, c0, c1, c2)."""
    n_u = p.b * p.hkv * (p.ns - 1) * p.nr
    u = torch.empty(n_u, p.dv, dtype=p.state_dtype, device=q.device)
    ud = torch.empty(n_u, dtype=torch.float32, device=q.device)
    _launch(_state_bwd, (p.nt + p.nl, p.b * p.hkv, triton.cdiv(p.dv, p.bdv_state)),
        q, do, fa, fb, ta, tb, u, ud, *q.stride()[:3], *do.stride()[:3],
        p.nq, p.nk, p.hkv, p.ns, p.nt, p.nr, p.base, *weights,
        G=p.g, LAG=p.lag, SEG=p.seg, R=p.r, BDV=p.bdv_state, **p.meta(sweep=True),
    )
    return u, ud


class PolyTritonFunction(torch.autograd.Function):
    """(q, k, v) -> out [B, H, Nq, Dv]. See the module docstring."""

    @staticmethod
    def forward(ctx, q, k, v, valid, bound, hasfar, scale, coeffs, band, chunk, softcap, tile, segment, rows,
                save_states, sinks):
        count("poly_triton.forward")
        p = _Plan(q, k, v, band, chunk, tile, segment, rows)
        weights = (float(scale), *(float(c) for c in coeffs))
        ta, tb = _tiles(p.d, tile, q.device)
        st, sd = _key_states(p, k, v, valid, ta, tb, weights)
        out, m, den = _readout(p, q, k, v, valid, bound, hasfar, ta, tb, st, sd, weights, band, softcap)
        if sinks is not None:  # ops/sinks.py: the kernels' backward is exact for the folded (out, m, den)
            out, m, den = fold_sink(out, m, den, sinks)
        ctx.save_for_backward(q, k, v, valid, hasfar, out, m, den, ta, tb, sinks)
        # not saved tensors: the backward drops them once read (it holds U next), a second one rebuilds them
        ctx.states = (st, sd) if save_states else None
        ctx.args = (scale, coeffs, band, chunk, softcap, tile, segment, rows)
        return out

    @staticmethod
    def backward(ctx, do):
        count("poly_triton.backward")
        q, k, v, valid, hasfar, out, m, den, ta, tb, sinks = ctx.saved_tensors
        scale, coeffs, band, chunk, softcap, tile, segment, rows = ctx.args
        p = _Plan(q, k, v, band, chunk, tile, segment, rows)
        weights = (float(scale), *(float(c) for c in coeffs))
        st, sd = ctx.states or _key_states(p, k, v, valid, ta, tb, weights)
        ctx.states = None
        do = do.contiguous()  # same layout as out: the kernels share its strides
        fa, fb, dd = torch.empty_like(m), torch.empty_like(m), torch.empty_like(m)
        # float32 gradients: the far kernels add to them (the direct passes write every row first, unless dk / dv
        # are added atomically)
        key_major = TUNING["key_major"]
        dq = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        dk, dvv = ((torch.empty if key_major else torch.zeros)(t.shape, dtype=torch.float32, device=q.device)
                   for t in (k, v))
        direct = dict(LAG=p.lag, SEG=p.seg, R=p.r, D=p.d, DV=p.dv, BT=chunk, BD=p.bd, BDV=p.bdv,
                      HAS_SOFTCAP=softcap is not None, DT=p.dt, num_warps=p.nw_direct, num_stages=p.stages_direct)
        scalars = (weights[0], int(band), *weights[1:], float(softcap or 0.0))
        strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3])
        _launch(_direct_bwd_q, (p.nq // chunk, p.b * p.h),
            q, k, v, valid, hasfar, out, do, m, den, fa, fb, dd, dq, dk, dvv, *strides, p.nq, p.nk, p.h, p.g, *scalars,
            ATOMIC_KV=not key_major, **direct,
        )
        if key_major:
            _launch(_direct_bwd_kv, (p.nk // chunk, p.b * p.hkv),
                q, k, v, valid, do, m, den, dd, fa, fb, dk, dvv, *strides, p.nq, p.nk, p.hkv, p.g, *scalars,
                BQ=min(64 if q.element_size() == 2 else 32, chunk), **direct,  # float32: 64 rows spill 0.7 KB
            )
        if p.ns > 1:
            nqb, nkb = triton.cdiv(p.nq, chunk * p.r), triton.cdiv(p.nk, chunk * p.r)
            nt, nl, nr, base = p.geometry()
            _launch(_far_bwd_dq, (nqb, p.b * p.h),
                q, do, fa, fb, st, sd, ta, tb, dq, *q.stride()[:3], *out.stride()[:3], *dq.stride()[:3],
                p.nq, p.nk, p.h, p.g, p.ns, nt, nl, nr, base,
                LAG=p.lag, SEG=p.seg, R=p.r, BDV=p.bdv_read, BS=p.bs, **p.meta(),
            )
            del st, sd  # before U: the two are the largest buffers (4.6 GiB each at 1M tokens, D = 128)
            u, ud = _query_states(p, q, do, fa, fb, ta, tb, weights)
            _launch(_far_bwd_v, (nkb, p.b * p.hkv, triton.cdiv(p.dv, p.bdv_read)),
                k, valid, u, ta, tb, dvv, *k.stride()[:3], *dvv.stride()[:3], p.nk, p.hkv, p.ns, nt, nl, nr, base,
                SEG=p.seg, R=p.r, BDV=p.bdv_read, **p.meta(),
            )
            _launch(_far_bwd_k, (nkb, p.b * p.hkv),
                k, v, valid, u, ud, ta, tb, dk, *k.stride()[:3], *v.stride()[:3], *dk.stride()[:3],
                p.nk, p.hkv, p.ns, nt, nl, nr, base,
                SEG=p.seg, R=p.r, BDV=p.bdv_read, BS=p.bs, **p.meta(),
            )
            del u, ud
        # one cast at a time: at 1M tokens each float32 gradient is gigabytes
        dq = dq.to(q.dtype)
        dk = dk.to(k.dtype)
        dsinks = sink_grad(do, out, m, den, sinks) if sinks is not None and ctx.needs_input_grad[15] else None
        return (dq, dk, dvv.to(v.dtype)) + (None,) * 12 + (dsinks,)


def default_rows(chunk: int, dtype: torch.dtype, d: int) -> int:
    """Query chunks per readout program: READ_ROWS rows, within 1 .. 2 chunks; float32 at D > 64 takes 1 (its
    2-chunk forward needs 264 KiB of shared memory even unpipelined)."""
    if dtype == torch.float32 and d > 64:
        return 1
    return 2 if 2 * chunk <= READ_ROWS else 1


def poly_triton_attention(q, k, v, scale, coeffs, band=0, chunk=64, softcap=None, kv_valid=None, tile=BA,
                          segment="auto", rows_per_block=None, save_states=False, sinks=None):
    """Degree-2 polynomial attention with the fused kernels: same signature and function as
    `poly_chunk_attention`. q: [B, H, Nq, D], k, v: [B, Hkv, Nk, D].

    tile: coordinates per quadratic feature tile (8 or 16; a tile is tile^2 features). segment: tokens between
    stored prefix states (a power of two, >= chunk * rows_per_block; "auto" keeps the states under 10 GiB, or
    an eighth of a smaller GPU). Keys after a query's boundary state are computed directly, so larger segments
    trade state memory for direct work. rows_per_block: query chunks per readout program, sharing each state
    slice it reads (1 or 2; None: `default_rows`). save_states: keep the boundary states from the forward for
    the backward instead of recomputing them there (saves one key sweep; holds up to the state budget per call
    until the backward, which a many-layer model at long context cannot afford). sinks: [H] attention-sink
    logits or None (`ops.sinks`)."""
    if rows_per_block is None:
        rows_per_block = default_rows(chunk, q.dtype, max(q.shape[-1], v.shape[-1]))
    if tile not in (8, 16):
        raise ValueError(f"tile must be 8 or 16, got {tile}")
    if rows_per_block not in (1, 2):  # 4 (256-row blocks) needs more shared memory than an H100 has at D = 128
        raise ValueError(f"rows_per_block must be 1 or 2, got {rows_per_block}")
    if len(coeffs) != 3:
        raise ValueError(f"the Triton kernels implement degree 2; got degree {len(coeffs) - 1} (use kernel='torch')")
    if chunk < 16 or chunk & (chunk - 1):
        raise ValueError(f"the Triton kernels need chunk_size a power of two >= 16, got {chunk}")
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"the Triton kernels take float32, bfloat16 or float16 inputs, got {q.dtype} "
                         "(use kernel='torch')")
    if q.dtype == torch.float32 and max(q.shape[-1], v.shape[-1]) > 128 and chunk > 32:
        # the direct passes' float32 [chunk, 256] blocks take 256-320 KiB of shared memory (H100: 227 KiB)
        raise ValueError(f"float32 inputs with head_dim > 128 need chunk_size <= 32 in the Triton kernels, got "
                         f"{chunk} (or use bfloat16 / float16, or kernel='torch')")
    nq = q.shape[2]
    qp, kp, vp, valid = pad_to_chunks(q, k, v, kv_valid, chunk)
    if kv_valid is not None:  # invalid keys as zero rows: then only the constant feature needs their mask (and
        kp = kp * valid[:, None, :, None].to(kp.dtype)  # autograd zeroes their dk through this product)
    b, h, nqp, d = qp.shape
    hkv, nkp, dv = kp.shape[1], kp.shape[2], vp.shape[-1]
    if segment == "auto":
        item = 4 if q.dtype == torch.float32 else 2
        segment = auto_segment(b, hkv, nkp, d, dv, chunk, tile, item, state_budget(q.device))
    if not isinstance(segment, int) or segment & (segment - 1) or segment < chunk * rows_per_block:
        raise ValueError(f"segment must be 'auto' or a power of two >= chunk_size * rows_per_block "
                         f"({chunk * rows_per_block}), got {segment!r}")
    # row shift inputs (as in chunk.py): the far bound and whether a row has far keys at all
    bound = far_log_bound(qp.view(b, hkv, h // hkv, nqp, d), kp, valid, scale, coeffs).reshape(b, h, nqp)
    slots = torch.arange(nkp - nqp, nkp, device=q.device)[None]
    hasfar = has_far_key(valid, slots, band).to(torch.int32).contiguous()
    out = PolyTritonFunction.apply(qp, kp, vp, valid.to(torch.int32).contiguous(), bound.float().contiguous(),
                                   hasfar, float(scale), tuple(float(c) for c in coeffs), int(band), int(chunk),
                                   softcap, int(tile), int(segment), int(rows_per_block), bool(save_states), sinks)
    return out[:, :, :nq]
