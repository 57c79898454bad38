"""`FastAttnConfig`: the options of the `fastattn` backend.

The options ride on the model config as a plain dict, `model.config.fastattn_config`, so that they
round-trip through `save_pretrained` / `from_pretrained` (transformers keeps unknown config attributes).
Every value is validated; a bad key or value raises `ValueError` naming the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass, field
from typing import Any

METHODS = ("exact", "poly", "conv", "band")
GUARDS = ("warn", "exact", "error", "off")
CONV_PLACEMENTS = ("search", "even", "geometric")
POLY_FITS = ("taylor", "fit")
BACKENDS = ("auto", "torch", "triton")
# config options and the names the ops (and `hf-fastattn bench`'s method specs, which call the ops) give them
OP_NAMES = {"local_window": "band", "chunk_size": "chunk", "conv_k": "k", "conv_placement": "placement"}

# Options that may differ per layer (`layers={idx: {...}}`); `layers` and `plan` themselves are global.
_GLOBAL_ONLY = ("layers", "plan")


@dataclass(frozen=True)
class FastAttnConfig:
    """Options of the `fastattn` attention backend.

    Args:
        method: `"exact"` (chunked exact softmax, linear memory), `"poly"` (polynomial method),
            `"conv"` (conv-basis / FFT), `"band"` (exact attention inside the local window only — the honest
            baseline for the far part of `poly`: a sliding window of `local_window` keys).
        guard: what `poly` does when its bounded-entry bound predicts a large error: `"warn"` (once per
            layer), `"exact"` (run exact attention for that call), `"error"` (raise), `"off"`.
        guard_tolerance: predicted relative error above which the guard acts.
        degree: even degree g >= 2 of the polynomial P ≈ exp (2: the fused kernels; 4, 6: tighter, r grows as d^g).
        poly_coeffs: `"taylor"` (Taylor series of exp at 0) or `"fit"` (least-squares fit on
            `[-fit_range, fit_range]`, kept positive).
        fit_range: half-width of the logit range the `"fit"` polynomial is fitted on.
        local_window: exact band W: keys with 0 <= i - j < W use exp exactly, the rest use P.
        chunk_size: tokens per chunk of the chunked poly forward/backward.
        feature_cap: largest allowed feature count r = sum_t C(d + t - 1, t) of the packed tensor powers.
        kernel: `"auto"` (Triton on CUDA when available, torch otherwise), `"torch"`, `"triton"`.
        poly_save_states: keep the Triton kernels' boundary prefix states from forward to backward (one key
            sweep less per backward, but up to 10 GiB per layer held until the backward at long context). Off:
            the backward recomputes them and a layer keeps only q, k, v, out and two floats per row, as
            FlashAttention does. The torch path always recomputes. Keep it off under non-reentrant activation
            checkpointing: the states hang on the autograd node, outside the tensors checkpointing frees.
        poly_decode_state: in inference, keep each layer's far keys as a prefix state [r, Dv + 1] between decode
            calls (`ops/poly/recurrent.py`): a new token's far part costs O(r Dv) instead of O(N D) once the far
            keys outnumber the r features; it holds r (Dv + 1) floats per K/V head and batch row (4.3 MB at
            D = 128, as much as about 8k tokens of a bf16 KV cache); a prefill on the torch chunk path starts it
            (the first decoded token sweeps no features). Off: every decode call runs the direct form.
        conv_k: number of conv bases k.
        conv_T, conv_delta, conv_eps: the recovery search parameters of the conv-basis paper (a window
            of T diagonal entries, the threshold delta and the noise level eps).
        conv_placement: `"search"` (the paper's binary search), `"even"` or `"geometric"` basis columns.
        exact_block: query rows per block of the exact op (0: chosen from the sequence length).
        layers: per-layer overrides, `{layer_idx: {option: value}}`.
        plan: per-(layer, head) method plan written by `hf_fastattn.plan` (see diagnostics).
    """

    method: str = "exact"
    guard: str = "warn"
    guard_tolerance: float = 0.05
    degree: int = 2
    poly_coeffs: str = "taylor"
    fit_range: float = 2.0
    local_window: int = 0
    chunk_size: int = 128
    feature_cap: int = 65536
    kernel: str = "auto"
    poly_save_states: bool = False
    poly_decode_state: bool = True
    conv_k: int = 16
    conv_T: int = 8
    conv_delta: float = 0.5
    conv_eps: float = 1e-3
    conv_placement: str = "even"
    exact_block: int = 0
    layers: dict = field(default_factory=dict)
    plan: dict = field(default_factory=dict)

    def __post_init__(self):
        _check_choice("method", self.method, METHODS)
        _check_choice("guard", self.guard, GUARDS)
        _check_choice("poly_coeffs", self.poly_coeffs, POLY_FITS)
        _check_choice("kernel", self.kernel, BACKENDS)
        _check_choice("conv_placement", self.conv_placement, CONV_PLACEMENTS)
        _check_int("degree", self.degree, 2)
        for name in ("poly_save_states", "poly_decode_state"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"fastattn_config[{name!r}] must be true or false; got {getattr(self, name)!r}")
        if self.degree % 2:
            raise ValueError(
                f"fastattn_config['degree'] must be even (2, 4, 6, ...): an odd Taylor polynomial of exp goes "
                f"negative and the softmax normaliser can vanish; got {self.degree}"
            )
        _check_int("local_window", self.local_window, 0)
        _check_int("chunk_size", self.chunk_size, 1)
        _check_int("feature_cap", self.feature_cap, 1)
        _check_int("conv_k", self.conv_k, 1)
        _check_int("conv_T", self.conv_T, 1)
        _check_int("exact_block", self.exact_block, 0)
        _check_positive("guard_tolerance", self.guard_tolerance)
        _check_positive("fit_range", self.fit_range)
        _check_positive("conv_delta", self.conv_delta)
        _check_positive("conv_eps", self.conv_eps, allow_zero=True)
        if self.conv_placement == "search" and self.conv_delta <= 2 * self.conv_T * self.conv_eps:
            raise ValueError(  # the op refuses it too, but only at the first forward
                f"fastattn_config['conv_delta'] must exceed 2 conv_T conv_eps = {2 * self.conv_T * self.conv_eps:g} "
                f"with conv_placement 'search' (a column deviates at delta - 2 T eps); got {self.conv_delta!r}"
            )
        if not isinstance(self.layers, dict):
            raise ValueError(f"fastattn_config['layers'] must be a dict {{layer_idx: {{option: value}}}}, got {self.layers!r}")
        # keys normalised (layers: int, plan layers: str, as in JSON): 0 and "0" name the same layer
        object.__setattr__(self, "layers", _by_layer(self.layers, int, "layers"))
        for idx, override in self.layers.items():
            if not isinstance(override, dict):
                raise ValueError(f"fastattn_config['layers'][{idx!r}] must be a dict of options, got {override!r}")
            bad = [k for k in override if k in _GLOBAL_ONLY]
            if bad:
                raise ValueError(f"fastattn_config['layers'][{idx!r}] may not set {bad}: they are global options")
            dataclasses.replace(self, layers={}, plan={}, **_checked_keys(override, f"layers[{idx!r}]"))
        _check_plan(self.plan)
        if self.plan:
            object.__setattr__(self, "plan", {**self.plan, "layers": _by_layer(self.plan["layers"], str, "plan.layers")})

    # ---------------------------------------------------------------- construction / serialisation
    @classmethod
    def from_dict(cls, options: dict | None) -> FastAttnConfig:
        """Build from a (JSON) dict, rejecting unknown keys."""
        if options is None:
            return cls()
        if isinstance(options, FastAttnConfig):
            return options
        if not isinstance(options, dict):
            raise ValueError(f"fastattn_config must be a dict of options, got {type(options).__name__}")
        return cls(**_checked_keys(options, ""))

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict of the options that differ from the defaults (what goes into config.json)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if value != default:
                out[f.name] = {str(k): v for k, v in value.items()} if isinstance(value, dict) else value
        return json.loads(json.dumps(out))

    def replace(self, **options) -> FastAttnConfig:
        return dataclasses.replace(self, **_checked_keys(options, ""))

    def head_plan(self, layer_idx: int | None) -> list[str] | None:
        """Per-head setting names of a mixed plan for this layer (None: no plan for it)."""
        if not self.plan or layer_idx is None:
            return None
        return self.plan["layers"].get(str(layer_idx))

    def setting(self, name: str) -> FastAttnConfig:
        """The options of one plan setting, on top of these options (the plan itself dropped)."""
        return dataclasses.replace(self, plan={}, layers={}, **self.plan["settings"][name])

    def for_layer(self, layer_idx: int | None) -> FastAttnConfig:
        """The options that apply to one layer (global options with that layer's overrides)."""
        if layer_idx is None or not self.layers:
            return self
        override = self.layers.get(layer_idx)
        if not override:
            return self
        return dataclasses.replace(self, layers={}, **override)


def _check_plan(plan) -> None:
    """plan = {"settings": {name: {option: value}}, "layers": {"<layer>": [setting name per head]}}."""
    if not isinstance(plan, dict):
        raise ValueError(f"fastattn_config['plan'] must be a dict, got {type(plan).__name__}")
    if not plan:
        return
    if set(plan) != {"settings", "layers"}:
        raise ValueError(f"fastattn_config['plan'] needs exactly the keys 'settings' and 'layers', got {sorted(plan)}")
    settings, layers = plan["settings"], plan["layers"]
    if not isinstance(settings, dict) or not isinstance(layers, dict):
        raise ValueError("fastattn_config['plan']['settings'] and ['layers'] must be dicts")
    for name, options in settings.items():
        if not isinstance(options, dict) or any(k in _GLOBAL_ONLY for k in options):
            raise ValueError(f"fastattn_config['plan']['settings'][{name!r}] must be a dict of per-layer options")
        FastAttnConfig(**_checked_keys(options, f"plan.settings[{name!r}]"))
    for idx, heads in layers.items():
        _layer_key(idx)
        if not isinstance(heads, list) or not heads:
            raise ValueError(f"fastattn_config['plan']['layers'][{idx!r}] must be a non-empty list of setting names")
        unknown = sorted({h for h in heads if h not in settings})
        if unknown:
            raise ValueError(
                f"fastattn_config['plan']['layers'][{idx!r}] names unknown settings {unknown}; "
                f"defined settings are {sorted(settings)}"
            )


def _by_layer(items: dict, kind, where: str) -> dict:
    """`items` with its layer-index keys as `kind` (int or str); two keys for one layer are refused."""
    out = {}
    for idx, value in items.items():
        key = kind(_layer_key(idx))
        if key in out:
            raise ValueError(f"fastattn_config[{where!r}] names layer {key} twice (as {idx!r} and another key)")
        out[key] = value
    return out


def _layer_key(idx) -> int:
    try:
        value = int(idx)
    except (TypeError, ValueError):
        value = -1
    if value < 0 or str(value) != str(idx).strip():
        raise ValueError(f"fastattn_config['layers'] keys must be layer indices (non-negative integers), got {idx!r}")
    return value


def _checked_keys(options: dict, where: str) -> dict:
    allowed = [f.name for f in dataclasses.fields(FastAttnConfig)]
    for key in options:
        if key not in allowed:
            prefix = f"fastattn_config{'[' + where + ']' if where else ''}"
            raise ValueError(f"{prefix}: unknown option {key!r}; allowed options are {', '.join(allowed)}")
    return dict(options)


def _check_choice(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"fastattn_config['{name}'] must be one of {', '.join(map(repr, allowed))}; got {value!r}")


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"fastattn_config['{name}'] must be an integer >= {minimum}; got {value!r}")


def _check_positive(name: str, value, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise ValueError(f"fastattn_config['{name}'] must be a finite number {'>=' if allow_zero else '>'} 0; got {value!r}")


@functools.lru_cache(maxsize=64)
def _parse(key: str) -> FastAttnConfig:
    return FastAttnConfig.from_dict(json.loads(key))


def get_config(config) -> FastAttnConfig:
    """The `FastAttnConfig` stored on a transformers config as `fastattn_config` (parsed once per value)."""
    raw = getattr(config, "fastattn_config", None)
    if isinstance(raw, FastAttnConfig):
        return raw
    return _parse(json.dumps(raw, sort_keys=True))
