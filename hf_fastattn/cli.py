"""`hf-fastattn` command line: demo, bench, diagnose."""

from __future__ import annotations

import argparse
import math
import os
import sys


class UsageError(ValueError):
    """A bad option found by a command (here or in finetune); the command's `main` reports it as its argparse
    usage error."""


def positive(text: str) -> float:
    """argparse type: a positive finite number, else a usage error naming the value (integers: `at_least(1)`)."""
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def at_least(minimum: int):
    """argparse type: an integer >= minimum, else a usage error naming the value."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}")
        return value

    return parse


def comma_list(check, allow_empty: bool = False):
    """argparse type: a comma list, each item through `check` (an argparse type, or a function that raises
    ValueError), so a bad item is a usage error naming it before anything runs; '' is [] with `allow_empty`."""

    def parse(text: str) -> list:
        if allow_empty and not text.strip():
            return []
        try:
            return [check(x.strip()) for x in text.split(",")]
        except (ValueError, argparse.ArgumentTypeError) as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return parse


def even_degree(text: str) -> int:
    """argparse type: a polynomial degree (even, >= 2)."""
    value = at_least(2)(text)
    if value % 2:
        raise argparse.ArgumentTypeError(f"must be an even integer >= 2 (the polynomial method's degree), got {text!r}")
    return value


def device_name(text: str) -> str:
    """argparse type: cpu, cuda or cuda:N, a CUDA device only where torch has one."""
    import torch

    if text != "cpu" and not (text == "cuda" or (text.startswith("cuda:") and text[5:].isdigit())):
        raise argparse.ArgumentTypeError(f"must be cpu, cuda or cuda:N, got {text!r}")
    if text != "cpu" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: this torch has no CUDA device (torch {torch.__version__}); use cpu")
    return text


def looks_local(name: str, suffixes: tuple[str, ...] = ()) -> bool:
    """Is `name` meant as a local path rather than a hub id (a model, a dataset)? It starts with '.', '/' or '~',
    has more than one '/' (a hub id has at most one), or ends with one of `suffixes` (file types)."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or name.lower().endswith(suffixes)


def load_model_arg(option: str, name: str, **kw):
    """load_model, with a missing local path or an unloadable name as a UsageError naming the option."""
    from hf_fastattn.loading import load_model

    local = looks_local(name)
    if name not in ("", "embedded") and not name.startswith("tiny:") and local and not os.path.exists(name):
        raise UsageError(f"{option} {name!r}: no such model directory")
    try:
        return load_model(name, **kw)
    except (OSError, ValueError) as err:  # not a model directory / not a hub id (offline)
        raise UsageError(f"{option} {name!r}: cannot load the model: {type(err).__name__}: {err}"[:600]) from None


def _demo(args) -> int:
    """The main job on the embedded default: a shortened headline experiment (about a minute on 2 cores)."""
    from pathlib import Path

    import torch

    import hf_fastattn
    from hf_fastattn.experiment import ExperimentConfig, check_config, format_table, run_experiment, save

    cfg = ExperimentConfig(model=args.model, arms=[a for a in args.arms.split(",") if a], steps=args.steps,
                           seq_len=args.seq_len, batch_size=4, eval_tokens=args.eval_tokens, long_factor=2,
                           passkey_trials=2, passkey_depths=(0.2,), seed=args.seed)
    try:  # every arm and the lengths checked before any work
        check_config(cfg)
    except ValueError as err:
        raise UsageError(str(err)) from None
    torch.manual_seed(args.seed)
    model, _ = load_model_arg("--model", args.model)
    eager, _ = load_model_arg("--model", args.model, attn="eager")
    x = torch.randint(0, model.config.vocab_size, (2, 256),
                      generator=torch.Generator().manual_seed(args.seed))
    hf_fastattn.configure(model, method="exact")
    with torch.no_grad():
        diff = (model(input_ids=x).logits - eager(input_ids=x).logits).abs().max().item()
    print(f"plumbing check on {args.model}: fastattn(exact) vs eager, max |logit diff| = {diff:.2e}")
    print(f"shortened headline experiment: arms {cfg.arms}, {cfg.steps} fine-tuning steps each "
          f"(full version: python scripts/headline.py)")
    results = run_experiment(cfg, out=Path(args.out))
    print()
    print(format_table(results))
    save(results, Path(args.out))
    print(f"wrote {args.out}/results.json")
    return 0


def _diagnose(args) -> int:
    import json
    from pathlib import Path

    import hf_fastattn
    from hf_fastattn import diagnostics
    from hf_fastattn.loading import read_text, tokenize, windows

    if args.save and args.plan is None:
        raise UsageError("--save saves the planned model: it needs --plan BUDGET")
    if args.text and not os.path.isfile(args.text):
        raise UsageError(f"--text: no such file: {args.text}")
    if args.settings:
        unknown = [s for s in args.settings.split(",") if s not in diagnostics.DEFAULT_SETTINGS]
        if unknown:
            known = ", ".join(diagnostics.DEFAULT_SETTINGS)
            raise UsageError(f"--settings: unknown settings {unknown}; choose from {known}")
    model, tokenizer = load_model_arg("model", args.model, dtype=__import__("torch").float32, device=args.device)
    ids = tokenize(tokenizer, read_text(args.text))
    cut = int(len(ids) * 0.75)  # the last quarter is held out to check the plan
    diag = windows(ids[:cut], args.max_length, args.batch, args.batches)
    settings = diagnostics.DEFAULT_SETTINGS
    if args.settings:
        settings = {s: settings[s] for s in args.settings.split(",")}
    depth = [] if args.no_depth else None
    print(f"diagnosing {args.model}: {len(diag)} batch(es) of {args.batch} x {args.max_length} tokens")
    report = diagnostics.diagnose(model, diag, settings, depth_settings=depth)
    print(report.table())
    out = Path(args.out_dir or f"runs/diagnose-{Path(args.model).name or 'model'}")
    out.mkdir(parents=True, exist_ok=True)
    report.save_json(out / "report.json")
    report.heatmap(out / "heatmap.png")
    print(f"wrote {out / 'report.json'} and {out / 'heatmap.png'}")
    if args.plan is not None:
        plan = diagnostics.plan(report, args.plan, length=args.plan_length)
        print(f"\nplan for budget {args.plan:.1%} (cost at n = {args.plan_length or 'max(8192, n)'}): "
              f"{diagnostics.plan_summary(plan)}")
        held = windows(ids[cut:], args.max_length, args.batch, args.batches)
        realised = diagnostics.evaluate_plan(model, plan, held)
        print("predicted (diagnostic text) vs realised (held-out text) relative output error, approximated heads:")
        print(diagnostics.predicted_vs_realised(report, plan, realised))
        (out / "plan.json").write_text(json.dumps({"plan": plan, "realised": realised}, indent=1))
        if args.save:
            hf_fastattn.configure(model, replace=True, plan=plan)
            model.save_pretrained(args.save)
            if hasattr(tokenizer, "save_pretrained"):
                tokenizer.save_pretrained(args.save)
            print(f"saved the planned model to {args.save} (load it with attn_implementation='fastattn')")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-fastattn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="shortened headline experiment on the embedded model (about a minute)")
    demo.add_argument("--model", default="embedded", help="'embedded' or a model path")
    demo.add_argument("--arms", default="exact,poly,band", help="comma list of exact, poly, band, conv, plan")
    demo.add_argument("--steps", type=at_least(1), default=8, help="fine-tuning steps per arm")
    demo.add_argument("--seq-len", type=int, default=256, help="training length")
    demo.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens per perplexity")
    demo.add_argument("--out", default="runs/demo", help="output directory")
    demo.add_argument("--seed", type=int, default=0, help="random seed")
    demo.set_defaults(func=_demo)

    d = sub.add_parser("diagnose", help="per-layer, per-head error of every method; optional per-head plan")
    d.add_argument("model", nargs="?", default="embedded", help="'embedded', 'tiny:<family>' or a model path")
    d.add_argument("--text", default=None, help="UTF-8 text file (default: the embedded held-out corpus)")
    d.add_argument("--max-length", type=at_least(2), default=512, help="tokens per row")
    d.add_argument("--batch", type=at_least(1), default=1, help="rows per batch")
    d.add_argument("--batches", type=at_least(1), default=2, help="batches to diagnose (and to check the plan on)")
    d.add_argument("--settings", default="", help="comma list of settings to measure (default: all)")
    d.add_argument("--no-depth", action="store_true", help="skip the end-to-end depth sweep")
    d.add_argument("--plan", type=positive, default=None, metavar="BUDGET",
                   help="plan per head within this relative error (a positive number, e.g. 0.1)")
    d.add_argument("--plan-length", type=at_least(1), default=None, help="sequence length the plan's costs are compared at")
    d.add_argument("--save", default=None, help="save the planned model here (needs --plan)")
    d.add_argument("--out-dir", default=None, help="where report.json, heatmap.png and plan.json go")
    d.add_argument("--device", type=device_name, default="cpu", help="cpu or cuda")
    d.set_defaults(func=_diagnose)

    from . import bench

    b = sub.add_parser("bench", help="time and memory of the attention ops vs torch SDPA (JSON + PNG)")
    bench.add_arguments(b)
    b.set_defaults(func=bench.main)

    from . import bench_model

    m = sub.add_parser("bench-model", help="training steps of a whole decoder (random weights), fastattn arms vs SDPA")
    bench_model.add_arguments(m)
    m.set_defaults(func=bench_model.main)
    from . import bench_generate

    g = sub.add_parser("bench-generate", help="decode speed of generate() with a static cache, each arm uncompiled "
                       "and auto-compiled (JSON + PNG)")
    bench_generate.add_arguments(g)
    g.set_defaults(func=bench_generate.main)
    parser.subcommands = {"demo": demo, "diagnose": d, "bench": b, "bench-model": m, "bench-generate": g}
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UsageError as err:
        parser.subcommands[args.command].error(str(err))


if __name__ == "__main__":
    sys.exit(main())
