"""`hf-fastattn` command line: demo, bench, diagnose."""

from __future__ import annotations

import argparse
import sys
import time


def _demo(args) -> int:
    import copy

    import torch

    import hf_fastattn
    from hf_fastattn.testing import model_pair, tiny_config

    torch.manual_seed(args.seed)
    cfg = tiny_config("llama", num_hidden_layers=2)
    eager, fast = model_pair(cfg, seed=args.seed)
    x = torch.randint(3, cfg.vocab_size, (2, args.length))
    with torch.no_grad():
        ref = eager(input_ids=x).logits
    print(f"tiny random Llama ({sum(p.numel() for p in eager.parameters()) / 1e6:.2f}M params), "
          f"B=2, N={args.length}: fastattn vs eager")
    print(f"{'method':<28}{'max |logit diff|':>18}{'time (ms)':>12}")
    for name, options in [("exact", {"method": "exact"})]:
        model = copy.deepcopy(fast)
        hf_fastattn.configure(model, replace=True, **options)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model(input_ids=x).logits
        ms = (time.perf_counter() - t0) * 1e3
        print(f"{name:<28}{(out - ref).abs().max().item():>18.3e}{ms:>12.1f}")
    return 0


def _diagnose(args) -> int:
    import json
    from pathlib import Path

    import hf_fastattn
    from hf_fastattn import diagnostics
    from hf_fastattn.loading import load_model, read_text, tokenize, windows

    model, tokenizer = load_model(args.model, dtype=__import__("torch").float32, device=args.device)
    ids = tokenize(tokenizer, read_text(args.text))
    cut = int(len(ids) * 0.75)  # the last quarter is held out to check the plan
    diag = windows(ids[:cut], args.max_length, args.batch, args.batches)
    settings = diagnostics.DEFAULT_SETTINGS
    if args.settings:
        unknown = [s for s in args.settings.split(",") if s not in settings]
        if unknown:
            raise SystemExit(f"unknown settings {unknown}; choose from {', '.join(settings)}")
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
    demo = sub.add_parser("demo", help="run a model through fastattn and compare with eager attention")
    demo.add_argument("--length", type=int, default=256, help="sequence length of the demo batch")
    demo.add_argument("--seed", type=int, default=0, help="random seed")
    demo.set_defaults(func=_demo)

    d = sub.add_parser("diagnose", help="per-layer, per-head error of every method; optional per-head plan")
    d.add_argument("model", nargs="?", default="embedded", help="'embedded', 'tiny:<family>' or a model path")
    d.add_argument("--text", default=None, help="UTF-8 text file (default: the embedded held-out corpus)")
    d.add_argument("--max-length", type=int, default=512, help="tokens per row")
    d.add_argument("--batch", type=int, default=1, help="rows per batch")
    d.add_argument("--batches", type=int, default=2, help="batches to diagnose (and to check the plan on)")
    d.add_argument("--settings", default="", help="comma list of settings to measure (default: all)")
    d.add_argument("--no-depth", action="store_true", help="skip the end-to-end depth sweep")
    d.add_argument("--plan", type=float, default=None, metavar="BUDGET", help="plan per head within this relative error")
    d.add_argument("--plan-length", type=int, default=None, help="sequence length the plan's costs are compared at")
    d.add_argument("--save", default=None, help="save the planned model here (with --plan)")
    d.add_argument("--out-dir", default=None, help="where report.json, heatmap.png and plan.json go")
    d.add_argument("--device", default="cpu", help="cpu or cuda")
    d.set_defaults(func=_diagnose)

    from . import bench

    b = sub.add_parser("bench", help="time and memory of the attention ops vs torch SDPA (JSON + PNG)")
    bench.add_arguments(b)
    b.set_defaults(func=bench.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
