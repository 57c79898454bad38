"""Long-context evaluation: perplexity vs context length, the repeated-passage copy probe, passkey retrieval,
optionally lm-eval tasks — for several attention "arms" of the same model side by side.

An arm is a string: "exact", "poly:local_window=64", "band:local_window=64", "conv:conv_k=16,conv_placement=even",
"plan:PATH" (a plan.json written by `hf-fastattn diagnose --plan`), or "sdpa" (transformers' own attention).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from .config import OP_NAMES, FastAttnConfig


def parse_arm(spec: str) -> tuple[str, dict | None]:
    """(label, fastattn options) — options None means transformers' sdpa."""
    name, _, rest = spec.partition(":")
    if name == "sdpa":
        if rest:
            raise ValueError(f"arm {spec!r}: sdpa takes no options (it is transformers' own attention)")
        return spec, None
    if name == "plan":
        raw = json.loads(Path(rest).read_text())
        return spec, {"method": "exact", "guard": "off", "plan": raw.get("plan", raw)}
    options = {"method": name, "guard": "off"}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        if key not in FastAttnConfig.__dataclass_fields__ or key in ("method", "plan"):
            allowed = ", ".join(k for k in FastAttnConfig.__dataclass_fields__ if k not in ("method", "plan"))
            config_name = {op: name for name, op in OP_NAMES.items()}.get(key)
            hint = f"; {key} is the op's name (bench's), the config's is {config_name}=" if config_name else ""
            raise ValueError(f"arm {spec!r}: unknown option {key!r} (the method is the arm's name; plan:PATH is an "
                             f"arm of its own{hint}); options: {allowed}")
        options[key] = _option_value(spec, key, value)
    FastAttnConfig(**options)  # validates
    return spec, options


def _option_value(spec: str, key: str, value: str):
    """An arm's option text as the type of the option's default (bool("false") would be True)."""
    kind = type(getattr(FastAttnConfig(), key))
    if kind is bool:
        if value.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"arm {spec!r}: {key} must be true or false, got {value!r}")
        return value.lower() in ("true", "1")
    try:
        return kind(value)
    except ValueError:
        what = {int: "an integer", float: "a number"}.get(kind, kind.__name__)
        raise ValueError(f"arm {spec!r}: {key} must be {what}, got {value!r}") from None


def use_arm(model, options: dict | None) -> None:
    import hf_fastattn

    if options is None:
        model.set_attn_implementation("sdpa")
    else:
        hf_fastattn.configure(model, replace=True, **options)


def _device(model):
    return next(model.parameters()).device


@torch.no_grad()
def window_nll(model, ids: torch.Tensor, length: int, max_windows: int, batch: int = 4) -> tuple[float, int]:
    """Summed NLL (nats) and token count over non-overlapping windows of `length` tokens."""
    rows = ids[: (len(ids) // length) * length].view(-1, length)[:max_windows]
    total, count = 0.0, 0
    for i in range(0, len(rows), batch):
        x = rows[i : i + batch].to(_device(model))
        logits = model(input_ids=x, use_cache=False).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="sum")
        total += float(nll)
        count += x[:, 1:].numel()
    return total, count


def perplexity_vs_length(model, ids: torch.Tensor, lengths, tokens_per_length: int) -> dict:
    """{length: {"perplexity", "nll_per_token", "tokens"}} through the package's offline `evaluate` metric."""
    import evaluate

    from .metrics import PERPLEXITY

    out = {}
    for length in lengths:
        metric = evaluate.load(PERPLEXITY)
        windows = max(1, tokens_per_length // length)
        if len(ids) < length:
            continue
        nll, count = window_nll(model, ids, length, windows)
        metric.add_batch(nll=[nll], tokens=[count])
        out[int(length)] = metric.compute()
    return out


@torch.no_grad()
def copy_probe(model, source: np.ndarray, length: int, distance: int, rows: int = 8, passage: int = 48) -> dict:
    """Mean NLL (nats/token) on the first and the second copy of a random passage repeated `distance` apart."""
    from .data import copy_probe as make

    ids, m1, m2 = make(source, rows, length, passage, distance, seed=11)
    ids = ids.to(_device(model))
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").cpu()
    return {"first": float(nll[m1[:, 1:]].mean()), "second": float(nll[m2[:, 1:]].mean()),
            "distance": distance, "length": length}


@torch.no_grad()
def passkey(model, source: np.ndarray, lengths, depths, trials: int = 4, seed: int = 0) -> dict:
    """{f"{length}@{depth}": accuracy}: greedy continuation must reproduce a 5-digit key hidden at `depth`."""
    from .data import passkey_prompt

    rng = random.Random(seed)
    out = {}
    for length in lengths:
        for depth in depths:
            hits = 0
            for _ in range(trials):
                key = f"{rng.randrange(10_000, 100_000)}"
                ids, _ = passkey_prompt(source, length, depth, key, rng)
                x = torch.tensor(ids[None].astype(np.int64), device=_device(model))
                gen = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=5, do_sample=False,
                                     pad_token_id=0)
                hits += bytes(gen[0, x.shape[1]:].tolist()).decode("latin-1") == key
            out[f"{length}@{depth}"] = hits / trials
    return out


def lm_eval_tasks(model, tokenizer, tasks: list[str], limit: int | None = None) -> dict:
    """lm-eval tasks through `HFLM(pretrained=model)` (the model keeps its fastattn configuration)."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
    except ImportError as err:
        raise RuntimeError("lm-eval is not installed: pip install 'hf-fastattn[eval]'") from err
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1)
    res = simple_evaluate(model=lm, tasks=tasks, limit=limit)
    return res["results"]


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(results["arms"])
    has_passkey = any(results["arms"][a].get("passkey") for a in arms)
    fig, axes = plt.subplots(1, 2 if has_passkey else 1, figsize=(12 if has_passkey else 6, 4.5), squeeze=False)
    ax = axes[0, 0]
    for arm in arms:
        ppl = results["arms"][arm]["perplexity"]
        xs = sorted(int(k) for k in ppl)
        ax.plot(xs, [ppl[str(x)]["nll_per_token"] if str(x) in ppl else ppl[x]["nll_per_token"] for x in xs],
                marker="o", label=arm)
    ax.set(xscale="log", xlabel="context length (tokens)", ylabel="held-out NLL (nats/token)",
           title="perplexity vs context length")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    if has_passkey:
        ax = axes[0, 1]
        width = 0.8 / len(arms)
        keys = list(results["arms"][arms[0]]["passkey"])
        for i, arm in enumerate(arms):
            acc = results["arms"][arm].get("passkey", {})
            ax.bar([j + i * width for j in range(len(keys))], [acc.get(k, 0) for k in keys], width, label=arm)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))])
        ax.set_xticklabels(keys, rotation=45, fontsize=7)
        ax.set(ylabel="accuracy", title="passkey retrieval (length@depth)", ylim=(0, 1.05))
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
