"""hf_fastattn: almost-linear-time attention backends for HuggingFace Transformers.

`import hf_fastattn` registers the `fastattn` attention implementation (and its compact mask function), so
that `AutoModelForCausalLM.from_pretrained(path, attn_implementation="fastattn")` runs attention through it.
Options live in `model.config.fastattn_config`; set them with `hf_fastattn.configure(model, ...)`.
"""

from __future__ import annotations

from .config import FastAttnConfig, get_config

__version__ = "0.1.0"
NAME = "fastattn"

__all__ = ["FastAttnConfig", "configure", "diagnose", "plan", "get_config", "register", "reset_states", "NAME",
           "__version__"]


def register(name: str = NAME) -> str:
    """Register the attention function and the mask function under `name` (idempotent)."""
    from transformers import AttentionInterface, AttentionMaskInterface

    from .backend import fastattn_attention_forward, fastattn_mask

    AttentionInterface.register(name, fastattn_attention_forward)
    AttentionMaskInterface.register(name, fastattn_mask)
    return name


def _configs(model):
    """The config objects whose attention modules read `fastattn_config` (text sub-configs included)."""
    seen, out = set(), []
    for module in [model, *model.modules()]:
        cfg = getattr(module, "config", None)
        if cfg is not None and id(cfg) not in seen and hasattr(cfg, "to_dict"):
            seen.add(id(cfg))
            out.append(cfg)
    return out


def configure(model, options: dict | FastAttnConfig | None = None, *, replace: bool = False, **kwargs) -> FastAttnConfig:
    """Set fastattn options on `model` and switch it to the `fastattn` attention implementation.

    `configure(model, method="poly", degree=2, local_window=64)` updates the options already stored on the
    model (`replace=True` starts from the defaults); a `FastAttnConfig` given as `options` is taken whole, as
    the new options (keyword arguments go on top of it). The result is stored as a JSON dict in
    `model.config.fastattn_config`, so it is saved with `save_pretrained`.
    """
    base = FastAttnConfig() if replace else get_config(model.config)
    if isinstance(options, FastAttnConfig):  # a whole config: its default-valued fields count too
        base, options = options, None
    cfg = base.replace(**{**(options or {}), **kwargs})
    stored = cfg.to_dict()
    for c in _configs(model):
        c.fastattn_config = stored
    reset_states(model)  # a conv basis or plan group state kept for decoding belongs to the old options
    if getattr(model.config, "_attn_implementation", None) != NAME:
        model.set_attn_implementation(NAME)
    return cfg


def reset_states(model) -> int:
    """Drop what the layers keep between inference calls for decoding (poly's prefix states, conv's bases, a
    plan's group states): they hold tensors of the last sequence until the next one replaces them. Returns how
    many layers had any. A new sequence does not need this: each state is checked against the cache it is given."""
    from .backend import _STATES

    dropped = 0
    for module in model.modules():
        found = [name for name in _STATES if name in module.__dict__]
        for name in found:
            del module.__dict__[name]
        dropped += bool(found)
    return dropped


def diagnose(model, data, settings=None, **kwargs):
    """Per-layer, per-head statistics and measured errors of every method setting; see `hf_fastattn.diagnostics`."""
    from .diagnostics import diagnose as _diagnose

    return _diagnose(model, data, settings, **kwargs)


def plan(report, budget: float, **kwargs) -> dict:
    """Cheapest setting per (layer, head) within `budget`; apply with `configure(model, plan=...)`."""
    from .diagnostics import plan as _plan

    return _plan(report, budget, **kwargs)


register()
