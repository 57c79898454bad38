"""The `fastattn` attention function and mask function registered with transformers.

transformers calls `fastattn_attention_forward(module, query, key, value, attention_mask, ...)` from every
attention layer with query [B, H, Nq, D] and key/value [B, Hkv, Nk, D] (already RoPE-rotated) and expects
[B, Nq, H, D] back. The mask comes from `fastattn_mask`, which never materialises an N x N mask: it
returns None (plain causal), a [B, 1, 1, L] bool validity mask over the first L key slots, or [B, 1, 1, L] int64
block ids where attention stays inside blocks (Llama 4's chunks, packed sequences). L < Nk means the
slots from L on are empty static-cache slots (the convention of transformers' FlashAttention path): they
are sliced away and the queries are the last Nq of the L filled slots.
A sliding window in transformers' mask travels with the mask tensor (`_WINDOW_ATTR`): some models (Qwen2-MoE,
PhiMoE) put the window only in the mask and do not pass `sliding_window=` to the attention call.
Blocks (from the mask, `cu_seq_lens_*` kwargs or position_ids that restart) are unpacked into a padded batch
of right-aligned rows so that no method lets state or attention cross a block boundary.

Under `torch.compile` dynamo traces only the attention function's front, which picks a path: the mask function
is `torch.compiler.disable`d (a graph break; it runs eagerly); an attention call is one custom op
(`hf_fastattn::attention`, with a backward op in training; section torch.compile) around the eager call, our
own autograd Functions and Triton kernels inside.
Traced, their host-side decisions (guard statistics, finite checks, packing detection) broke graphs anyway and
specialised on float values, so a layer recompiled on every call until dynamo's limit.
"""

from __future__ import annotations

import itertools
import warnings
import weakref
from functools import partial
from typing import Callable

import torch

from .config import get_config
from .ops.exact import exact_attention
from .ops.sinks import check_sinks

# method name -> fn(q, k, v, *, scale, causal, window, softcap, sinks, kv_valid, cfg, layer_idx, module)
# -> [B, H, Nq, D]
_METHODS: dict[str, Callable] = {}
# fn(module, layer_idx, q, k, v, kv_valid, opts) called with the inputs of every op call, after packed sequences
# and chunks are unpacked into rows of their own (diagnostics)
_HOOKS: list[Callable] = []


def register_method(name: str):
    """Decorator: make an op available as `fastattn_config['method'] = name`."""

    def wrap(fn):
        _METHODS[name] = fn
        return fn

    return wrap


@register_method("exact")
def _run_exact(q, k, v, *, scale, causal, window, softcap, kv_valid, cfg, layer_idx, module=None, sinks=None):
    return exact_attention(q, k, v, scale, causal, window, softcap, kv_valid, cfg.exact_block, sinks)


@register_method("band")
def _run_band(q, k, v, *, scale, causal, window, softcap, kv_valid, cfg, layer_idx, module=None, sinks=None):
    if cfg.local_window < 1:
        raise ValueError("fastattn method 'band' needs local_window >= 1 (the number of keys each query sees)")
    w = cfg.local_window if window is None else min(window, cfg.local_window)
    return exact_attention(q, k, v, scale, causal, w, softcap, kv_valid, cfg.exact_block, sinks)


class _NoModule:  # stands for the layer of an op called without one (weak-referenceable, lives forever)
    pass


_NO_MODULE = _NoModule()
# attention layer -> keys already warned about: once per layer of each model (a second model warns again)
_warned: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _warn_once(module, key, message: str) -> None:
    seen = _warned.setdefault(_NO_MODULE if module is None else module, set())
    if key not in seen:
        seen.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _guard_allows(method: str, stats, cfg, layer_idx, module=None) -> bool:
    """Apply `cfg.guard` to the predicted error; False means: run exact attention for this call."""
    bad = [h for h, e in enumerate(stats.predicted) if e > cfg.guard_tolerance]
    if not bad:
        return True
    band = (f"The prediction leaves out the exact band (local_window={cfg.local_window}): an upper bound for heads "
            "whose weight sits in the band, which hf_fastattn.diagnose measures head by head. " if cfg.local_window
            else "A local_window (an exact band) takes the largest logits out of the polynomial. ")
    message = (
        f"fastattn {method} (layer {layer_idx}): predicted relative output error {stats.worst:.1%} exceeds "
        f"guard_tolerance {cfg.guard_tolerance:.1%} on {len(bad)}/{len(stats.predicted)} heads "
        f"[{stats.describe(bad[:4], getattr(module, 'heads', None))}{', ...' if len(bad) > 4 else ''}]. The "
        "polynomial method needs small logits (|s q.k| = o(sqrt(log n))) and, against float rounding, no large "
        f"coordinate products cancelling in q.k. {band}Otherwise: a higher degree (if the logits are the cause), "
        "method='exact', or fine-tune through it."
    )
    if cfg.guard == "error":
        raise ValueError(message + " (guard='error')")
    if cfg.guard == "exact":
        _warn_once(module, ("exact", method), message + " Running exact attention instead (guard='exact').")
        return False
    _warn_once(module, ("warn", method), message + " (guard='warn': shown once per layer)")
    return True


def _finite_or_exact(out, method, layer_idx, fallback, module=None):
    """NaN/Inf never leave an approximate op: warn and recompute exactly."""
    if torch.isfinite(out).all():
        return out
    _warn_once(module, ("nonfinite", method), f"fastattn {method} (layer {layer_idx}) produced non-finite values; "
               "falling back to exact attention for such calls")
    return fallback()


_POLY_STATE = "_fastattn_poly_state"


@register_method("poly")
def _run_poly(q, k, v, *, scale, causal, window, softcap, kv_valid, cfg, layer_idx, module=None, sinks=None):
    """Prefill/training: the chunked (or Triton) form; decoding in inference against a long cache: the far keys
    in a prefix state kept on the module (`ops/poly/recurrent.py`), extended call by call."""
    from .ops.poly import guard_stats, path_roundoff, poly_attention, poly_coefficients, poly_recurrent_attention
    from .ops.poly.features import check_feature_count
    from .ops.poly.recurrent import from_prefill, key_moments as state_moments, worth_a_state

    def exact():
        return _run_exact(q, k, v, scale=scale, causal=causal, window=window, softcap=softcap, kv_valid=kv_valid,
                          cfg=cfg, layer_idx=layer_idx, sinks=sinks)

    # Sliding layers are already linear in N, and a band covering every key is exact attention.
    if window is not None or cfg.local_window >= k.shape[2]:
        return exact()
    nq, nk = q.shape[2], k.shape[2]
    stateful = (cfg.poly_decode_state and module is not None and not torch.is_grad_enabled() and nq < nk
                and nq <= cfg.chunk_size and worth_a_state(nk, nq, cfg.local_window, q.shape[-1], cfg.degree))
    coeffs = poly_coefficients(cfg.degree, cfg.poly_coeffs, cfg.fit_range)

    def guard_allows(moments=None):
        u = path_roundoff(q, v, cfg.degree, cfg.chunk_size, cfg.kernel, decode_state=stateful)
        return _guard_allows("poly", guard_stats(q, k, scale, coeffs, kv_valid, u, moments), cfg, layer_idx, module)

    if stateful:  # the guard after the state is extended: its key moments come from the state (no pass over K)
        check_feature_count(q.shape[-1], cfg.degree, cfg.feature_cap)
        out, state = poly_recurrent_attention(q, k, v, scale, coeffs, cfg.local_window, softcap, kv_valid, sinks,
                                              module.__dict__.get(_POLY_STATE))
        module.__dict__[_POLY_STATE] = state
        if cfg.guard != "off" and not guard_allows(state_moments(state, k, kv_valid)):
            return exact()
        return _finite_or_exact(out, "poly", layer_idx, exact, module)
    if cfg.guard != "off" and not guard_allows():
        return exact()
    if module is not None and torch.is_grad_enabled():
        module.__dict__.pop(_POLY_STATE, None)  # training: nothing to extend, keep no references
    # a prefill that decoding would keep a state for hands its last prefix state over (torch chunk path)
    hand_over = (cfg.poly_decode_state and module is not None and not torch.is_grad_enabled()
                 and worth_a_state(nk + 1, 1, cfg.local_window, q.shape[-1], cfg.degree))
    out = poly_attention(
        q, k, v, scale, degree=cfg.degree, coeffs=cfg.poly_coeffs, fit_range=cfg.fit_range, band=cfg.local_window,
        chunk=cfg.chunk_size, softcap=softcap, kv_valid=kv_valid, feature_cap=cfg.feature_cap, kernel=cfg.kernel,
        save_states=cfg.poly_save_states, sinks=sinks, output_final_state=hand_over,
    )
    if hand_over:
        out, final = out
        state = None if final is None else from_prefill(final, q, k, v, scale, coeffs, cfg.local_window, kv_valid)
        if state is None:  # a state of another sequence would only be rebuilt
            module.__dict__.pop(_POLY_STATE, None)
        else:
            module.__dict__[_POLY_STATE] = state
    return _finite_or_exact(out, "poly", layer_idx, exact, module)


_CONV_STATE = "_fastattn_conv_state"
_PLAN_STATE = "_fastattn_plan_state"
_STATES = (_POLY_STATE, _CONV_STATE, _PLAN_STATE)  # what layers keep between inference calls (`reset_states`)


@register_method("conv")
def _run_conv(q, k, v, *, scale, causal, window, softcap, kv_valid, cfg, layer_idx, module=None, sinks=None):
    """Prefill/training: recover the basis and apply it by FFT; in inference the basis is kept on the module
    so that later rows (decode, chunked prefill) extend the same approximation instead of recomputing it."""
    from .ops.conv import conv_attention, conv_decode, state_matches

    def exact():
        return _run_exact(q, k, v, scale=scale, causal=causal, window=window, softcap=softcap, kv_valid=kv_valid,
                          cfg=cfg, layer_idx=layer_idx, sinks=sinks)

    if window is not None:  # sliding layers are already linear in N
        return exact()
    nq = q.shape[2]
    if nq < k.shape[2]:
        state = getattr(module, _CONV_STATE, None)
        if not state_matches(state, k, kv_valid, nq):
            _warn_once(module, "conv-nostate", f"fastattn conv (layer {layer_idx}): no conv basis from a prefill of "
                       "this sequence (the cache was filled elsewhere, or beams were reordered); these rows are "
                       "computed exactly")
            return exact()
        out, state = conv_decode(q, k, v, scale, state, softcap, kv_valid, sinks)
    else:
        out, state = conv_attention(q, k, v, scale, k_bases=cfg.conv_k, placement=cfg.conv_placement, T=cfg.conv_T,
                                    delta=cfg.conv_delta, eps=cfg.conv_eps, softcap=softcap, kv_valid=kv_valid,
                                    return_state=True, sinks=sinks)
        rows = q.shape[0] * q.shape[1] * nq
        if state.direct_rows > 0.1 * rows:
            _warn_once(module, "conv-direct", f"fastattn conv (layer {layer_idx}): {state.direct_rows}/{rows} rows "
                       "were below the FFT's error floor (logit range too wide for the exp domain) and were computed "
                       "directly, which costs O(N D) each; diagnose this layer and prefer poly/exact for it")
    if module is not None:
        if torch.is_grad_enabled():
            module.__dict__.pop(_CONV_STATE, None)  # training: nothing to extend, keep no references
        else:
            module.__dict__[_CONV_STATE] = state
    return _finite_or_exact(out, "conv", layer_idx, exact, module)


# ----------------------------------------------------------------------------------------------- mask
# transformers builds the mask it asks for as a composition of index functions (`mask_function`). The compact mask
# carries causal order, a sliding window (passed to the attention call again), padding / packing (the 2D mask and
# position_ids) and chunks (block ids, below); any other part would be dropped, so it is refused by name.
_MASK_PARTS_KEPT = {"causal_mask_function", "sliding_window_overlay", "padding_mask_function",
                    "packed_sequence_mask_function", "chunked_overlay"}
_MASK_PARTS_NAMED = {
    "blockwise_overlay": "block-bidirectional attention (block_sequence_ids)",
    "bidirectional_mask_function": "bidirectional attention",
    "sliding_window_bidirectional_overlay": "bidirectional sliding-window attention",
}


def _mask_leaves(fn, seen=None):
    """The index functions a transformers mask function is composed of: wrappers (and_masks, or_masks, the
    packed-sequence remap, offsets) are looked through via the callables their closures hold."""
    seen = set() if seen is None else seen
    if id(fn) in seen:
        return []
    seen.add(id(fn))
    inner = []
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if callable(item) and not isinstance(item, torch.Tensor):
                inner.append(item)
    if not inner:
        return [fn]
    return [leaf for item in inner for leaf in _mask_leaves(item, seen)]


def _mask_window(parts) -> int | None:
    """The window of the mask's sliding_window_overlay (its closure's `sliding_window`), or None."""
    windows = set()
    for leaf in parts.get("sliding_window_overlay", ()):
        for name, cell in zip(leaf.__code__.co_freevars, leaf.__closure__ or ()):
            if name == "sliding_window":
                windows.add(int(cell.cell_contents))
    if len(windows) > 1:
        raise ValueError(f"fastattn: this model's mask has several sliding windows {sorted(windows)}; the compact mask "
                         "carries one. Load it with attn_implementation='eager' or 'sdpa'.")
    if parts.get("sliding_window_overlay") and not windows:
        raise ValueError("fastattn: cannot read the window of this transformers version's sliding_window_overlay")
    return windows.pop() if windows else None


# Attributes set on the compact mask tensors `fastattn_mask` returns: the window of the mask they were built from,
# and whether an all-True tensor stands for None (a window needs a tensor). A compiled graph reads them where the
# tensor is one of its inputs; an op on the tensor (even a no-op .to() when traced) returns one without them.
_WINDOW_ATTR, _FULL_ATTR = "_fastattn_window", "_fastattn_full"


def _compact(mask, window, batch: int, filled: int, device):
    """The [B, L] mask as the [B, 1, 1, L] view that transformers hands on untouched: a 4D mask is "prepared", so
    the one generate() builds ahead for a static cache reaches the layers as it is, not re-read (and converted,
    dropping the attributes) as a user's 2D padding mask."""
    full = mask is None
    if full:
        if window is None:
            return None
        mask = torch.ones(batch, filled, dtype=torch.bool, device=device)
    mask = mask.contiguous()[:, None, None, :]  # generate() makes it contiguous: a copy would drop the attributes
    setattr(mask, _WINDOW_ATTR, window)
    setattr(mask, _FULL_ATTR, full)
    return mask


def _call_window(sliding_window, attention_mask, module) -> int | None:
    """The layer's window: the attention call's `sliding_window`, else the one its mask was built with."""
    layer_idx = getattr(module, "layer_idx", None)
    if attention_mask is not None and not hasattr(attention_mask, _WINDOW_ATTR):
        window = _layer_window(module)  # a copy of our mask: a hook moved it to this layer's device (accelerate)
    else:
        window = getattr(attention_mask, _WINDOW_ATTR, None)
    if sliding_window is None:
        return window
    if window is not None and window != sliding_window:
        raise ValueError(f"fastattn (layer {layer_idx}): the attention call passes sliding_window={sliding_window} "
                         f"but its mask was built with a window of {window}; refusing to pick one")
    return sliding_window


def _layer_window(module) -> int | None:
    """The window transformers builds a layer's mask with, from its config: config.layer_types where the model has
    them, else the layer's own `sliding_window`, else the config's (PhiMoE: every layer)."""
    config = getattr(module, "config", None)
    types, idx = getattr(config, "layer_types", None), getattr(module, "layer_idx", None)
    if types is not None and idx is not None and idx < len(types):
        return getattr(config, "sliding_window", None) if types[idx] == "sliding_attention" else None
    if hasattr(module, "sliding_window"):
        return module.sliding_window
    return getattr(config, "sliding_window", None)


def mask_parts(mask_function) -> dict[str, list[Callable]]:
    """The parts of `mask_function` (transformers' composed mask): factory name -> its index functions. Raises if
    one of them is a part the compact mask cannot express."""
    parts: dict[str, list[Callable]] = {}
    if mask_function is None:
        return parts
    for leaf in _mask_leaves(mask_function):
        qualname = getattr(leaf, "__qualname__", type(leaf).__name__)
        name = qualname.split(".<locals>")[0]  # the factory that made a closure
        if name in _MASK_PARTS_KEPT and getattr(leaf, "__module__", "").startswith("transformers."):
            parts.setdefault(name, []).append(leaf)
            continue
        what = _MASK_PARTS_NAMED.get(name, f"a custom mask part ({getattr(leaf, '__module__', '?')}.{qualname}, e.g. "
                                           "bidirectional image-token blocks)")
        raise ValueError(f"fastattn supports causal, sliding-window, chunked, padded and packed attention; this "
                         f"model's mask also has {what}, which the backend would ignore. Load it with "
                         "attn_implementation='eager' or 'sdpa'.")
    return parts


def _block_ids(mask_function, batch: int, filled: int, kv_offset: int, device) -> torch.Tensor:
    """[B, L] int64 ids of the blocks attention stays inside under `mask_function`: a block ends where a position
    may not attend to the one before it. transformers' own function decides, so e.g. the chunks' alignment (they
    start at each row's first real token) is its, not a copy."""
    pos = torch.arange(kv_offset + 1, kv_offset + filled, device=device)[None]  # absolute positions 1.. of the slots
    rows = torch.arange(batch, device=device)[:, None]
    joined = mask_function(rows, torch.zeros(1, dtype=torch.long, device=device), pos, pos - 1)
    joined = torch.as_tensor(joined, device=device).expand(batch, filled - 1)
    return torch.nn.functional.pad((~joined).long().cumsum(-1), (1, 0))


def _mask_blocks(parts, mask_function, config, batch, filled, kv_offset, device) -> torch.Tensor | None:
    """Block ids of a chunked and/or packed mask (transformers packs only without a cache), else None. Packed
    chunks restart with each sequence; transformers 5.17 counted them from the row's start (each sequence
    alone is what packing means, and what its later versions do)."""
    packed = parts.get("packed_sequence_mask_function")
    if packed:
        seg = _block_ids(packed[0], batch, filled, kv_offset, device)
        if "chunked_overlay" not in parts:
            return seg
        return seg * (filled + 1) + _chunk_in_sequence(seg, _chunk_size_of(config))
    if "chunked_overlay" in parts:
        return _block_ids(mask_function, batch, filled, kv_offset, device)
    return None


@torch.compiler.disable  # host-side shape checks; see the module docstring
def fastattn_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    attention_mask: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    **kwargs,
) -> torch.Tensor | None:
    """Compact mask: None (no padding, queries are the last key slots), a [B, 1, 1, L] bool validity mask, or,
    when transformers' mask has chunks or packed sequences and a row's tokens span more than one of them,
    [B, 1, 1, L] int64 block ids (padded slots as ~id). A returned tensor carries the mask's sliding window (an
    all-True one stands for None when there is a window).

    `attention_mask` is the user's 2D mask over absolute positions; key slot j holds position
    `kv_offset + j`. L = q_offset - kv_offset + q_length is the number of filled slots (< kv_length only
    for a static cache, whose tail slots are empty).
    """
    parts = mask_parts(kwargs.get("mask_function"))
    window = _mask_window(parts)
    filled = int(q_offset) - int(kv_offset) + q_length  # a StaticLayer gives q_offset as a 0-dim tensor
    if not 0 < filled <= kv_length:
        raise ValueError(
            f"fastattn mask: inconsistent sizes (q_length={q_length}, kv_length={kv_length}, "
            f"q_offset={int(q_offset)}, kv_offset={kv_offset})"
        )
    valid = None
    if attention_mask is not None:
        valid = attention_mask[:, kv_offset : kv_offset + filled].to(device=device, dtype=torch.bool)
        if valid.shape[1] < filled:  # positions the 2D mask does not cover count as padding (as in sdpa_mask)
            valid = torch.nn.functional.pad(valid, (0, filled - valid.shape[1]), value=False)
    ids = None
    if filled > 1:
        ids = _mask_blocks(parts, kwargs.get("mask_function"), kwargs.get("config"), batch_size, filled,
                           int(kv_offset), device)
    if ids is not None:
        real = torch.ones_like(ids, dtype=torch.bool) if valid is None else valid
        first = ids.masked_fill(~real, filled).amin(-1)
        last = ids.masked_fill(~real, -1).amax(-1)
        if bool((first < last).any()):  # some row's real tokens span two blocks (else: plain causal attention)
            return _compact(torch.where(real, ids, ~ids), window, batch_size, filled, device)
    # A static cache's mask (its layers give q_offset as a tensor) is always a validity tensor: a compiled decode
    # step that got None when the cache fills up would be traced again and break at this function.
    keep = filled < kv_length or isinstance(q_offset, torch.Tensor)
    if valid is None:
        valid = torch.ones(batch_size, filled, dtype=torch.bool, device=device) if keep else None
    elif not keep and bool(valid.all()):
        valid = None
    return _compact(valid, window, batch_size, filled, device)


# ------------------------------------------------------------------------------------ blocks and packing
def _segment_ids(kwargs: dict, batch: int, n: int, device) -> torch.Tensor | None:
    """[B, N] ids of the packed sequences each token belongs to, or None if nothing is packed."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None:
        cu_k = kwargs.get("cu_seq_lens_k")
        if cu_k is not None and not torch.equal(cu.cpu(), cu_k.cpu()):
            raise ValueError("fastattn: cu_seq_lens_q != cu_seq_lens_k is not supported (packed queries must be their own keys)")
        if batch != 1 or int(cu[-1]) != n:
            raise ValueError(f"fastattn: cu_seq_lens_q needs batch size 1 and cu[-1] == sequence length ({n}); got B={batch}, cu={cu.tolist()}")
        lengths = cu.diff().to(device=device, dtype=torch.long)
        return torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)[None]
    pos = kwargs.get("position_ids")
    if pos is None or n == 1:
        return None
    pos = pos.to(device).expand(batch, -1)
    if pos.shape[1] != n:
        return None
    # FlashAttention's convention (transformers' prepare_fa_kwargs_from_position_ids): a sequence starts where the
    # row's first position comes again. A gap is not a new sequence (PoSE-style skipped positions, deleted tokens).
    restarts = pos == pos.amin(-1, keepdim=True)
    restarts[:, 0] = False
    seg = restarts.cumsum(-1)  # 0 for the first sequence of every row
    return seg if bool((seg[:, -1] > 0).any()) else None


def _chunk_size_of(config) -> int:
    size = getattr(config, "attention_chunk_size", None)
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"fastattn: a chunked-attention layer needs config.attention_chunk_size (an integer >= 1); "
                         f"got {size!r}")
    return size


def _chunk_size(module) -> int | None:
    """attention_chunk_size if `module` is a chunked-attention layer (config.layer_types, as in Llama 4)."""
    config = getattr(module, "config", None)
    types = getattr(config, "layer_types", None)
    idx = getattr(module, "layer_idx", None)
    if types is None or idx is None or idx >= len(types) or types[idx] != "chunked_attention":
        return None
    return _chunk_size_of(config)


def _chunk_in_sequence(seg: torch.Tensor, size: int) -> torch.Tensor:
    """[B, N] index of each token's chunk, counted from the start of its packed sequence ([B, N] ids `seg`)."""
    arange = torch.arange(seg.shape[1], device=seg.device).expand_as(seg)
    starts = torch.ones_like(seg, dtype=torch.bool)
    starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
    first = torch.where(starts, arange, 0).cummax(-1).values
    return (arange - first) // size


class _Blocks:
    """Attention restricted to blocks (runs of equal id in [B, L] `ids`: packed sequences, chunks), with the
    queries the last Nq slots of each row, as a padded batch of S rows, one per block that holds queries.

    Rows are right-aligned: block s's keys end at slot Lk - 1 and its queries at Lq - 1, so the bottom-right
    causal alignment of every method holds in each row (a block whose queries started in an earlier call, as in
    chunked prefill, has more keys than queries). The left padding is marked invalid in `kv_valid`."""

    def __init__(self, ids: torch.Tensor, nq: int, valid: torch.Tensor | None):
        b, n = ids.shape
        dev = ids.device
        starts = torch.ones(b, n, dtype=torch.bool, device=dev)
        starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
        run = starts.reshape(-1).cumsum(0) - 1  # [B*L] run of each slot, distinct across rows
        n_keys = torch.bincount(run)
        first = torch.cumsum(n_keys, 0) - n_keys
        q_run = run.view(b, n)[:, n - nq :].reshape(-1)  # runs of the query slots, in order
        sel, n_q = torch.unique_consecutive(q_run, return_counts=True)
        n_k = n_keys[sel]
        self.lk, self.lq = int(n_k.max()), int(n_q.max())
        j = torch.arange(self.lk, device=dev)[None] - (self.lk - n_k[:, None])  # slot within its block
        key_ok = j >= 0
        self.k_index = torch.where(key_ok, first[sel, None] + j, 0)  # into the flattened [B*L] slots
        self.kv_valid = key_ok if valid is None else key_ok & valid.reshape(-1)[self.k_index]
        i = torch.arange(self.lq, device=dev)[None] - (self.lq - n_q[:, None])
        self.q_ok = i >= 0
        self.q_index = torch.where(self.q_ok, (torch.cumsum(n_q, 0) - n_q)[:, None] + i, 0)  # into [B*Nq]
        self.shape = (b, nq)

    @staticmethod
    def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        b, h, n, d = x.shape
        return x.transpose(1, 2).reshape(b * n, h, d)[index].transpose(1, 2)

    def keys(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H, L, D] -> [S, H, Lk, D]"""
        return self._gather(x, self.k_index)

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H, Nq, D] -> [S, H, Lq, D]"""
        return self._gather(x, self.q_index)

    def repack(self, y: torch.Tensor) -> torch.Tensor:
        """[S, H, Lq, D] -> [B, H, Nq, D]: blocks are contiguous and in order, so the real rows are in token order."""
        _, h, _, d = y.shape
        return y.transpose(1, 2)[self.q_ok].view(*self.shape, h, d).transpose(1, 2)


# ------------------------------------------------------------------------------------------- backend
# Keywords that some model families pass to change the attention function itself: ignoring one would give wrong
# numbers without a word, so each is refused unless it is None.
_UNSUPPORTED = {
    "position_bias": "an additive position bias (T5-style relative attention)",
    "sinks": "per-token attention sinks (only GPT-OSS-style per-head sinks, s_aux, are implemented)",
    "indices": "sparse attention over selected keys",
    "block_indices": "block-sparse attention over selected key blocks",
    "topk_indices": "sparse attention over selected keys",
}


def _refuse_unsupported(kwargs: dict) -> None:
    for name, what in _UNSUPPORTED.items():
        if kwargs.get(name) is not None:
            raise ValueError(f"fastattn does not implement {what}, which this model passes as `{name}`; "
                             "load it with attn_implementation='eager' or 'sdpa'")


# --------------------------------------------------------------------------------------- torch.compile
# In inference the whole attention call is one custom op, opaque to the compiler: a compiled model (generate()'s
# auto-compiled decode with a static cache, torch.compile(model) under no_grad) is one graph, not one per layer.
# At every graph break dynamo resumes in a new frame, and transformers' shared decorator wrappers, resumed for
# each model class, used up its recompile limit: decoding then fell back to eager. The op's body is the eager
# call, host-side decisions included, so it is marked unsafe for CUDA graphs (inductor runs it between the
# captured parts). In training the op's backward is an op too (`hf_fastattn::attention_backward`), which runs the
# autograd graph the forward op kept (`_GRAPHS`): measured on a 12-layer Llama (H = 4, D = 64, N = 1024, poly, 2 CPU
# threads), a compiled step went from 15 graphs / 21 breaks to 3 graphs with only the mask's break, at eager's
# speed (1965 vs 1943 ms; recomputing the call in the backward instead cost 2761).
_CUDAGRAPH_UNSAFE = getattr(torch.Tag, "cudagraph_unsafe", None)
_AUTOGRAD_ON = getattr(torch._C, "_SetExcludeDispatchKeyGuard", None)  # private: without it, training stays eager
_LAYERS: dict[int, weakref.ref] = {}  # _layer_key -> layer; a custom op takes tensors and numbers, not modules


@torch.compiler.assume_constant_result  # runs once when traced; the key is a constant of the graph
def _layer_key(module) -> int:
    key = id(module)
    if key not in _LAYERS or _LAYERS[key]() is not module:
        _LAYERS[key] = weakref.ref(module, lambda _, key=key: _LAYERS.pop(key, None))
    return key


def _op_takes(query, key, value, attention_mask, dropout, kwargs) -> bool:
    """Whether this call can be the custom op: no dropout or autocast, and no keyword the op does not pass on (of those
    the eager path reads, it passes position_ids and s_aux; packed cu_seq_lens and what it refuses stay eager)."""
    if _CUDAGRAPH_UNSAFE is None or (dropout and dropout > 0):
        return False
    if _AUTOGRAD_ON is None and _differentiated(query, key, value, kwargs.get("s_aux")):
        return False  # the forward op could not record the graph its backward op runs
    if torch.is_autocast_enabled(query.device.type) or not isinstance(attention_mask, (torch.Tensor, type(None))):
        return False
    if kwargs.get("output_attentions") or kwargs.get("is_causal") is False:
        return False
    return all(kwargs.get(name) is None for name in (*_UNSUPPORTED, "cu_seq_lens_q", "cu_seq_lens_k"))


def _differentiated(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


_NO_WINDOW, _UNTAGGED = 0, -1  # mask_window arguments of the op besides a window (>= 1)


def _mask_window_arg(mask) -> int:
    if not hasattr(mask, _WINDOW_ATTR):
        return _UNTAGGED
    window = getattr(mask, _WINDOW_ATTR)
    return _NO_WINDOW if window is None else window


def _op_call(query, key, value, mask, layer, mask_window, mask_full, scaling, sliding_window, softcap, position_ids,
             s_aux):
    """The eager call behind the ops, the mask's tags restored from their arguments (a graph does not keep a
    tensor's Python attributes; `_mask_window_arg`) and the layer from its _layer_key."""
    module = _LAYERS[layer]()
    if mask is not None and mask_window != _UNTAGGED:
        setattr(mask, _WINDOW_ATTR, None if mask_window == _NO_WINDOW else mask_window)
        setattr(mask, _FULL_ATTR, mask_full)
    out, _ = _attention(module, query, key, value, mask, 0.0, scaling, sliding_window, softcap,
                        position_ids=position_ids, s_aux=s_aux)
    return out


_OP_TAGS = () if _CUDAGRAPH_UNSAFE is None else (_CUDAGRAPH_UNSAFE,)


# A differentiated call's autograd graph (its output and leaves), kept from the forward op to the backward op by a
# ticket the forward returns: the backward runs it instead of recomputing the call. An entry whose backward never
# runs goes when its ticket tensor does (the autograd graph that saved it was freed).
_GRAPHS: dict[int, tuple] = {}
_TICKETS = itertools.count(1)


def _leaves(*tensors):
    return [None if t is None else t.detach().requires_grad_(t.is_floating_point()) for t in tensors]


@torch.library.custom_op("hf_fastattn::attention", mutates_args=(), tags=_OP_TAGS)
def _attention_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                  layer: int, mask_window: int, mask_full: bool, scaling: float | None,
                  sliding_window: int | None, softcap: float | None, position_ids: torch.Tensor | None,
                  s_aux: torch.Tensor | None, training: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """fastattn_attention_forward as one op: (output, ticket). An op's body runs without autograd; with `training`
    (the call will be differentiated) it runs the eager call on leaves of its own, with autograd, through our
    autograd Functions, and keeps that graph under the ticket (a 0-dim int64 CPU tensor, 0 without) for the
    backward op: what eager training keeps, no recomputation."""
    args = (layer, mask_window, mask_full, scaling, sliding_window, softcap)
    if not training:
        out = _op_call(query, key, value, mask, *args, position_ids, s_aux)
        return out.contiguous(), torch.zeros((), dtype=torch.long)  # contiguous: the fake kernel's layout
    q, k, v, sinks = _leaves(query, key, value, s_aux)
    with _AUTOGRAD_ON(torch._C.DispatchKey.AutogradFunctionality, False), torch.enable_grad():
        out = _op_call(q, k, v, mask, *args, position_ids, sinks)
    ticket = next(_TICKETS)
    _GRAPHS[ticket] = (out, [t for t in (q, k, v, sinks) if t is not None])
    handle = torch.tensor(ticket)
    weakref.finalize(handle, _GRAPHS.pop, ticket, None)
    return out.detach().contiguous(), handle


@_attention_op.register_fake
def _(query, key, value, mask, layer, mask_window, mask_full, scaling, sliding_window, softcap, position_ids, s_aux,
      training):
    b, h, nq, _ = query.shape
    return query.new_empty(b, nq, h, value.shape[-1]), torch.empty((), dtype=torch.long)


@torch.library.custom_op("hf_fastattn::attention_backward", mutates_args=(), tags=_OP_TAGS)
def _attention_backward_op(grad: torch.Tensor, ticket: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                           value: torch.Tensor, s_aux: torch.Tensor | None) -> list[torch.Tensor]:
    """The VJP of `_attention_op` through the graph its forward kept: [dq, dk, dv, ds_aux], ds_aux empty without
    sinks, contiguous as the fake kernel says (inductor checks the strides; q, k, v are transposed views)."""
    entry = _GRAPHS.pop(int(ticket), None)
    if entry is None:
        raise RuntimeError("fastattn under torch.compile: this attention call's backward ran twice (retain_graph=True "
                           "keeps no second copy of its graph) or its forward kept none; differentiate it once")
    out, wrt = entry
    with _AUTOGRAD_ON(torch._C.DispatchKey.AutogradFunctionality, False):
        grads = torch.autograd.grad(out, wrt, grad, allow_unused=True)
    grads = [torch.zeros(t.shape, dtype=t.dtype, device=t.device) if g is None else g.contiguous()
             for g, t in zip(grads, wrt)]
    return grads + ([] if s_aux is not None else [query.new_empty(0)])


@_attention_backward_op.register_fake
def _(grad, ticket, query, key, value, s_aux):
    return [t.new_empty(t.shape) for t in (query, key, value)] + [query.new_empty(0 if s_aux is None else s_aux.shape)]


def _op_setup(ctx, inputs, output):
    query, key, value, *_, s_aux, _ = inputs
    ctx.save_for_backward(output[1], query, key, value, s_aux)  # the ticket, and the shapes of the gradients


def _op_backward(ctx, grad, _):
    ticket, query, key, value, s_aux = ctx.saved_tensors
    dq, dk, dv, ds = torch.ops.hf_fastattn.attention_backward(grad, ticket, query, key, value, s_aux)
    return dq, dk, dv, *(None,) * 8, None if s_aux is None else ds, None


_attention_op.register_autograd(_op_backward, setup_context=_op_setup)


def fastattn_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention interface. query [B, H, Nq, D], key/value [B, Hkv, Nk, D] -> ([B, Nq, H, D], None)."""
    if torch.compiler.is_compiling() and _op_takes(query, key, value, attention_mask, dropout, kwargs):
        out, _ = torch.ops.hf_fastattn.attention(
            query, key, value, attention_mask, _layer_key(module), _mask_window_arg(attention_mask),
            bool(getattr(attention_mask, _FULL_ATTR, False)), scaling, sliding_window, softcap,
            kwargs.get("position_ids"), kwargs.get("s_aux"), _differentiated(query, key, value, kwargs.get("s_aux")))
        return out, None
    return _attention(module, query, key, value, attention_mask, dropout, scaling, sliding_window, softcap, **kwargs)


@torch.compiler.disable  # one graph break per layer under torch.compile; see the module docstring
def _attention(module, query, key, value, attention_mask, dropout, scaling, sliding_window, softcap, **kwargs):
    """fastattn_attention_forward, run eagerly (its arguments, all given)."""
    device = query.device.type
    if torch.is_autocast_enabled(device):  # the inputs in autocast's dtype, as SDPA gets them; inside, our precisions
        dt = torch.get_autocast_dtype(device)
        with torch.autocast(device, enabled=False):
            return _attention(module, query.to(dt), key.to(dt), value.to(dt), attention_mask, dropout, scaling,
                              sliding_window, softcap, **kwargs)
    if dropout and dropout > 0:
        raise ValueError(
            f"fastattn does not implement attention dropout (got dropout={dropout}); "
            "set config.attention_dropout = 0.0 or use attn_implementation='eager'"
        )
    if kwargs.get("output_attentions"):
        raise ValueError(
            "fastattn never forms the attention matrix, so output_attentions=True is not supported; "
            "use attn_implementation='eager' to inspect attention weights"
        )
    _refuse_unsupported(kwargs)
    if scaling is None:
        scaling = module.head_dim**-0.5
    if not getattr(module, "is_causal", True) or kwargs.get("is_causal") is False:
        raise ValueError(
            "fastattn supports causal (decoder) attention only; this layer has is_causal=False "
            "(e.g. use_bidirectional_attention=True). Use attn_implementation='sdpa' for it."
        )
    valid, blocks = None, None
    if attention_mask is not None:
        shape = tuple(attention_mask.shape) if hasattr(attention_mask, "shape") else type(attention_mask).__name__
        if (not isinstance(attention_mask, torch.Tensor) or attention_mask.dtype not in (torch.bool, torch.long)
                or not (attention_mask.dim() == 2 or (attention_mask.dim() == 4 and shape[1:3] == (1, 1)))):
            raise ValueError(
                f"fastattn expects the compact mask of its own mask function (None, [B, 1, 1, N_kv] or [B, N_kv] bool "
                f"or int64 block ids), got {shape} {getattr(attention_mask, 'dtype', '')}. Custom [B, 1, N_q, N_kv] "
                "masks are not supported; pass a 2D padding mask instead."
            )
        filled = attention_mask.shape[-1]
        if filled > key.shape[2]:
            raise ValueError(f"fastattn: mask covers {filled} key slots but only {key.shape[2]} keys were given")
        key, value = key[:, :, :filled], value[:, :, :filled]  # empty static-cache slots
        if getattr(attention_mask, _FULL_ATTR, False):
            pass  # no padding: the tensor only carries the window
        elif attention_mask.dtype == torch.bool:
            valid = attention_mask.reshape(-1, filled).to(query.device)  # a model split over devices builds it on the first
        else:  # block ids (chunks, packed sequences), ~id on padded slots
            ids = attention_mask.reshape(-1, filled).to(query.device)
            valid = ids >= 0
            blocks = torch.where(valid, ids, ~ids)
            valid = None if bool(valid.all()) else valid

    layer_idx = getattr(module, "layer_idx", None)
    cfg = get_config(module.config).for_layer(layer_idx)
    if cfg.method not in _METHODS:  # e.g. a method whose module failed to import
        raise ValueError(f"fastattn_config['method']={cfg.method!r} is not available; registered: {sorted(_METHODS)}")
    run = _METHODS[cfg.method]
    sinks = check_sinks(kwargs.get("s_aux"), query.shape[1])  # GPT-OSS: one logit per query head (ops/sinks.py)
    sliding_window = _call_window(sliding_window, attention_mask, module)
    opts = dict(scale=scaling, causal=True, window=sliding_window, softcap=softcap, sinks=sinks, cfg=cfg,
                layer_idx=layer_idx, module=module)

    heads = cfg.head_plan(layer_idx)
    if heads is not None:
        if len(heads) != query.shape[1]:
            raise ValueError(f"fastattn plan for layer {layer_idx} lists {len(heads)} heads; the layer has {query.shape[1]}")
        run = partial(_run_plan, heads=heads)

    b, _, nq, _ = query.shape
    chunk = _chunk_size(module)
    seg = _segment_ids(kwargs, b, nq, query.device) if valid is None and nq == key.shape[2] else None
    if seg is not None:  # packed: each sequence as if it ran alone (with a cache, the mask's chunks ran across them)
        if chunk is not None:
            blocks = seg * (nq + 1) + _chunk_in_sequence(seg, chunk)
        else:  # both partitions hold (the mask's blocks are ids < nq here)
            blocks = seg if blocks is None else seg * (nq + 1) + blocks
    unpack = None
    q, k, v, kv_valid = query, key, value, valid
    if blocks is not None:
        if bool((blocks[:, -nq:] == blocks[:, -1:]).all()):  # all queries in their row's last block (decode)
            same = blocks == blocks[:, -1:]
            kv_valid = same if valid is None else same & valid
        else:
            unpack = _Blocks(blocks, nq, valid)
            q, k, v, kv_valid = unpack.queries(query), unpack.keys(key), unpack.keys(value), unpack.kv_valid
    if chunk is not None:
        # Within its chunk a query sees every earlier key (< attention_chunk_size of them): a local layer, run as
        # sliding layers are (exactly; a band no wider than its local_window), with a window spanning the keys.
        opts["window"] = k.shape[2]
    for hook in _HOOKS:
        hook(module, layer_idx, q, k, v, kv_valid, opts)
    out = run(q, k, v, kv_valid=kv_valid, **opts)
    if unpack is not None:
        out = unpack.repack(out)
    return out.transpose(1, 2).contiguous(), None


class _GroupState:
    """Where a plan group's method keeps per-layer state (e.g. the conv basis for decoding)."""


def _run_plan(q, k, v, *, heads, cfg, module, sinks=None, **opts):
    """A mixed plan: heads grouped by setting, one op call per group, outputs put back in head order.

    A group made of whole GQA groups keeps sharing its KV heads; otherwise each query head gets its own
    KV head (a gather of the KV heads that group needs)."""
    h, hkv = q.shape[1], k.shape[1]
    g = h // hkv
    names = sorted(set(heads), key=heads.index)
    states = module.__dict__.setdefault(_PLAN_STATE, {}) if module is not None else {}
    outs, order = [], []
    for name in names:
        idx = [i for i, s in enumerate(heads) if s == name]
        kv = [i // g for i in idx]
        if all(kv.count(j) == g for j in set(kv)):  # whole GQA groups, in order
            kv_idx = torch.tensor(sorted(set(kv)), device=q.device)
        else:
            kv_idx = torch.tensor(kv, device=q.device)
        qi = torch.tensor(idx, device=q.device)
        sub = cfg.setting(name)
        group = states.setdefault(name, _GroupState())
        group.heads = idx  # the layer's head numbers, for messages about the group's heads
        out = _METHODS[sub.method](q.index_select(1, qi), k.index_select(1, kv_idx), v.index_select(1, kv_idx),
                                   cfg=sub, module=group,
                                   sinks=None if sinks is None else sinks.index_select(0, qi), **opts)
        outs.append(out)
        order += idx
    inverse = torch.empty(h, dtype=torch.long, device=q.device)
    inverse[torch.tensor(order, device=q.device)] = torch.arange(h, device=q.device)
    return torch.cat(outs, dim=1).index_select(1, inverse)
