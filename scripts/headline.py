#!/usr/bin/env python
"""The headline experiment on the embedded model (CPU, about 15 minutes): exact, poly (band W + polynomial
far part), band only, conv and a per-head plan, each fine-tuned with the same steps and batches, measured
before and after on held-out perplexity (training length and 4x), the far copy probe and passkey retrieval.

    python scripts/headline.py                       # writes runs/headline/results.{json,md}
    python scripts/headline.py --steps 200 --window 32 --arms exact,poly,band
"""

import argparse
import sys
from dataclasses import fields
from pathlib import Path

from hf_fastattn.experiment import ExperimentConfig, check_config, format_table, run_experiment, save


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = ExperimentConfig()
    helps = {"model": "'embedded' or a model path", "window": "exact band W of poly = width of the band baseline",
             "arms": "comma list of exact, poly, band, conv, plan", "steps": "fine-tuning steps per arm",
             "seq_len": "training length", "batch_size": "rows per step", "lr": "peak learning rate",
             "copy_fraction": "share of fine-tuning rows with a repeated passage", "eval_tokens": "tokens per perplexity",
             "long_factor": "the long evaluation length is this times seq_len", "passkey_trials": "trials per depth",
             "passkey_depths": "comma list of needle depths", "conv_k": "conv bases",
             "plan_budget": "error budget of the plan arm", "seed": "seed", "threads": "torch threads (0: default)"}
    for f in fields(ExperimentConfig):
        value = getattr(defaults, f.name)
        kind = str if isinstance(value, (list, tuple)) else type(value)
        shown = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value
        p.add_argument("--" + f.name.replace("_", "-"), type=kind, default=shown, help=f"{helps[f.name]} (default {shown})")
    p.add_argument("--out", default="runs/headline", help="output directory")
    args = p.parse_args(argv)
    cfg = ExperimentConfig(**{f.name: getattr(args, f.name) for f in fields(ExperimentConfig)})
    cfg.arms = cfg.arms.split(",") if isinstance(cfg.arms, str) else cfg.arms
    if isinstance(cfg.passkey_depths, str):
        cfg.passkey_depths = tuple(float(x) for x in cfg.passkey_depths.split(","))
    try:
        check_config(cfg)  # bad arms or a too short --seq-len before any work
    except ValueError as err:
        p.error(str(err))
    results = run_experiment(cfg, out=Path(args.out))
    print()
    print(format_table(results))
    save(results, Path(args.out))
    print(f"wrote {args.out}/results.json and results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
