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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-fastattn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run a model through fastattn and compare with eager attention")
    demo.add_argument("--length", type=int, default=256, help="sequence length of the demo batch")
    demo.add_argument("--seed", type=int, default=0, help="random seed")
    demo.set_defaults(func=_demo)

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
