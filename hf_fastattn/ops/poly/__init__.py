"""Polynomial-method attention (Alman & Song; the RoPE-attention and multi-layer-gradient papers)."""

from __future__ import annotations

import warnings

import torch

from ..masks import autocast_off, check_int, check_kv_valid, check_qkv, check_softcap
from ..sinks import check_sinks
from .chunk import poly_chunk_attention, poly_direct_attention
from .features import FeatureMap, check_feature_count, poly_coefficients
from .guard import GuardStats, guard_stats
from .naive import naive_poly_attention
from .recurrent import PolyDecodeState, poly_recurrent_attention

__all__ = ["poly_attention", "poly_recurrent_attention", "PolyDecodeState", "path_roundoff", "naive_poly_attention", "poly_coefficients", "guard_stats", "GuardStats", "FeatureMap"]


_TRITON_FAILED: list = []
# What kernel="auto" sends to Triton, from the H100 runs in benchmarks/results/h100 (segmented kernels):
# fwd+bwd compiles and is measured for D = 64 and 128 with 64-token chunks.
_TRITON_MAX_D, _TRITON_CHUNK = 128, 64


def _triton_available() -> bool:
    try:
        from . import triton as _  # noqa: F401
    except ImportError:
        return False
    return True


def auto_uses_triton(is_cuda: bool, degree: int, head_dim: int, dtype: torch.dtype, value_dim: int | None = None) -> bool:
    """Whether kernel="auto" runs the Triton kernels (for inputs longer than one chunk). `value_dim`: V's width
    when it differs from the query/key head_dim (latent attention)."""
    widest = max(head_dim, head_dim if value_dim is None else value_dim)
    fits = is_cuda and degree == 2 and widest <= _TRITON_MAX_D and dtype != torch.float64
    return fits and _triton_available() and not _TRITON_FAILED


def path_roundoff(q: torch.Tensor, v: torch.Tensor, degree: int, chunk: int, kernel: str,
                  decode_state: bool = False) -> float:
    """Unit roundoff of the feature expansion on the path `poly_attention` takes for these inputs (the guard's
    rounding term): 0 for the direct form (Nq <= chunk: P is evaluated on each logit, nothing cancels) unless
    the far keys come from a decode state (`poly_recurrent_attention`, features in the accumulation dtype); the
    Triton kernels keep bf16 states for 16-bit inputs and run float32 dots on TF32 tensor cores on a GPU; the
    torch chunk path computes features and states in the accumulation dtype (float32, float64 for float64)."""
    if q.shape[2] <= chunk and not decode_state:
        return 0.0
    auto = kernel == "auto" and auto_uses_triton(q.is_cuda, degree, q.shape[-1], q.dtype, v.shape[-1])
    if (kernel == "triton" or auto) and not decode_state:
        if q.dtype != torch.float32:
            return 2.0**-9
        return 2.0**-11 if q.is_cuda else 2.0**-24
    return 2.0**-53 if q.dtype == torch.float64 else 2.0**-24


@autocast_off
def poly_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    *,
    degree: int = 2,
    coeffs: str = "taylor",
    fit_range: float = 2.0,
    band: int = 0,
    chunk: int = 128,
    softcap: float | None = None,
    kv_valid: torch.Tensor | None = None,
    feature_cap: int = 65536,
    kernel: str = "auto",
    save_states: bool = False,
    sinks: torch.Tensor | None = None,
    output_final_state: bool = False,
):
    """Causal polynomial attention: exp(x) -> P(x) beyond an exact band of `band` keys.

    Args:
        q: [B, H, Nq, D], the last Nq key positions; k, v: [B, Hkv, Nk, D] (H a multiple of Hkv).
        scale: logits are x = scale * q.k.
        degree, coeffs, fit_range: the even-degree polynomial (see `poly_coefficients`).
        band: keys with 0 <= i - j < band get exp (softcapped if `softcap`), the rest P(x).
        chunk: tokens per chunk of the linear-time form.
        kv_valid: [B, Nk] bool, False on padded key slots.
        feature_cap: the largest allowed feature count per head.
        kernel: "auto" (Triton on 16/32-bit CUDA tensors for degree 2 and D <= 128, else torch), "torch",
            "triton".
        save_states: Triton only: keep the boundary prefix states from the forward for the backward (one
            sweep less; up to 10 GiB per call held until the backward) instead of recomputing them.
        sinks: [H] attention-sink logits (GPT-OSS's s_aux) joining every row's normaliser, or None.
        output_final_state: return (out, final) with final the torch chunk path's last prefix state (S, n)
            (`poly_chunk_attention`), None where another path ran (the direct form and the Triton kernels keep
            none): what `recurrent.from_prefill` starts a decode state from.

    Returns:
        [B, H, Nq, D]. Nq <= chunk (decode) uses the direct O(Nq Nk D) form of the same function; the backend
        decodes with a kept prefix state instead (`poly_recurrent_attention`) when that costs less.
    """
    out, final = _poly_attention(q, k, v, scale, degree, coeffs, fit_range, band, chunk, softcap, kv_valid,
                                 feature_cap, kernel, save_states, sinks)
    return (out, final) if output_final_state else out


def _poly_attention(q, k, v, scale, degree, coeffs, fit_range, band, chunk, softcap, kv_valid, feature_cap, kernel,
                    save_states, sinks):
    """poly_attention's (out, final state or None)."""
    check_qkv(q, k, v)
    sinks = check_sinks(sinks, q.shape[1])
    band, chunk = check_int("band", band, 0), check_int("chunk", chunk, 1)
    softcap, kv_valid = check_softcap(softcap), check_kv_valid(kv_valid, q, k)
    if kernel not in ("auto", "torch", "triton"):
        raise ValueError(f"kernel must be 'auto', 'torch' or 'triton'; got {kernel!r}")
    c = poly_coefficients(degree, coeffs, fit_range)
    check_feature_count(q.shape[-1], degree, feature_cap)
    if q.shape[2] <= chunk:
        return poly_direct_attention(q, k, v, scale, c, band, softcap, kv_valid, sinks), None
    if kernel == "triton":
        from .triton import poly_triton_attention

        return poly_triton_attention(q, k, v, scale, c, band, chunk, softcap, kv_valid, save_states=save_states,
                                     sinks=sinks), None
    if kernel == "auto" and auto_uses_triton(q.is_cuda, degree, q.shape[-1], q.dtype, v.shape[-1]):
        from .triton import poly_triton_attention

        try:  # the chunk is a schedule, not part of the function: the kernels' measured-good one is used
            return poly_triton_attention(q, k, v, scale, c, band, _TRITON_CHUNK, softcap, kv_valid,
                                         save_states=save_states, sinks=sinks), None
        except torch.OutOfMemoryError:  # not a kernel failure: the torch path would not fit either
            raise
        except Exception as err:  # a compile / launch failure on this GPU: say so once, then use torch
            if not isinstance(err, ValueError):  # the kernels refusing these arguments says nothing of other calls
                _TRITON_FAILED.append(repr(err))
            warnings.warn(f"poly Triton kernels failed ({type(err).__name__}: {err}); using the torch chunk path "
                          "(kernel='torch' silences this, kernel='triton' raises)", RuntimeWarning, stacklevel=2)
    return poly_chunk_attention(q, k, v, scale, c, band, chunk, softcap, kv_valid, sinks, output_final_state=True)
