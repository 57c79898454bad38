"""The bounded-entry guard: cheap per-head statistics that predict the polynomial method's error.

The papers' guarantee needs |s q.k| = o(sqrt(log n)). Two O(N d^2) statistics per head:
  * bound: B = s max_i |q_i| max_j |k_j| >= every |x_ij|; worst-case weight error e(B) = max_{|x|<=B} |P e^{-x} - 1|.
  * sigma: the rms logit, s sqrt(tr(M_q M_k)) with the second-moment matrices M = X^T X / n (so
    E[(q.k)^2] over random pairs); the predicted relative output error is the Gaussian-logit model of
    `features.gaussian_output_error` (exact band ignored: the prediction is conservative).
  * rounding: the feature expansion phi(q).S adds up, per key, terms as large as abs_poly(B) =
    sum_t |c_t| B^t to give P(x), which can be ~1. Where coordinate products are large but cancel (q.k small
    although |q||k| is not: outlier dimensions, a degree-4 polynomial), float rounding of those terms is what
    is left of the denominator (degree 4, D = 2, s q_a k_a = +-100: finite outputs of 6e31 in float32).
    u abs_poly(B) bounds it, u the unit roundoff of the features / states on the path that runs
    (`poly.path_roundoff`); the errors measured on random and cancelling heads (D = 2-64, float32 torch path,
    bf16 Triton) were 1/4 to 1/60 of the bound, so `ROUNDING_TYPICAL` of it joins the prediction.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from ..masks import acc_dtype
from .chunk import max_key_norm
from .features import abs_poly, gaussian_output_error, weight_error

_SIGMAS = np.geomspace(1e-3, 1e3, 241)
ROUNDING_TYPICAL = 1 / 16  # measured error / rounding bound, typical (see the module docstring)


@functools.lru_cache(maxsize=32)
def _error_table(coeffs: tuple) -> np.ndarray:
    return np.array([gaussian_output_error(coeffs, float(s)) for s in _SIGMAS])


def predicted_error(coeffs: tuple, sigma: float) -> float:
    """Interpolated `gaussian_output_error` (a table per polynomial, log-spaced in sigma)."""
    if not math.isfinite(sigma):
        return math.inf
    table = _error_table(tuple(coeffs))
    return float(np.interp(math.log(max(sigma, 1e-3)), np.log(_SIGMAS), table, right=table[-1]))


@dataclass
class GuardStats:
    """Per query head (max over the batch)."""

    bound: list[float]  # B = s max|q| max|k|
    sigma: list[float]  # rms logit
    predicted: list[float]  # predicted relative output error: max(Gaussian-logit model at sigma, rounding)
    rounding: list[float] | None = None  # bound on the float rounding of the feature expansion, u abs_poly(B)
    coeffs: tuple | None = None  # the polynomial (for `worst_weight_error`)

    @property
    def worst(self) -> float:
        return max(self.predicted)

    @property
    def worst_weight_error(self) -> list[float]:
        """e(B) per head, the worst relative error of one weight within the bound (on demand: a 4001-point scan
        per head, which had cost a decode call more than its attention)."""
        return [weight_error(self.coeffs, bb) if bb < 1e4 else math.inf for bb in self.bound]

    def describe(self, heads: list[int], labels: list[int] | None = None) -> str:
        """heads: indices into the statistics; labels: the layer's head number of each index (a plan group's)."""
        def rounding(h):
            bound = 0.0 if self.rounding is None else self.rounding[h]
            return f", float rounding bound {bound:.2g}" if bound * ROUNDING_TYPICAL > 1e-3 else ""

        return ", ".join(
            f"h{h if labels is None else labels[h]}: |x|<={self.bound[h]:.3g}, rms {self.sigma[h]:.3g}{rounding(h)}, predicted error "
            f"{self.predicted[h]:.1%}" for h in heads
        )


def _real_keys(k, kv_valid) -> tuple:
    """k in the accumulation dtype with padded slots zeroed, and the real keys' count [B]."""
    kf = k.to(acc_dtype(k.dtype))
    if kv_valid is None:
        return kf, torch.full((k.shape[0],), k.shape[2], device=k.device)
    return kf.masked_fill(~kv_valid.bool()[:, None, :, None], 0.0), kv_valid.bool().sum(-1)


@torch.no_grad()
def key_moments(k: torch.Tensor, kv_valid: torch.Tensor | None = None) -> tuple:
    """The key side of the guard over the real keys of k [B, Hkv, N, D]: (max |k| [B, Hkv], sum of k k^T
    [B, Hkv, D, D], count [B]), in the accumulation dtype. Sums of key slots: a decode state accumulates them
    block by block (`recurrent.py`)."""
    kf, count = _real_keys(k, kv_valid)
    return max_key_norm(kf), kf.transpose(-1, -2) @ kf, count


@torch.no_grad()
def guard_stats(q, k, scale, coeffs, kv_valid=None, roundoff: float = 0.0, moments: tuple | None = None) -> GuardStats:
    """q: [B, H, Nq, D], k: [B, Hkv, Nk, D] -> per-head statistics over real tokens. `roundoff`: the unit
    roundoff u of the path that will run (`poly.path_roundoff`; 0 leaves rounding out of the prediction).
    `moments`: `key_moments` of k, kept from earlier calls (then k's values are not read).

    kv_valid [B, Nk] marks real keys; the queries are the last Nq positions (bottom-right), so kv_valid[:, -Nq:]
    marks the real query rows. Padded slots are left out of the maxima, the second moments and their counts:
    whatever a padded slot holds changes nothing. sigma is a sequence's rms logit s sqrt(tr(M_q M_k)); both it and
    the bound are the max over the batch's sequences (a per-sequence worst case)."""
    b, h, nq, d = q.shape
    hkv, nk_len = k.shape[1], k.shape[2]
    g = h // hkv
    qf = q.float()
    if kv_valid is not None and nq <= nk_len:
        q_real = kv_valid.bool()[:, -nq:]
    else:  # every key real (no mask to apply to them), or queries beyond the keys
        q_real = torch.ones(b, nq, dtype=torch.bool, device=q.device)
    qf = qf.masked_fill(~q_real[:, None, :, None], 0.0)
    nq_real = q_real.sum(-1).clamp_min(1).float()[:, None]  # [B, 1]
    qmax = qf.norm(dim=-1).amax(-1)  # [B, H]
    if moments is None and g * nq < d:
        # a few rows (decode): tr(Mq Mk) = mean over (row, key) of (q.k)^2, from the logits, O(Nq Nk D), where the
        # key moments would cost O(Nk D^2)
        kf, count = _real_keys(k, kv_valid)
        x = qf.reshape(b, hkv, g * nq, d) @ kf.float().transpose(-1, -2)  # [B, Hkv, G Nq, Nk]
        tr = x.view(b, h, -1).square().sum(-1) / (nq_real * count.clamp_min(1).float()[:, None])
        kmax = max_key_norm(kf)
    else:
        kmax, ksq, count = key_moments(k, kv_valid) if moments is None else moments
        mq = qf.transpose(-1, -2) @ qf / nq_real[..., None, None]  # [B, H, D, D]
        mk = (ksq.float() / count.clamp_min(1).float()[:, None, None, None]).repeat_interleave(g, dim=1)
        tr = (mq * mk).sum((-1, -2))  # tr(Mq Mk), both symmetric
    kmax = kmax.float().repeat_interleave(g, dim=1)  # [B, H]
    sigma = scale * tr.clamp_min(0).sqrt()
    bound = (scale * qmax * kmax).amax(0).tolist()
    sigma = sigma.amax(0).tolist()
    coeffs = tuple(float(c) for c in coeffs)
    rounding = [roundoff * abs_poly(coeffs, bb) for bb in bound]
    return GuardStats(
        bound=bound,
        sigma=sigma,
        predicted=[max(predicted_error(coeffs, s), ROUNDING_TYPICAL * r) for s, r in zip(sigma, rounding)],
        rounding=rounding,
        coeffs=coeffs,
    )
