"""Diagnostics: where does each approximation hold, layer by layer and head by head — and a planner.

`diagnose(model, data)` runs the model once per batch with exact attention while a backend hook captures
every layer's (rotated) q, k, v. For each head it reports the logit range max |s q.k|, the scaled entry
norms |Q|_inf, |K|_inf against the papers' o(sqrt(log n)) condition, the entropy of the exact attention,
the guard's predicted poly error, and the *measured* relative output error ||O_m - O|| / ||O|| of every
candidate setting (poly degree/band, conv k) against exact attention on the same inputs. A depth sweep
then measures the end-to-end effect — loss and gradient error of the whole model, pooled over the batches,
when the first L layers use a setting — the multi-layer-gradient paper's "error stays bounded across
layers", measured. Every statistic is taken over real tokens (padded slots left out).

`plan(report, budget)` picks per (layer, head) the cheapest setting whose measured error is within the
budget; `configure(model, plan=...)` stores it in `fastattn_config` and the backend runs it (heads grouped
by setting, one op call per group).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import backend
from .config import FastAttnConfig
from .ops.conv import conv_attention
from .ops.exact import naive_attention
from .ops.masks import dense_mask
from .ops.poly import guard_stats, poly_coefficients
from .ops.poly.features import FeatureMap
from .ops.poly.naive import naive_poly_attention

# candidate settings: name -> options (per-layer options of FastAttnConfig)
DEFAULT_SETTINGS: dict[str, dict] = {
    "poly-d2-w0": {"method": "poly", "degree": 2, "local_window": 0},
    "poly-d2-w64": {"method": "poly", "degree": 2, "local_window": 64},
    "poly-d2-w256": {"method": "poly", "degree": 2, "local_window": 256},
    "poly-d4-w0": {"method": "poly", "degree": 4, "local_window": 0},
    "poly-d4-w64": {"method": "poly", "degree": 4, "local_window": 64},
    "poly-d4-w256": {"method": "poly", "degree": 4, "local_window": 256},
    "conv-k4": {"method": "conv", "conv_k": 4},
    "conv-k16": {"method": "conv", "conv_k": 16},
    "conv-k64": {"method": "conv", "conv_k": 64},
}
EXACT = "exact"


@dataclass
class HeadStats:
    layer: int
    head: int
    sliding: bool
    logit_max: float  # max |s q.k| over visible pairs (real query rows, real keys)
    q_inf: float  # sqrt(s) max |q| over real rows (so that s q.k = (sqrt(s) q).(sqrt(s) k))
    k_inf: float  # sqrt(s) max |k| over real keys
    entropy: float  # mean over real rows of the exact attention entropy (nats)
    # the guard's sigma (on real tokens): a sequence's rms logit s sqrt(tr(M_q M_k)), max over the sequences
    rms_logit: float
    predicted: dict = field(default_factory=dict)  # setting -> guard-predicted error (poly) at rms_logit
    errors: dict = field(default_factory=dict)  # setting -> measured relative output error
    feasible: dict = field(default_factory=dict)  # setting -> runnable in linear time (feature cap)


@dataclass
class Report:
    heads: list[HeadStats]
    depth: dict  # setting -> [{"layers": L, "loss": .., "loss_delta": .., "grad_rel_err": ..}]
    meta: dict

    # ------------------------------------------------------------------ access
    def head(self, layer: int, head: int) -> HeadStats:
        return next(h for h in self.heads if h.layer == layer and h.head == head)

    @property
    def settings(self) -> list[str]:
        return list(self.meta["settings"])

    @property
    def num_layers(self) -> int:
        return 1 + max(h.layer for h in self.heads)

    @property
    def num_heads(self) -> int:
        return 1 + max(h.head for h in self.heads)

    def error_grid(self, setting: str) -> list[list[float]]:
        grid = [[math.nan] * self.num_heads for _ in range(self.num_layers)]
        for h in self.heads:
            grid[h.layer][h.head] = h.errors.get(setting, math.nan)
        return grid

    # ------------------------------------------------------------------ output
    def to_dict(self) -> dict:
        return {"meta": self.meta, "heads": [asdict(h) for h in self.heads], "depth": self.depth}

    def save_json(self, path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load_json(cls, path) -> Report:
        raw = json.loads(Path(path).read_text())
        return cls([HeadStats(**h) for h in raw["heads"]], raw["depth"], raw["meta"])

    def table(self, settings: list[str] | None = None) -> str:
        settings = settings or self.settings
        n = self.meta["tokens_per_row"]
        cols = ["layer", "head", "max|sqk|", "|Q|inf", "|K|inf", "entropy", "rms"] + settings
        widths = [5, 4, 9, 7, 7, 8, 6] + [max(9, len(s) + 1) for s in settings]
        lines = [f"per-head diagnostics (n = {n}, sqrt(log n) = {math.sqrt(math.log(n)):.2f}; errors are relative "
                 "output errors vs exact; '*' = sliding layer, exact by design; '!' = over the feature cap)"]
        lines.append("".join(c.rjust(w) for c, w in zip(cols, widths)))
        for h in self.heads:
            row = [str(h.layer) + ("*" if h.sliding else ""), str(h.head), f"{h.logit_max:.3g}", f"{h.q_inf:.3g}",
                   f"{h.k_inf:.3g}", f"{h.entropy:.2f}", f"{h.rms_logit:.3g}"]
            for s in settings:
                e = h.errors.get(s, math.nan)
                row.append(("!" if not h.feasible.get(s, True) else "") + (f"{e:.1%}" if e == e else "-"))
            lines.append("".join(c.rjust(w) for c, w in zip(row, widths)))
        if self.depth:
            lines.append("\nend to end (first L layers approximated, the rest exact): loss delta / gradient rel. error")
            for s, rows in self.depth.items():
                lines.append(f"  {s:<14}" + "  ".join(
                    f"L={r['layers']}: {r['loss_delta']:+.4f} / {r['grad_rel_err']:.1%}" for r in rows))
        return "\n".join(lines)

    def heatmap(self, path, settings: list[str] | None = None) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        settings = settings or self.settings
        cols = min(3, len(settings))
        rows = math.ceil(len(settings) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 0.45 * self.num_layers * rows + 1.5 * rows),
                                 squeeze=False)
        for ax, s in zip(axes.flat, settings):
            grid = torch.tensor(self.error_grid(s)).clamp(1e-6, 10)
            im = ax.imshow(grid.log10(), vmin=-4, vmax=0.5, cmap="magma_r", aspect="auto")
            ax.set(title=s, xlabel="head", ylabel="layer")
            ax.set_xticks(range(self.num_heads))
            ax.set_yticks(range(self.num_layers))
            for (i, j), e in zip(((i, j) for i in range(self.num_layers) for j in range(self.num_heads)),
                                 grid.flatten().tolist()):
                if self.num_heads * self.num_layers <= 128:
                    ax.text(j, i, f"{e:.0%}" if e >= 0.01 else f"{e:.0e}", ha="center", va="center", fontsize=6,
                            color="white" if e > 0.1 else "black")
        for ax in list(axes.flat)[len(settings):]:
            ax.axis("off")
        fig.colorbar(im, ax=axes, shrink=0.8, label="log10 relative output error")
        fig.suptitle(f"relative attention output error vs exact (n = {self.meta['tokens_per_row']})", fontsize=10)
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)


# ---------------------------------------------------------------------------------------- capturing
class _Capture:
    """Backend hook: keeps every layer's attention inputs (unpacked, padded slots marked)."""

    def __init__(self):
        self.layers: dict[int, tuple] = {}

    def __call__(self, module, layer_idx, q, k, v, kv_valid, opts):
        self.layers[layer_idx] = (q.detach(), k.detach(), v.detach(), kv_valid,
                                  dict(scale=opts["scale"], window=opts["window"], softcap=opts["softcap"],
                                       sinks=None if opts.get("sinks") is None else opts["sinks"].detach()))


def _batches(data, max_batches):
    """Yield dicts of model inputs from a tensor of ids, a dict, or an iterable of either."""
    if isinstance(data, torch.Tensor):
        data = [{"input_ids": data}]
    elif isinstance(data, dict):
        data = [data]
    for i, batch in enumerate(data):
        if max_batches is not None and i >= max_batches:
            return
        yield batch if isinstance(batch, dict) else {"input_ids": batch}


def _model_device(model):
    return next(model.parameters()).device


def _with_options(model, options: dict | None):
    """Set `fastattn_config` for a run (returns the previous raw value to restore)."""
    from . import configure

    before = getattr(model.config, "fastattn_config", None)
    configure(model, replace=True, **(options or {}))
    return before


def _restore(model, before, impl):
    from . import _configs

    for c in _configs(model):
        c.fastattn_config = before
    if impl != "fastattn":
        model.set_attn_implementation(impl)


# ----------------------------------------------------------------------------------- per-layer stats
def _setting_output(q, k, v, kv_valid, opts, options: dict):
    cfg = FastAttnConfig(**options)
    sinks = _sinks(opts)
    if cfg.method == "poly":
        coeffs = poly_coefficients(cfg.degree, cfg.poly_coeffs, cfg.fit_range)
        return naive_poly_attention(q, k, v, opts["scale"], coeffs, cfg.local_window, opts["softcap"], kv_valid,
                                    sinks)
    if cfg.method == "conv":
        return conv_attention(q, k, v, opts["scale"], k_bases=cfg.conv_k, placement=cfg.conv_placement, T=cfg.conv_T,
                              delta=cfg.conv_delta, eps=cfg.conv_eps, softcap=opts["softcap"], kv_valid=kv_valid,
                              sinks=sinks)
    return naive_attention(q, k, v, opts["scale"], True, None, opts["softcap"], kv_valid, sinks)


def _sinks(opts):
    """The layer's attention-sink logits (GPT-OSS), float32, or None."""
    return None if opts.get("sinks") is None else opts["sinks"].float()


def _rows_mask(kv_valid, b, n, device):
    """[B, 1, N, 1] rows that are real tokens (padding rows are undefined in every backend)."""
    if kv_valid is None:
        return torch.ones(b, 1, n, 1, dtype=torch.bool, device=device)
    return kv_valid[:, None, :, None].bool()


@torch.no_grad()
def layer_stats(q, k, v, kv_valid, opts, settings: dict, layer: int) -> tuple[list[HeadStats], dict]:
    """Per-head statistics of one layer's captured inputs, plus the sums for pooling over batches: squared
    errors and reference norms, the entropy summed over real rows and the number of real rows.

    Every statistic is taken over real tokens only: the ranges over real query rows and visible real keys, the
    entry norms over real rows / keys, the rms logit, entropy and errors over real rows (what a padded slot holds
    changes nothing)."""
    b, h, n, d = q.shape
    q, k, v = q.float(), k.float(), v.float()
    groups = h // k.shape[1]
    s = opts["scale"]
    sliding = opts["window"] is not None
    ref = naive_attention(q, k, v, s, True, opts["window"], opts["softcap"], kv_valid, _sinks(opts))
    rows = _rows_mask(kv_valid, b, n, q.device)  # [B, 1, N, 1]: real query rows
    kr = k.repeat_interleave(groups, 1)
    logits = s * q @ kr.transpose(-1, -2)
    vis = dense_mask(n, n, True, opts["window"], kv_valid, q.device)  # hides padded keys
    logit_max = logits.abs().masked_fill(~(vis & rows), 0).amax((0, 2, 3))  # real rows, visible real keys
    p = torch.softmax(logits.masked_fill(~vis, float("-inf")), -1).nan_to_num(0.0)
    ent = -(p * torch.log(p.clamp_min(1e-30))).sum(-1)  # [B, H, N]
    ent_sum = ent.masked_fill(~rows[..., 0], 0.0).sum((0, 2))  # [H], over real rows
    real_rows = int(rows.sum())
    ent = ent_sum / max(real_rows, 1)
    q_inf = math.sqrt(s) * q.abs().masked_fill(~rows, 0).amax((0, 2, 3))
    k_inf = math.sqrt(s) * kr.abs().masked_fill(~rows, 0).amax((0, 2, 3))  # self-attention: real rows = real keys
    sigma = guard_stats(q, k, s, poly_coefficients(2), kv_valid).sigma  # over real tokens
    sums = {}
    ref_sq = (ref.masked_fill(~rows, 0.0) ** 2).sum((0, 2, 3))
    for name, options in settings.items():
        if sliding:  # every method runs sliding layers exactly
            err_sq = torch.zeros(h)
        else:
            out = _setting_output(q, k, v, kv_valid, opts, options).float()
            err_sq = ((out - ref).masked_fill(~rows, 0.0) ** 2).sum((0, 2, 3))
        sums[name] = err_sq
    stats = []
    for head in range(h):
        st = HeadStats(layer=layer, head=head, sliding=sliding, logit_max=float(logit_max[head]),
                       q_inf=float(q_inf[head]), k_inf=float(k_inf[head]), entropy=float(ent[head]),
                       rms_logit=sigma[head])
        for name, options in settings.items():
            cfg = FastAttnConfig(**options)
            if cfg.method == "poly":
                coeffs = poly_coefficients(cfg.degree, cfg.poly_coeffs, cfg.fit_range)
                from .ops.poly.guard import predicted_error

                st.predicted[name] = predicted_error(coeffs, sigma[head])
                st.feasible[name] = FeatureMap.get(d, cfg.degree).r <= cfg.feature_cap
            else:
                st.feasible[name] = True
        stats.append(st)
    return stats, {"ref_sq": ref_sq, "err_sq": sums, "ent_sum": ent_sum, "rows": real_rows}


# ------------------------------------------------------------------------------------------- diagnose
def _lm_forward(model, batch):
    """The model's output on `batch` with its next-token loss (padding not scored): logits and loss in one pass."""
    ids = batch["input_ids"]
    labels = ids.clone()
    if batch.get("attention_mask") is not None:
        labels = labels.masked_fill(batch["attention_mask"] == 0, -100)
    return model(**batch, labels=labels, use_cache=False)


def _scored_tokens(batch) -> int:
    """The number of tokens `_lm_forward`'s loss averages over (labels shifted by one, padding left out)."""
    mask = batch.get("attention_mask")
    if mask is None:
        ids = batch["input_ids"]
        return ids.shape[0] * (ids.shape[1] - 1)
    return int((mask[:, 1:] != 0).sum())


def _grads(model):
    grads = [p.grad.flatten() for p in model.parameters() if p.grad is not None]
    return torch.cat(grads) if grads else torch.zeros(0)


def depth_sweep(model, batches, settings: dict, progress=None) -> dict:
    """Loss and gradient error of the whole model when layers 0..L-1 use a setting (L = 1..num_layers).

    `batches` (a dict of model inputs or a list of them, on the model's device) are pooled as one: the loss is
    the mean over all their scored tokens and the gradient that of this loss (each batch's weighted by its
    share of the tokens), as if they were concatenated. Costs (1 + len(settings) * num_layers) forward and
    backward passes per batch."""
    if isinstance(batches, dict):
        batches = [batches]
    num_layers = model.config.get_text_config().num_hidden_layers
    weights = [_scored_tokens(b) for b in batches]
    total = max(sum(weights), 1)

    def run(options):
        model.zero_grad(set_to_none=True)
        _with_options(model, options)
        loss = 0.0
        for batch, w in zip(batches, weights):
            if w == 0:
                continue
            part = _lm_forward(model, batch).loss * (w / total)
            part.backward()  # gradients accumulate: that of the pooled loss
            loss += part.item()
        return loss, _grads(model)

    loss_ref, g_ref = run({"method": "exact"})
    out = {}
    for name, options in settings.items():
        rows = []
        for depth in range(1, num_layers + 1):
            loss, g = run({"method": "exact", "guard": "off", "layers": {i: options for i in range(depth)}})
            rows.append({"layers": depth, "loss": loss, "loss_delta": loss - loss_ref,
                         "grad_rel_err": float((g - g_ref).norm() / g_ref.norm())})
            if progress is not None:
                progress.update(1)
        out[name] = rows
    model.zero_grad(set_to_none=True)
    return out


def diagnose(model, data, settings: dict | None = None, *, depth_settings: list[str] | None = None,
             max_batches: int | None = None, depth_batches: int | None = None, progress: bool = True) -> Report:
    """Per layer and head statistics and errors of every setting, plus the end-to-end depth sweep.

    Args:
        model: a causal LM (any attention implementation; it is switched to fastattn for the run and back).
        data: input ids [B, N], a dict of model inputs, or an iterable of either (e.g. a DataLoader).
        settings: name -> options to measure (default `DEFAULT_SETTINGS`).
        depth_settings: settings for the depth sweep (default: the poly settings with band 64 and conv-k16
            when present; [] to skip it).
        max_batches: stop after this many batches.
        depth_batches: the depth sweep pools the first this many of those batches, token-weighted (default: all
            of them; it costs 1 + len(depth_settings) * num_layers forward and backward passes per batch).
    """
    from tqdm.auto import tqdm

    settings = dict(DEFAULT_SETTINGS if settings is None else settings)
    if depth_settings is None:
        depth_settings = [s for s in ("poly-d2-w64", "conv-k16") if s in settings]
    impl = model.config._attn_implementation
    before = _with_options(model, {"method": "exact"})
    capture = _Capture()
    backend._HOOKS.append(capture)
    device = _model_device(model)
    pooled, per_layer, tokens, width, depth_data, head_dim = {}, {}, 0, 0, [], 0
    try:
        batches = list(_batches(data, max_batches))
        num_layers = model.config.get_text_config().num_hidden_layers
        total = len(batches) * num_layers + len(depth_settings) * num_layers
        bar = tqdm(total=total, desc="diagnose", disable=not progress)
        was_training = model.training
        model.eval()
        for batch in batches:
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            if depth_batches is None or len(depth_data) < depth_batches:
                depth_data.append(batch)
            capture.layers.clear()
            with torch.no_grad():
                model(**batch, use_cache=False)
            width = max(width, batch["input_ids"].shape[1])
            for layer, (q, k, v, kv_valid, opts) in sorted(capture.layers.items()):
                head_dim = q.shape[-1]
                # the longest real row (padding left out; packed sequences one by one, as the ops see them)
                tokens = max(tokens, k.shape[2] if kv_valid is None else int(kv_valid.sum(-1).max()))
                stats, sums = layer_stats(q, k, v, kv_valid, opts, settings, layer)
                bar.update(1)
                if layer not in per_layer:
                    per_layer[layer] = stats
                    pooled[layer] = sums
                else:  # pool over batches: maxima of ranges, sums of squared errors
                    for old, new in zip(per_layer[layer], stats):
                        old.logit_max = max(old.logit_max, new.logit_max)
                        old.q_inf, old.k_inf = max(old.q_inf, new.q_inf), max(old.k_inf, new.k_inf)
                        # rms_logit is not an rms over all rows: it is the guard's per-sequence rms logit, already
                        # the max over a batch's sequences, and predicted is the guard's per-sequence error bound
                        # at it; both are worst cases, so pooling over batches is the max (= one batch of all rows)
                        old.rms_logit = max(old.rms_logit, new.rms_logit)
                        old.predicted = {s: max(old.predicted[s], new.predicted[s]) for s in old.predicted}
                    pooled[layer]["ref_sq"] += sums["ref_sq"]
                    pooled[layer]["ent_sum"] += sums["ent_sum"]  # entropy: a mean over all real rows
                    pooled[layer]["rows"] += sums["rows"]
                    for s in settings:
                        pooled[layer]["err_sq"][s] += sums["err_sq"][s]
        heads = []
        for layer in sorted(per_layer):
            ref_sq = pooled[layer]["ref_sq"].clamp_min(1e-30)
            ent = pooled[layer]["ent_sum"] / max(pooled[layer]["rows"], 1)
            for st in per_layer[layer]:
                st.entropy = float(ent[st.head])
                st.errors = {s: float((pooled[layer]["err_sq"][s][st.head] / ref_sq[st.head]).sqrt())
                             for s in settings}
                heads.append(st)
        backend._HOOKS.remove(capture)
        depth = {}
        if depth_settings and depth_data:
            with torch.enable_grad():
                depth = depth_sweep(model, depth_data, {s: settings[s] for s in depth_settings}, bar)
        model.train(was_training)
        bar.close()
    finally:
        if capture in backend._HOOKS:
            backend._HOOKS.remove(capture)
        _restore(model, before, impl)
    meta = {"settings": settings, "tokens_per_row": tokens, "padded_width": width, "batches": len(batches),
            "depth_batches": len(depth_data) if depth else 0,
            "head_dim": head_dim,
            "model_type": model.config.model_type, "num_layers": num_layers}
    return Report(heads, depth, meta)


# ------------------------------------------------------------------------------------------ planning
def setting_cost(options: dict, n: int, d: int) -> float:
    """FLOPs per head of a setting's forward at sequence length n: the benchmark's count (`bench.flop_count`, the
    torch chunk path for poly). A band or basis covering every token runs exact attention; a sliding window
    (method band) reads W keys a row."""
    from .bench import flop_count

    cfg = FastAttnConfig(**options)
    args = argparse.Namespace(device="cpu", dtype="fp32", degree=cfg.degree, band=cfg.local_window,
                              chunk=cfg.chunk_size, kernel="torch", conv_k=cfg.conv_k)
    if _covers(options, n) or cfg.method == "exact":
        return flop_count("exact", 1, 1, 1, n, d, "fwd", args)
    if cfg.method == "band":
        return 4.0 * n * cfg.local_window * d
    return flop_count(cfg.method, 1, 1, 1, n, d, "fwd", args)


def _covers(options: dict, n: int) -> bool:
    """Is the setting exact at length n by construction (a band or a basis as long as the sequence)?"""
    cfg = FastAttnConfig(**options)
    return (cfg.method in ("poly", "band") and cfg.local_window >= n) or (cfg.method == "conv" and cfg.conv_k >= n)


def plan(report: Report, budget: float, *, length: int | None = None, settings: list[str] | None = None) -> dict:
    """Per (layer, head): the cheapest setting (at sequence length `length`, default 8192) whose measured
    error is <= budget and that runs in linear time; exact otherwise. Returns a `fastattn_config['plan']`."""
    if not budget > 0:
        raise ValueError(f"budget must be a positive relative error (e.g. 0.05), got {budget}")
    length = length or max(8192, report.meta["tokens_per_row"])
    all_settings = report.meta["settings"]
    names = settings or list(all_settings)
    unknown = [s for s in names if s not in all_settings]
    if unknown:
        raise ValueError(f"settings {unknown} were not measured; the report has {sorted(all_settings)}")
    d = report.meta.get("head_dim", 64)
    n_measured = report.meta["tokens_per_row"]  # the longest real (unpadded) row measured
    # a band or a basis that covered every measured token was exact by construction: its error says nothing
    names = [s for s in names if not _covers(all_settings[s], n_measured)]
    chosen_settings = {EXACT: {"method": "exact"}}
    layers = {}
    for h in report.heads:
        best, best_cost = EXACT, setting_cost({"method": "exact"}, length, d)
        if not h.sliding:
            for s in names:
                if h.feasible.get(s, True) and h.errors.get(s, math.inf) <= budget:
                    cost = setting_cost(all_settings[s], length, d)
                    if cost < best_cost:
                        best, best_cost = s, cost
        if best != EXACT:
            chosen_settings[best] = all_settings[best]
        layers.setdefault(str(h.layer), [EXACT] * report.num_heads)[h.head] = best
    return {"settings": chosen_settings, "layers": layers}


def plan_summary(p: dict) -> str:
    counts = {}
    for heads in p["layers"].values():
        for s in heads:
            counts[s] = counts.get(s, 0) + 1
    total = sum(counts.values())
    return ", ".join(f"{s}: {c}/{total}" for s, c in sorted(counts.items(), key=lambda x: -x[1]))


@torch.no_grad()
def evaluate_plan(model, p: dict, data, *, max_batches=None) -> dict:
    """Realised error of a plan on (held-out) data: per-head output errors of the planned setting, and
    end-to-end logit / loss deltas of the planned model vs exact. Everything is pooled over the batches as if
    they were one: errors as ratios of summed squares, losses as means over all scored tokens."""
    from . import configure

    impl = model.config._attn_implementation
    before = _with_options(model, {"method": "exact"})
    planned = {s: o for s, o in p["settings"].items()}
    capture = _Capture()
    backend._HOOKS.append(capture)
    device = _model_device(model)
    ref_sq, err_sq, loss_ref, loss_plan, logit_num, logit_den, scored = {}, {}, 0.0, 0.0, 0.0, 0.0, 0
    try:
        batches = list(_batches(data, max_batches))
        for batch in batches:
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            capture.layers.clear()
            _with_options(model, {"method": "exact"})
            out_ref = _lm_forward(model, batch)
            logits_ref = out_ref.logits
            w = _scored_tokens(batch)  # losses are token means: weight each batch's by its scored tokens
            scored += w
            if w:
                loss_ref += w * float(out_ref.loss)
            for layer, (q, k, v, kv_valid, opts) in capture.layers.items():
                heads = p["layers"].get(str(layer))
                if heads is None or opts["window"] is not None:
                    continue
                ref = naive_attention(q.float(), k.float(), v.float(), opts["scale"], True, None, opts["softcap"],
                                      kv_valid, _sinks(opts))
                rows = _rows_mask(kv_valid, q.shape[0], q.shape[2], q.device)
                out = torch.zeros_like(ref)
                for name in set(heads):
                    out_s = _setting_output(q.float(), k.float(), v.float(), kv_valid, opts, planned[name])
                    sel = torch.tensor([h == name for h in heads], device=q.device)[None, :, None, None]
                    out = torch.where(sel, out_s.float(), out)
                ref_sq[layer] = ref_sq.get(layer, 0) + (ref.masked_fill(~rows, 0.0) ** 2).sum((0, 2, 3))
                err_sq[layer] = err_sq.get(layer, 0) + ((out - ref).masked_fill(~rows, 0.0) ** 2).sum((0, 2, 3))
            capture.layers.clear()
            configure(model, replace=True, guard="off", plan=p)
            out_plan = _lm_forward(model, batch)
            logits = out_plan.logits
            if w:
                loss_plan += w * float(out_plan.loss)
            logit_num += float((logits - logits_ref).float().norm() ** 2)
            logit_den += float(logits_ref.float().norm() ** 2)
    finally:
        backend._HOOKS.remove(capture)
        _restore(model, before, impl)
    per_head = {f"{layer}.{h}": float((err_sq[layer][h] / ref_sq[layer][h].clamp_min(1e-30)).sqrt())
                for layer in err_sq for h in range(len(err_sq[layer]))}
    nt = max(1, scored)
    return {"per_head": per_head, "loss_exact": loss_ref / nt, "loss_plan": loss_plan / nt,
            "logit_rel_err": math.sqrt(logit_num / max(logit_den, 1e-30))}


def predicted_vs_realised(report: Report, p: dict, realised: dict) -> str:
    """A table of the planner's prediction (diagnostic error of the chosen setting) next to the realised
    error of the planned model on other data."""
    lines = [f"{'head':>8}{'setting':>16}{'predicted':>11}{'realised':>10}"]
    worst_pred = worst_real = 0.0
    for key, real in sorted(realised["per_head"].items(), key=lambda x: tuple(map(int, x[0].split(".")))):
        layer, head = map(int, key.split("."))
        name = p["layers"][str(layer)][head]
        pred = 0.0 if name == EXACT else report.head(layer, head).errors[name]
        worst_pred, worst_real = max(worst_pred, pred), max(worst_real, real)
        if name != EXACT:
            lines.append(f"{key:>8}{name:>16}{pred:>11.2%}{real:>10.2%}")
    lines.append(f"worst head: predicted {worst_pred:.2%}, realised {worst_real:.2%}; "
                 f"end to end: logits rel. error {realised['logit_rel_err']:.2%}, "
                 f"loss {realised['loss_exact']:.4f} (exact) -> {realised['loss_plan']:.4f} (plan)")
    return "\n".join(lines)


def clone_with_plan(model, p: dict):
    """A deep copy of `model` running plan `p` on default options (the original is left untouched): nothing
    of the model's previous configuration (method, band, degree, per-layer overrides) carries over into the
    plan's settings, which run as they were measured."""
    from . import configure

    m = copy.deepcopy(model)
    configure(m, replace=True, plan=p)
    return m

