"""Conv-basis recovery: choose the basis columns s_1 = 0 < s_2 < ... and read the cumulative bases.

The recovered representation is (starts [B, Hs, k], cum [B, H, k, N]): column s_u of the masked score matrix
from the diagonal down, cum[u, delta] = H[s_u + delta, s_u] (delta < L - s_u), so that every column j of
segment u is approximated by cum[u] shifted to the diagonal. Only columns are ever formed — one score
column s Q k_j^T costs N D — never the N x N matrix.

Placements:
  * "search": the paper's algorithm. b_1 = column 0; then for t = 2..k a binary search for the first
    column j whose first T diagonal entries deviate from the running prediction (the first T entries of
    the current cumulative basis): |H[j:j+T, j] - pred|_1 >= delta - 2 T eps. Each probe costs T D; the
    heads search independently and are vectorised (all [B, H] heads advance one bisection step at once).
  * "even": s_u = floor(u L / k); "geometric": basis columns log-spaced towards the end of the sequence
    (s_u = L - round(L^{1 - u/(k-1)})), finer where fewer rows look. Both are shared by all heads.
"""

from __future__ import annotations

import math

import torch

from ...config import CONV_PLACEMENTS as PLACEMENTS
from ..masks import acc_dtype


class ScoreColumns:
    """Column oracle of the causal score matrix H = s Q K^T of every query head.

    q: [B, H, N, D], k: [B, Hkv, N, D]; lengths [B]: valid prefix of every row (right padding). Scores come out
    in the accumulation dtype: a bf16 logit of size 10 would already be off by 0.03 before the exp.
    """

    def __init__(self, q, k, scale, lengths):
        dt = acc_dtype(q.dtype)
        self.q, self.k, self.scale, self.lengths = q.to(dt), k.to(dt), scale, lengths
        self.b, self.h, self.n, self.d = q.shape
        self.groups = self.h // k.shape[1]

    def _keys(self, cols):
        """cols [B, H, m] -> the keys of each query head's KV head at those columns, [B, H, m, D] (no K repeat)."""
        b, h, m = cols.shape
        idx = cols.reshape(b, self.k.shape[1], self.groups * m)
        return self.k.gather(2, idx[..., None].expand(*idx.shape, self.d)).view(b, h, m, self.d)

    def probe(self, cols: torch.Tensor, t: int) -> torch.Tensor:
        """[B, H] columns -> [B, H, t] entries H[j + r, j] (r < t); rows past the length are NaN."""
        rows = cols[..., None] + torch.arange(t, device=cols.device)
        qr = self.q.gather(2, rows.clamp(max=self.n - 1)[..., None].expand(*rows.shape, self.d))
        vals = self.scale * (qr * self._keys(cols[..., None])).sum(-1)
        return vals.masked_fill(rows >= self.lengths[:, None, None], float("nan"))

    def columns(self, starts: torch.Tensor) -> torch.Tensor:
        """starts [B, Hs, k] -> cum [B, H, k, N]: cum[u, delta] = H[s_u + delta, s_u], 0 past the length."""
        starts = starts.expand(self.b, self.h, -1).clamp(max=self.n - 1)
        full = self.scale * (self.q @ self._keys(starts).transpose(-1, -2))  # [B, H, N, k]
        rows = starts[..., None] + torch.arange(self.n, device=starts.device)  # [B, H, k, N]
        cum = full.transpose(-1, -2).gather(-1, rows.clamp(max=self.n - 1))
        return cum.masked_fill(rows >= self.lengths[:, None, None, None], 0.0)


class DenseColumns:
    """The same oracle over an explicit score matrix h [B, H, N, N] (tests: synthetic conv-basis matrices)."""

    def __init__(self, h, lengths):
        self.h_mat, self.lengths = h, lengths
        self.b, self.h, self.n = h.shape[0], h.shape[1], h.shape[-1]

    def probe(self, cols, t):
        rows = cols[..., None] + torch.arange(t, device=cols.device)
        colmat = self.h_mat.gather(-1, cols[..., None, None].expand(self.b, self.h, self.n, 1))[..., 0]
        vals = colmat.gather(-1, rows.clamp(max=self.n - 1))
        return vals.masked_fill(rows >= self.lengths[:, None, None], float("nan"))

    def columns(self, starts):
        starts = starts.expand(self.b, self.h, -1)
        colmat = self.h_mat.gather(-1, starts[..., None, :].expand(self.b, self.h, self.n, starts.shape[-1]))
        rows = starts[..., None] + torch.arange(self.n, device=starts.device)
        cum = colmat.transpose(-1, -2).gather(-1, rows.clamp(max=self.n - 1))
        return cum.masked_fill(rows >= self.lengths[:, None, None, None], 0.0)


def placed_starts(lengths: torch.Tensor, k: int, placement: str) -> torch.Tensor:
    """[B, 1, k] basis columns shared by all heads ("even" / "geometric"); duplicates leave empty segments."""
    u = torch.arange(k, device=lengths.device, dtype=torch.float64)
    length = lengths.to(torch.float64)[:, None]
    if placement == "even":
        starts = torch.floor(u * length / k)
    elif placement == "geometric":
        frac = u / max(k - 1, 1)
        starts = length - torch.round(length ** (1 - frac))
        starts[:, 0] = 0
    else:
        raise ValueError(f"conv_placement must be one of {', '.join(PLACEMENTS)}; got {placement!r}")
    # clamp_min: an empty row (L = 0) would get L - round(0 ** 0) = -1 from "geometric"
    return torch.minimum(starts, (length - 1).clamp_min(0)).clamp_min(0).long()[:, None, :]


@torch.no_grad()
def search_starts(oracle, k: int, T: int, delta: float, eps: float) -> torch.Tensor:
    """The paper's recovery: [B, H, k] basis columns; heads that need fewer bases repeat their last one."""
    b, h = oracle.b, oracle.h
    dev = oracle.lengths.device
    length = oracle.lengths[:, None].expand(b, h)
    starts = torch.zeros(b, h, k, dtype=torch.long, device=dev)
    pred = oracle.probe(starts[..., 0], T)  # first T entries of the current cumulative basis
    threshold = delta - 2 * T * eps
    steps = max(1, math.ceil(math.log2(max(oracle.n, 2)))) + 1
    for t in range(1, k):
        lo = starts[..., t - 1].clone()  # consistent with the prediction by construction
        hi = length.clone()  # sentinel: "deviates"
        for _ in range(steps):
            live = hi - lo > 1
            if not bool(live.any()):
                break
            mid = torch.where(live, (lo + hi) // 2, lo)
            diff = (oracle.probe(mid, T) - pred).abs()
            deviation = torch.where(torch.isnan(diff), torch.zeros_like(diff), diff).sum(-1)
            hit = live & (deviation >= threshold)
            hi = torch.where(hit, mid, hi)
            lo = torch.where(live & ~hit, mid, lo)
        found = hi < length
        starts[..., t] = torch.where(found, hi, starts[..., t - 1])
        if bool(found.any()):
            pred = torch.where(found[..., None], oracle.probe(starts[..., t], T), pred)
    return starts


def every_column(lengths: torch.Tensor, k: int) -> torch.Tensor:
    """[B, 1, k] starts s_u = min(u, L - 1): every column a basis (exact attention for rows with L <= k)."""
    return torch.minimum(torch.arange(k, device=lengths.device), (lengths[:, None] - 1).clamp_min(0))[:, None, :]


def recover(oracle, k: int, placement: str = "even", T: int = 8, delta: float = 0.5, eps: float = 1e-3):
    """(starts [B, Hs, k], cum [B, H, k, N]) for any oracle with `probe`, `columns` and `lengths`.

    A row with k >= its length L gets every column as a basis (s_u = min(u, L - 1)) whatever the placement, so
    that it is exact attention: "geometric" spacing and the search's tolerance would skip columns."""
    if k < 1:
        raise ValueError(f"conv_k must be >= 1, got {k}")
    if placement not in PLACEMENTS:  # checked here too: a fully covered batch never reaches placed_starts
        raise ValueError(f"conv_placement must be one of {', '.join(PLACEMENTS)}; got {placement!r}")
    lengths = oracle.lengths
    every = every_column(lengths, k)
    covered = (lengths <= k)[:, None, None]  # [B, 1, 1]
    if bool(covered.all()):
        starts = every
    else:
        if placement == "search":
            starts = search_starts(oracle, k, T, delta, eps)
        else:
            starts = placed_starts(lengths, k, placement)
        starts = torch.where(covered, every, starts)
    return starts, oracle.columns(starts)
