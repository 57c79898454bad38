"""Attention sinks: one learned logit per query head that joins every row's softmax with a zero value.

GPT-OSS (and models built like it) pass `s_aux` [H] to the attention function: row i's weights become
exp(s_ij) / (sum_j exp(s_ij) + exp(sink_h)), so a head can put weight "nowhere". The exact and poly ops keep a
row shift m and a denominator den (o = num / den, weights exp(logw - m)); a sink is one more term of den.
Folding it in after the op's forward and saving the folded (out, m, den) keeps the op's own backward exact:
that backward reads dL/dnum = do / den and dL/dden = -(do . o) / den from exactly those tensors. The sink's own
gradient is dL/dsink = -sum_i p_sink,i (do_i . o_i), with p_sink,i = exp(sink - m_i) / den_i. (The conv op's
denominator is an autograd tensor: it adds the term directly, `conv/fft.py`.)
"""

from __future__ import annotations

import torch


def check_sinks(sinks: torch.Tensor | None, heads: int) -> torch.Tensor | None:
    """The sink logits as a float tensor of [H] (per query head), or None; anything else is refused."""
    if sinks is None:
        return None
    if not isinstance(sinks, torch.Tensor) or sinks.dim() != 1 or sinks.numel() != heads:
        shape = tuple(sinks.shape) if isinstance(sinks, torch.Tensor) else type(sinks).__name__
        raise ValueError(f"attention sinks (s_aux) must be one logit per query head, shape [{heads}]; got {shape}")
    return sinks


def fold_sink(out: torch.Tensor, m: torch.Tensor, den: torch.Tensor, sinks: torch.Tensor):
    """Adds exp(sink_h) to each row's normaliser.

    out: [B, H, N, Dv] normalised output; m, den: [B, H, N] float32 row shift and denominator (den = 0: the row
    sees no key); sinks: [H]. Returns (out', m', den') with m' = max(m, sink), so neither exponential overflows
    (logits in the hundreds) and a row with no key gets out' = 0, den' = 1 (den' = 0 if its sink is -inf).
    """
    s = sinks.to(m.dtype).view(1, -1, 1)
    m = torch.where(den > 0, m, float("-inf"))  # a row with no key: the sink sets its shift, whatever it is
    m2 = torch.maximum(m, s)
    m2 = torch.where(torch.isfinite(m2), m2, 0.0)  # no key and a sink of -inf: nothing to normalise, den' = 0
    keep = den * torch.exp(m - m2)
    den2 = keep + torch.exp(s - m2)
    ratio = torch.where(den2 > 0, keep / den2.clamp_min(torch.finfo(den2.dtype).tiny), 0.0)
    # one rounding for 16-bit outputs: the product in float32, then the cast
    return (out.to(den2.dtype) * ratio.unsqueeze(-1)).to(out.dtype), m2, den2


def sink_grad(do: torch.Tensor, out: torch.Tensor, m: torch.Tensor, den: torch.Tensor, sinks: torch.Tensor):
    """dL/dsink [H] from the folded (out, m, den) of `fold_sink` and do [B, H, N, Dv]."""
    p = torch.where(den > 0, torch.exp(sinks.to(m.dtype).view(1, -1, 1) - m) / den.clamp_min(1e-38), 0.0)
    delta = (do.to(m.dtype) * out.to(m.dtype)).sum(-1)
    return -(p * delta).sum((0, 2)).to(sinks.dtype)


def softmax_with_sink(logits: torch.Tensor, sinks: torch.Tensor | None) -> torch.Tensor:
    """Dense reference: softmax of [B, H, Nq, Nk] logits (-inf masked) with an optional sink column, dropped
    after; rows that see nothing give 0 (with a sink: all weight on the sink)."""
    if sinks is None:
        return torch.softmax(logits, dim=-1).nan_to_num(0.0)
    col = sinks.to(logits.dtype).view(1, -1, 1, 1).expand(*logits.shape[:-1], 1)
    return torch.softmax(torch.cat([logits, col], dim=-1), dim=-1)[..., :-1]
