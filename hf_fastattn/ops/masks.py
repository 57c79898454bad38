"""Mask geometry shared by every op.

Conventions (all ops): queries are the last Nq key slots (bottom-right alignment), so query row i sits at
key slot `q_start + i` with `q_start = Nk - Nq`. A key slot j is visible from row i when
`j <= q_start + i` (causal), `q_start + i - j < window` (sliding window, the query itself included) and
`kv_valid[b, j]` (padding). Packed sequences never reach an op: the backend unpacks them first.
"""

from __future__ import annotations

import functools
import operator

import torch


def visible(
    rows: torch.Tensor, cols: torch.Tensor, q_start: int, causal: bool = True, window: int | None = None
) -> torch.Tensor | None:
    """Bool [len(rows), len(cols)]: which key slots `cols` the query rows `rows` may see (None: all)."""
    if not causal and window is None:
        return None
    dist = (rows[:, None] + q_start) - cols[None, :]  # i - j in slot units
    mask = dist >= 0 if causal else torch.ones_like(dist, dtype=torch.bool)
    if window is not None:
        mask = mask & (dist < window)
    return mask


def key_range(r0: int, r1: int, q_start: int, nk: int, causal: bool, window: int | None) -> tuple[int, int]:
    """Half-open range of key slots that query rows [r0, r1) can see at all."""
    hi = min(nk, q_start + r1) if causal else nk
    lo = max(0, q_start + r0 - window + 1) if window is not None else 0
    return lo, max(lo, hi)


def dense_mask(
    nq: int,
    nk: int,
    causal: bool = True,
    window: int | None = None,
    kv_valid: torch.Tensor | None = None,
    device=None,
) -> torch.Tensor:
    """Bool [B or 1, 1, Nq, Nk] mask for the quadratic references (never used by the fast ops)."""
    rows = torch.arange(nq, device=device)
    cols = torch.arange(nk, device=device)
    mask = visible(rows, cols, nk - nq, causal, window)
    if mask is None:
        mask = torch.ones(nq, nk, dtype=torch.bool, device=device)
    mask = mask[None, None]
    if kv_valid is not None:
        mask = mask & kv_valid[:, None, None, :].bool()
    return mask


def group_queries(q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[B, H, N, D] -> [B, Hkv, G, N, D] (a view): the G query heads that share one KV head (GQA)."""
    b, h, n, d = q.shape
    if h % num_kv_heads:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({num_kv_heads})")
    return q.view(b, num_kv_heads, h // num_kv_heads, n, d)


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, Hkv, N, D] -> [B, Hkv * groups, N, D]; only the quadratic references use it."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def autocast_off(op):
    """Run an op (first argument q) with autocast disabled: the op picks its own precisions (float32 accumulation
    for 16-bit inputs), which autocast would undo by running its matmuls in bf16 (prefix states, FFT inputs and the
    rows computed directly rounded to 8 bits; conv's direct rows crashed on the mixed dtypes)."""

    @functools.wraps(op)
    def run(q, *args, **kwargs):
        with torch.autocast(q.device.type, enabled=False):
            return op(q, *args, **kwargs)

    return run


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64 (gradcheck), everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def valid_slots(kv_valid: torch.Tensor | None, k: torch.Tensor) -> torch.Tensor:
    """[B, Nk] bool: kv_valid, or every key slot of k [B, Hkv, Nk, D] real."""
    if kv_valid is None:
        return torch.ones(k.shape[0], k.shape[2], dtype=torch.bool, device=k.device)
    return kv_valid.bool()


def check_kv_valid(kv_valid: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """The padding mask as bool [B, Nk] on q's device, or None; a mask of another shape is refused (a
    broadcast [Nk] or [B, 1, Nk] would silently mask the wrong slots)."""
    if kv_valid is None:
        return None
    if not isinstance(kv_valid, torch.Tensor) or tuple(kv_valid.shape) != (k.shape[0], k.shape[2]):
        shape = tuple(kv_valid.shape) if isinstance(kv_valid, torch.Tensor) else type(kv_valid).__name__
        raise ValueError(f"kv_valid must be a bool tensor [B, Nk] = [{k.shape[0]}, {k.shape[2]}] (False on padded "
                         f"key slots); got {shape}")
    if kv_valid.is_floating_point() or kv_valid.is_complex():
        raise ValueError(f"kv_valid must be bool (or integer 0/1), True where a key slot is real; got {kv_valid.dtype}")
    return kv_valid.to(device=q.device, dtype=torch.bool)


def check_int(name: str, value, minimum: int) -> int:
    """An integer option >= minimum (bools and floats refused: chunk=1.5 or band=True are mistakes)."""
    try:
        n = operator.index(value)  # int, numpy and 0-d integer tensors; not 1.5
    except TypeError:
        n = None
    if isinstance(value, bool) or n is None or n < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")
    return n


def check_softcap(softcap) -> float | None:
    """None (no capping) or a finite positive float: logits -> softcap * tanh(logits / softcap)."""
    if softcap is None:
        return None
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not 0 < float(softcap) < float("inf"):
        raise ValueError(f"softcap must be None or a finite number > 0; got {softcap!r}")
    return float(softcap)


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Shapes every op takes: q [B, H, Nq, D], k and v [B, Hkv, Nk, D] with H a multiple of Hkv, Nq <= Nk."""
    if q.dim() != 4 or k.dim() != 4 or k.shape[:-1] != v.shape[:-1] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"expected q [B, H, Nq, D], k and v [B, Hkv, Nk, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    if q.shape[2] > k.shape[2]:
        raise ValueError(f"more queries ({q.shape[2]}) than keys ({k.shape[2]}): queries must be the last key positions")
