"""Decode benchmark: generate() with a static cache, each arm uncompiled and auto-compiled in the same run.

Auto-compile is transformers' `CompileConfig` (on a GPU its default is inductor with CUDA graphs,
mode="reduce-overhead"; elsewhere it has to be asked for, which this does). In inference each fastattn call is
one custom op in the compiled graph (`hf_fastattn.backend`, section torch.compile). Rows: ms per decoded token
(a generate() of N new tokens minus one of 1, over N - 1: the prefill cancels), the prefill's ms, the first
compiled call's seconds (tracing and compiling), the graph breaks and graphs dynamo made, and whether the
compiled run's tokens equal the uncompiled run's.

    hf-fastattn bench-generate --model embedded --arms sdpa,exact,poly:local_window=64 --prompt 256 --new-tokens 64

Arms are those of `hf_fastattn.evaluation.parse_arm` (the guard is off, it is a policy, not a cost).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from .cli import at_least, comma_list, device_name
from .bench import DTYPES, _sync, args_config, environment, report_path, save_report
from .bench_model import arm_list
from .evaluation import parse_arm, use_arm


def _timed(fn, device, repeats: int) -> float:
    """Median seconds of `repeats` calls."""
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(args) -> dict:
    """Every arm, uncompiled then compiled; one row each."""
    from torch._dynamo.utils import counters
    from transformers import CompileConfig

    from .cli import load_model_arg

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    model, _ = load_model_arg("--model", args.model, dtype=dtype, device=device)
    model.eval()
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(3, model.config.vocab_size, (args.batch, args.prompt), generator=gen).to(device)
    base = dict(do_sample=False, pad_token_id=0, cache_implementation="static")
    compile_config = CompileConfig(backend=args.compile_backend,
                                   mode=args.compile_mode or ("reduce-overhead" if device.type == "cuda" else "default"))
    compile_config._compile_all_devices = device.type != "cuda"  # transformers auto-compiles on GPUs only

    def generate(n, **kw):
        return model.generate(ids, max_new_tokens=n, min_new_tokens=n, **base, **kw)

    results = []
    for spec in args.arms:
        use_arm(model, parse_arm(spec)[1])
        plain = generate(args.new_tokens, disable_compile=True)
        for compiled in (False, True):
            kw = dict(compile_config=compile_config) if compiled else dict(disable_compile=True)
            row = dict(arm=spec, compiled=compiled)
            if compiled:
                torch._dynamo.reset()
                counters.clear()
                t0 = time.perf_counter()
                out = generate(args.new_tokens, **kw)  # traces and compiles
                _sync(device)
                row["first_call_s"] = time.perf_counter() - t0
                row["tokens_equal_uncompiled"] = bool(torch.equal(out, plain))
            full = _timed(lambda kw=kw: generate(args.new_tokens, **kw), device, args.repeats)
            prefill = _timed(lambda kw=kw: generate(1, **kw), device, args.repeats)
            row.update(decode_ms_per_token=(full - prefill) / (args.new_tokens - 1) * 1e3, prefill_ms=prefill * 1e3,
                       tokens_per_s=args.batch * args.new_tokens / full)
            if compiled:
                row.update(graph_breaks=sum(counters["graph_break"].values()),
                           graphs=counters["stats"]["unique_graphs"])
                torch._dynamo.reset()
            results.append(row)
            if not args.quiet:
                print(_line(row), flush=True)
    config = dict(args_config(args), compile_mode=compile_config.mode)
    return dict(kind="generate", env=environment(device), config=config, results=results)


def _line(r: dict) -> str:
    extra = ""
    if r["compiled"]:
        extra = (f" | first call {r['first_call_s']:.1f} s, {r['graph_breaks']} graph breaks, {r['graphs']} graphs, "
                 f"tokens {'equal' if r['tokens_equal_uncompiled'] else 'DIFFER'}")
    return (f"{r['arm']:<28} {'compiled' if r['compiled'] else 'eager':<9} {r['decode_ms_per_token']:8.2f} ms/token  "
            f"prefill {r['prefill_ms']:8.1f} ms{extra}")


def print_table(report) -> None:
    c = report["config"]
    print(f"\n{report['env']['device']}, {c['model']}, {c['dtype']}, batch {c['batch']}, prompt {c['prompt']}, "
          f"{c['new_tokens']} new tokens, compile {c['compile_backend']}/{c['compile_mode']}")
    for r in report["results"]:
        print(_line(r))


def plot(report, path) -> None:
    """Decode ms per token, one pair of bars (eager, compiled) per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(dict.fromkeys(r["arm"] for r in report["results"]))
    fig, ax = plt.subplots(figsize=(1.6 * len(arms) + 3, 4))
    for k, compiled in enumerate((False, True)):
        ms = [next((r["decode_ms_per_token"] for r in report["results"]
                    if r["arm"] == a and r["compiled"] == compiled), 0) for a in arms]
        ax.bar([i + 0.4 * k for i in range(len(arms))], ms, width=0.4, label="compiled" if compiled else "eager")
    ax.set_xticks([i + 0.2 for i in range(len(arms))], arms, rotation=20, fontsize=8)
    ax.set(ylabel="decode ms / token", title=f"{report['env']['device']}, {report['config']['model']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="embedded", help="embedded, tiny:<family>, a model directory or hub id")
    p.add_argument("--arms", type=arm_list, default=["sdpa", "exact", "poly:local_window=64"],
                   help="comma list of arms (sdpa, exact, poly[:option=value...], conv:...)")
    p.add_argument("--prompt", type=at_least(1), default=256, help="prompt tokens")
    p.add_argument("--new-tokens", type=_new_tokens, default=64, help="tokens generated (>= 2)")
    p.add_argument("--batch", type=at_least(1), default=1, help="prompts per generate()")
    p.add_argument("--device", type=device_name, default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weights and activations")
    p.add_argument("--threads", type=at_least(0), default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--repeats", type=at_least(1), default=3, help="timed runs of each generate (the median)")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (inductor, aot_eager, ...)")
    p.add_argument("--compile-mode", default=None,
                   help="torch.compile mode (default: reduce-overhead on CUDA, as transformers', else default)")
    p.add_argument("--seed", type=int, default=0, help="prompt seed")
    p.add_argument("--out", default="",
                   help="JSON path (default: benchmarks/results/generate-<device>-<dtype>-<date>.json)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG plot")
    p.add_argument("--quiet", action="store_true", help="no line per row while running")


def _new_tokens(text: str) -> int:
    try:
        return at_least(2)(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 2 (the decode time is generate(N) - generate(1)), "
                                         f"got {text!r}") from None


def main(args) -> int:
    path = report_path(args.out, "generate", args.device, args.dtype)
    return save_report(run(args), path, print_table, plot, args.no_plot)
