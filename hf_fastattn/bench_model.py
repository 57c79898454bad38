"""Whole-model benchmark: training steps (forward + backward) or prefills of a Llama-style decoder built from a
config (random weights, no download), transformers' SDPA against fastattn arms in the same run.

What an attention-op benchmark cannot show: the share of a step attention takes beside the projections, MLPs
and loss, and what every layer keeps from its forward to its backward. Rows: step ms, tokens/s, ratio to SDPA,
peak memory above the weights, memory held after the forward (CUDA: the activations of all layers), loss, and
which of our op paths ran (the call counters of `hf_fastattn.ops.stats`). JSON + PNG.

    hf-fastattn bench-model --device cuda --dtype bf16 --layers 4 --heads 16 --head-dim 128 --intermediate 4096 \\
        --lengths 16384,65536,131072 --arms sdpa,poly,poly:poly_save_states=true,band:local_window=128

Arms are those of `hf_fastattn.evaluation.parse_arm` ("sdpa", "exact", "poly:local_window=64", ...; the guard
is off, it is a policy, not a cost of the method).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .cli import at_least, comma_list, device_name
from .bench import (DTYPES, _sync, args_config, check_mode, checkpoint_to, compare, environment, peak_memory,
                    report_path, save_report, split_specs, time_step, timed_row)
from .evaluation import parse_arm, use_arm
from .loading import enable_checkpointing
from .ops import stats


def build_model(args, device, dtype):
    """A LlamaForCausalLM of the requested shape with seeded random weights, in training mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden = args.hidden or args.heads * args.head_dim
    cfg = LlamaConfig(
        vocab_size=args.vocab, hidden_size=hidden, intermediate_size=args.intermediate or 4 * hidden,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads or args.heads, head_dim=args.head_dim,
        max_position_embeddings=max(args.lengths), attention_dropout=0.0, tie_word_embeddings=False,
    )
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(cfg).to(device=device, dtype=dtype)
    if args.gradient_checkpointing:
        enable_checkpointing(model)
    return model.train()


def _step_fn(model, ids, mode, seen):
    """One step as a closure for `time_step`; it records in `seen` the loss and (CUDA) the bytes allocated
    after the forward, beyond those before it: what the layers keep for the backward, and the calls made."""
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        seen["calls"] = seen.get("calls", 0) + 1
        if mode == "fwd":  # no KV cache in either mode: the steps time the computation
            with torch.no_grad():  # a prefill: only the last position's logits
                return model(input_ids=ids, logits_to_keep=1, use_cache=False).logits
        before = torch.cuda.memory_allocated() if ids.is_cuda else 0
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        if ids.is_cuda:
            seen["held"] = max(seen.get("held", 0), torch.cuda.memory_allocated() - before)
        loss.backward()
        for p in params:
            p.grad = None
        seen["loss"] = loss.item()
        return loss.detach()

    return step


def run(args, checkpoint=None) -> dict:
    """Training (or forward) steps of one model per length and arm; `checkpoint(report so far)` after each row."""
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    for mode in args.modes:  # parsed lists from the command line are checked already; run() may get others
        check_mode(mode)
    arms = [parse_arm(spec) for spec in args.arms]  # bad specs fail before any model is built
    model = build_model(args, device, dtype)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    from tqdm import tqdm

    results, skip = [], set()
    bar = tqdm(total=len(args.lengths) * len(arms) * len(args.modes), desc="bench-model", disable=args.quiet)
    for n in args.lengths:
        ids = torch.randint(0, args.vocab, (args.batch, n), generator=torch.Generator().manual_seed(n)).to(device)
        # one untimed SDPA step per length first: the allocator's growth to this length's buffers (and page
        # faults on CPU) would otherwise be charged to whichever arm runs first (measured: ~1.3x on 2 CPU cores)
        use_arm(model, None)
        try:
            _step_fn(model, ids, args.modes[0], {})()
        except Exception:  # e.g. out of memory: the sdpa arm's own row records it
            model.zero_grad(set_to_none=True)
        for label, options in arms:
            use_arm(model, options)
            for mode in args.modes:
                bar.update(1)
                seen = {}
                stats.reset()
                step = _step_fn(model, ids, mode, seen)
                row = timed_row(dict(arm=label, mode=mode, n=n), skip, args, device,
                                lambda: time_step(step, device, args.repeats, args.warmup))
                results.append(row)
                if "ms" in row:
                    row.update(tokens_per_s=args.batch * n / row["ms"] * 1e3,  # COUNTS: every call of the step
                               ops={k: v / seen["calls"] for k, v in sorted(stats.COUNTS.items())})
                    if "held" in seen:
                        row["held_mb"] = seen["held"] / 2**20
                    if "loss" in seen:
                        row["loss"] = seen["loss"]
                    bar.set_postfix_str(f"{label} {mode} n={n}: {row['ms']:.0f} ms")
                else:
                    model.zero_grad(set_to_none=True)  # a failed step may leave gradients behind
                if checkpoint:
                    checkpoint(_report(args, device, model, weights, results))
        del ids
        _sync(device)
    bar.close()
    return _report(args, device, model, weights, results)


def _report(args, device, model, weights, results) -> dict:
    config = args_config(args)
    config.update(hidden=model.config.hidden_size, intermediate=model.config.intermediate_size,
                  weights_mb=weights / 2**20)
    return {"env": environment(device), "config": config, "peak_memory": peak_memory(device), "results": results,
            "exponents": compare(results, "arm", 3)}


def print_table(report) -> None:
    env = report["env"]
    print(f"\n{env['device']} ({env['device_type']}), {report['config']['layers']} layers, "
          f"hidden {report['config']['hidden']}, {report['config']['weights_mb']:.0f} MiB of weights")
    w = max([12] + [len(r["arm"]) + 2 for r in report["results"]])
    print(f"{'arm':<{w}}{'mode':<8}{'n':>8}{'ms':>11}{'tok/s':>10}{'x sdpa':>8}{'peak MiB':>10}{'held MiB':>10}"
          "  ops per step")
    for r in report["results"]:
        if "ms" not in r:
            print(f"{r['arm']:<{w}}{r['mode']:<8}{r['n']:>8}  {r.get('skipped') or r.get('error')}")
            continue
        ratio = f"{r['speedup_vs_sdpa']:.2f}" if "speedup_vs_sdpa" in r else "-"
        held = f"{r['held_mb']:.0f}" if "held_mb" in r else "-"
        ops = ", ".join(f"{k} {v:g}" for k, v in r["ops"].items()) or "-"
        print(f"{r['arm']:<{w}}{r['mode']:<8}{r['n']:>8}{r['ms']:>11.1f}{r['tokens_per_s']:>10.0f}{ratio:>8}"
              f"{r['peak_mb']:>10.0f}{held:>10}  {ops}")
    print("scaling exponents (longest 3 lengths):",
          {a: {m: round(e, 2) for m, e in v.items()} for a, v in report["exponents"].items()})


def plot(report, path: Path) -> None:
    """Step time and memory against length, one line per arm and mode (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["results"] if "ms" in r]
    panels = [("ms", "step time (ms)"), ("peak_mb", "peak memory above weights (MiB)")]
    if any("held_mb" in r for r in rows):
        panels.append(("held_mb", "held after the forward (MiB)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels) + 2.5, 4.2))
    colors = {arm: f"C{i % 10}" for i, arm in enumerate(dict.fromkeys(r["arm"] for r in rows))}
    for ax, (key, title) in zip(axes, panels):
        for arm, mode in dict.fromkeys((r["arm"], r["mode"]) for r in rows):
            # zeros (a CPU peak under the resident-set resolution) have no place on a log axis
            pts = [(r["n"], r[key]) for r in rows if r["arm"] == arm and r["mode"] == mode and r.get(key, 0) > 0]
            if pts:
                ax.plot(*zip(*pts), marker="o", color=colors[arm], ls="-" if mode == "fwdbwd" else "--",
                        label=f"{arm} {mode}")
        ax.set(xscale="log", yscale="log", xlabel="tokens", title=title)
        ax.grid(True, which="both", alpha=0.3)
    axes[-1].legend(*axes[0].get_legend_handles_labels(), fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    c = report["config"]
    fig.suptitle(f"{report['env']['device']}, {c['dtype']}, {c['layers']} layers, H = {c['heads']}, "
                 f"D = {c['head_dim']}, batch {c['batch']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _arm(spec: str) -> str:
    try:
        parse_arm(spec)  # raises ValueError naming the bad option
    except OSError as err:  # plan:<file> that is not there
        raise ValueError(f"arm {spec!r}: {err}") from None
    return spec


def arm_list(text: str) -> list:
    """An argparse type: a comma list of arms, where an item `option=value` without a method continues the arm
    before it ("poly:local_window=64,poly_decode_state=false,sdpa" is two arms); a bad arm is a usage error."""
    try:
        return [_arm(spec) for spec in split_specs(text)]
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arms", type=arm_list, default=["sdpa", "exact", "poly", "band:local_window=64"],
                   help="comma list of arms (sdpa, exact, poly[:option=value...], band:..., conv:...)")
    p.add_argument("--lengths", type=comma_list(at_least(1)), default=[1024, 2048, 4096],
                   help="comma list of sequence lengths")
    p.add_argument("--modes", type=comma_list(check_mode), default=["fwdbwd"],
                   help="fwdbwd (a training step) and/or fwd (a no-grad prefill)")
    p.add_argument("--layers", type=int, default=4, help="decoder layers")
    p.add_argument("--heads", type=at_least(1), default=4, help="query heads")
    p.add_argument("--kv-heads", type=int, default=None, help="K/V heads (default: --heads)")
    p.add_argument("--head-dim", type=at_least(1), default=64, help="head dimension D")
    p.add_argument("--hidden", type=int, default=None, help="hidden size (default: heads x head dim)")
    p.add_argument("--intermediate", type=int, default=None, help="MLP width (default: 4 x hidden)")
    p.add_argument("--vocab", type=int, default=256, help="vocabulary (small: the loss should not dominate)")
    p.add_argument("--batch", type=at_least(1), default=1, help="sequences per step")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute layers in the backward")
    p.add_argument("--device", type=device_name, default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weights and activations")
    p.add_argument("--threads", type=at_least(0), default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--repeats", type=at_least(1), default=3, help="timed steps (the median is reported)")
    p.add_argument("--warmup", type=at_least(0), default=1, help="untimed steps first (compiles the kernels)")
    p.add_argument("--max-seconds", type=float, default=120.0, help="skip longer lengths of an arm slower than this")
    p.add_argument("--seed", type=int, default=0, help="weight seed")
    p.add_argument("--out", default="",
                   help="JSON path (default: benchmarks/results/model-<device>-<dtype>-<date>.json)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG plot")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def main(args) -> int:
    path = report_path(args.out, "model", args.device, args.dtype)
    return save_report(run(args, checkpoint_to(path)), path, print_table, plot, args.no_plot)
