"""The headline experiment: does the far part of the approximation carry information that a sliding window
does not — before and after fine-tuning through it, with equal budgets?

Arms (each a fastattn configuration of the same embedded model):
  exact      exact attention (fine-tuned the same way: continued training alone lowers held-out loss)
  poly       degree-2 polynomial far part + exact band of W keys, fine-tuned through poly's own backward
  band       the honest baseline: the same band of W keys and nothing beyond (a sliding window)
  conv       conv basis with k bases
  plan       a per-head mixed plan chosen by the diagnostics within an error budget
Every arm gets the same optimizer steps, the same batches (same seed) and the same learning rate. Measured
before and after: held-out perplexity at the training length and at long_factor (4) times it, the copy probe (loss on the second
copy of a random passage repeated far beyond W — a band cannot see the first copy) and passkey retrieval at
depths far beyond W.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch


@dataclass
class ExperimentConfig:
    model: str = "embedded"
    window: int = 64  # W: the exact band of poly and the width of the band baseline
    arms: list = field(default_factory=lambda: ["exact", "poly", "band", "conv", "plan"])
    steps: int = 60
    seq_len: int = 512
    batch_size: int = 8
    lr: float = 3e-4
    copy_fraction: float = 0.25
    eval_tokens: int = 16384
    long_factor: int = 4
    passkey_trials: int = 4
    passkey_depths: tuple = (0.1, 0.5)
    conv_k: int = 16
    plan_budget: float = 0.1
    seed: int = 0
    threads: int = 0


def arm_options(arm: str, cfg: ExperimentConfig, plan: dict | None = None) -> dict:
    w = cfg.window
    if arm == "exact":
        return {"method": "exact"}
    if arm == "poly":
        return {"method": "poly", "degree": 2, "local_window": w, "guard": "off"}
    if arm == "band":
        return {"method": "band", "local_window": w}
    if arm == "conv":
        return {"method": "conv", "conv_k": cfg.conv_k}
    if arm == "plan":
        return {"method": "exact", "guard": "off", "plan": plan}
    raise ValueError(f"unknown arm {arm!r}; choose from {', '.join(ARMS)}")


ARMS = ("exact", "poly", "band", "conv", "plan")
COPY_MARGIN, COPY_PASSAGE = 96, 48  # the copy probe's distance is seq_len - COPY_MARGIN; its passage 48 bytes


def check_config(cfg: ExperimentConfig) -> None:
    """ValueError (naming the command-line option) for a configuration the experiment cannot run, before any
    work: unknown arms, and a --seq-len too short for the copy probe (distance seq_len - 96 must be at least the
    48-byte passage, or the two copies overlap / the distance is not positive)."""
    unknown = [a for a in cfg.arms if a not in ARMS]
    if unknown or not cfg.arms:
        raise ValueError(f"--arms: unknown arm(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
                         f"choose from {', '.join(ARMS)}")
    if len(set(cfg.arms)) != len(cfg.arms):
        raise ValueError(f"--arms: an arm is named twice in {','.join(cfg.arms)}")
    distance = cfg.seq_len - COPY_MARGIN
    if distance < COPY_PASSAGE:
        raise ValueError(f"--seq-len {cfg.seq_len} is too short for the copy probe: its distance seq_len - "
                         f"{COPY_MARGIN} = {distance} must be at least the {COPY_PASSAGE}-byte passage, so --seq-len "
                         f">= {COPY_MARGIN + COPY_PASSAGE}")
    if distance < cfg.window:  # the probe asks what is copied from beyond the band: inside it, every arm copies
        raise ValueError(f"--seq-len {cfg.seq_len}: the copy probe's distance seq_len - {COPY_MARGIN} = {distance} "
                         f"must be at least the window W = {cfg.window} (beyond the band), so --seq-len >= "
                         f"{cfg.window + COPY_MARGIN}")


def measure(model, cfg: ExperimentConfig, ids: torch.Tensor, source) -> dict:
    from . import evaluation

    model.eval()
    long = cfg.seq_len * cfg.long_factor
    ppl = evaluation.perplexity_vs_length(model, ids, [cfg.seq_len, long], cfg.eval_tokens)
    copy = evaluation.copy_probe(model, source, cfg.seq_len, cfg.seq_len - COPY_MARGIN, rows=8, passage=COPY_PASSAGE)
    copy_long = evaluation.copy_probe(model, source, long, long - COPY_MARGIN, rows=4, passage=COPY_PASSAGE)
    keys = evaluation.passkey(model, source, [cfg.seq_len], list(cfg.passkey_depths), cfg.passkey_trials)
    return {
        "ppl": ppl[cfg.seq_len]["perplexity"], "ppl_long": ppl[long]["perplexity"],
        "copy_first": copy["first"], "copy_second": copy["second"], "copy_distance": copy["distance"],
        "copy_long_first": copy_long["first"], "copy_long_second": copy_long["second"],
        "copy_long_distance": copy_long["distance"],
        "passkey": sum(keys.values()) / len(keys), "passkey_detail": keys,
    }


def _finetune(cfg: ExperimentConfig, options: dict, output_dir: Path):
    from .finetune import add_arguments, run

    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args([
        "--model", cfg.model, "--attn", "fastattn", "--steps", str(cfg.steps), "--seq-len", str(cfg.seq_len),
        "--batch-size", str(cfg.batch_size), "--lr", str(cfg.lr), "--warmup", str(max(1, cfg.steps // 10)),
        "--copy-fraction", str(cfg.copy_fraction), "--eval-every", "0", "--eval-batches", "2", "--seed", str(cfg.seed),
        "--no-save-model", "--quiet", "--output-dir", str(output_dir),
    ])
    args.plan = None
    metrics = run(args, fastattn_override=options)
    return metrics["model"], metrics


def run_experiment(cfg: ExperimentConfig, progress=print, out: Path | None = None) -> dict:
    """Every arm measured before and after fine-tuning. Each arm's fine-tuning run (metrics.json) goes to
    `out`/ft-<arm> (default: runs/experiment)."""
    import hf_fastattn

    from .data import encode
    from .diagnostics import diagnose, plan
    from .loading import load_model, read_text, tokenize, windows

    check_config(cfg)
    out = Path("runs/experiment") if out is None else Path(out)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    base, tokenizer = load_model(cfg.model)
    text = read_text(None, "heldout")
    ids, source = tokenize(tokenizer, text), encode(text)
    results = {"config": asdict(cfg), "arms": {}, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    the_plan = None
    if "plan" in cfg.arms:
        diag_ids = windows(tokenize(tokenizer, read_text(None, "train")[:200_000]), cfg.seq_len, 2, 1)
        report = diagnose(base, diag_ids, depth_settings=[], progress=False)
        the_plan = plan(report, cfg.plan_budget, length=cfg.seq_len * cfg.long_factor)
        from .diagnostics import plan_summary

        results["plan"] = {"budget": cfg.plan_budget, "summary": plan_summary(the_plan), "plan": the_plan}
        progress(f"plan within {cfg.plan_budget:.0%}: {plan_summary(the_plan)}")
    for arm in cfg.arms:
        t0 = time.time()
        options = arm_options(arm, cfg, the_plan)
        hf_fastattn.configure(base, replace=True, **options)
        before = measure(base, cfg, ids, source)
        tuned, metrics = _finetune(cfg, options, out / f"ft-{arm}")
        hf_fastattn.configure(tuned, replace=True, **options)
        after = measure(tuned, cfg, ids, source)
        results["arms"][arm] = {"options": options, "before": before, "after": after,
                                "train_loss": [h["loss"] for h in metrics["train"]],
                                "op_calls": metrics["op_calls"], "seconds": time.time() - t0}
        progress(f"{arm:<6} ppl {before['ppl']:.3f} -> {after['ppl']:.3f} | {cfg.long_factor}x {before['ppl_long']:.3f} -> "
                 f"{after['ppl_long']:.3f} | copy 2nd {before['copy_second']:.2f} -> {after['copy_second']:.2f} "
                 f"(1st {after['copy_first']:.2f}) | passkey {before['passkey']:.0%} -> {after['passkey']:.0%} "
                 f"[{time.time() - t0:.0f} s]")
        del tuned
    results["verdict"] = verdict(results)
    return results


def _compare(a: float, b: float, tol: float = 0.01) -> str:
    """'lower' / 'higher' / 'equal within 1 %' for a vs b (one seed cannot separate closer values)."""
    if abs(a - b) <= tol * abs(b):
        return f"equal within {tol:.0%}"
    return "lower" if a < b else "higher"


def verdict(results: dict) -> str:
    """The plain-words answer: does the poly far part beat the band alone, and does any arm copy from far?"""
    arms = results["arms"]
    if "poly" not in arms or "band" not in arms:
        return "poly vs band not compared"
    p, b = arms["poly"]["after"], arms["band"]["after"]
    far, w = results["config"]["seq_len"] - COPY_MARGIN, results["config"]["window"]
    better_copy = p["copy_second"] < b["copy_second"] - 0.05
    lines = [
        f"copy probe at distance {far} >= W={w}: poly {p['copy_second']:.2f} vs band {b['copy_second']:.2f} nats/byte "
        f"on the second copy (first copy, nothing to copy from: {p['copy_first']:.2f}) -> "
        + ("the poly far part carries long-range information the band cannot." if better_copy else
           "the poly far part does NOT recover the far copy better than the band alone."),
        f"held-out perplexity at the training length: poly {p['ppl']:.3f} vs band {b['ppl']:.3f} "
        f"({_compare(p['ppl'], b['ppl'])}); at {results['config']['long_factor']}x: poly {p['ppl_long']:.3f} vs band "
        f"{b['ppl_long']:.3f} ({_compare(p['ppl_long'], b['ppl_long'])}).",
    ]
    copiers = [a for a, r in arms.items() if r["after"]["copy_second"] < r["after"]["copy_first"] - 0.3]
    lines.append("arms that copy from beyond W: " + (", ".join(copiers) if copiers else "none") + ".")
    return " ".join(lines)


def format_table(results: dict) -> str:
    cfg = results["config"]
    long = cfg["seq_len"] * cfg["long_factor"]
    head = (f"{'arm':<6} | {'ppl@' + str(cfg['seq_len']):>16} | {'ppl@' + str(long):>16} | "
            f"{'copy 2nd @' + str(cfg['seq_len'] - COPY_MARGIN):>18} | {'passkey':>11}")
    lines = [head, "-" * len(head)]
    for arm, r in results["arms"].items():
        b, a = r["before"], r["after"]
        lines.append(f"{arm:<6} | {b['ppl']:>7.3f} -> {a['ppl']:>6.3f} | {b['ppl_long']:>7.3f} -> {a['ppl_long']:>6.3f} | "
                     f"{b['copy_second']:>8.2f} -> {a['copy_second']:>6.2f} | {b['passkey']:>4.0%} -> {a['passkey']:>4.0%}")
    lines.append(f"(before -> after {cfg['steps']} fine-tuning steps of {cfg['batch_size']}x{cfg['seq_len']} tokens "
                 f"each, same batches for every arm; copy: nats/byte on the second copy of a random passage, the "
                 f"first copy being {cfg['seq_len'] - COPY_MARGIN} bytes back; W = {cfg['window']})")
    lines.append(results.get("verdict", ""))
    return "\n".join(lines)


def save(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "results.md").write_text("```\n" + format_table(results) + "\n```\n")
