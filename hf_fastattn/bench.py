"""Attention benchmark: our ops against torch SDPA in the same run.

For each method and sequence length: forward (no grad) and forward+backward wall time, peak memory (CUDA
allocator's peak, or on CPU the peak of live tensor bytes seen by torch's profiler), the ratio to SDPA, our
own FLOP count and achieved TFLOP/s, and the scaling exponent fitted over the longest lengths. Results
go to JSON (with device, versions and date) and a PNG plot. Used by `hf-fastattn bench` and
`scripts/bench_attention.py`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import re
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .cli import at_least, comma_list, device_name, even_degree
from .config import CONV_PLACEMENTS, OP_NAMES

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TRITON_KNOBS = {"tile", "seg", "rows", "save"}  # poly spec keys that call the Triton kernels' schedule directly


def segmented_terms(n: int, d: int, r: int, chunk: int, band: int, segment: int) -> tuple[float, float]:
    """Cost model of the segmented Triton schedule, per head: (FLOPs of one [r, N] x [N, D] state product, built
    or read out, mean keys per query computed directly: half a segment, the band's chunks and half a chunk)."""
    lag = math.ceil(band / chunk) if band else 0
    return 2.0 * r * d * n, min(n / 2, segment / 2 + lag * chunk + chunk / 2)


# ------------------------------------------------------------------------------------------ methods
# what each method spec may override after its colon (poly:band=64,chunk=128): int, or the allowed words
SPEC_KEYS = {
    "sdpa": {}, "flash": {}, "exact": {},
    "poly": {"degree": int, "band": int, "chunk": int, "kernel": ("auto", "torch", "triton"),
             **{k: int for k in sorted(TRITON_KNOBS)}},
    "conv": {"k": int, "placement": CONV_PLACEMENTS},
}
SPEC_MIN = {"degree": 2, "chunk": 1, "k": 1}  # the smallest value of an integer option (others: 0)
MODES = ("fwd", "fwdbwd")


def parse_spec(name: str) -> tuple[str, dict]:
    """'poly:band=64,chunk=128' -> ('poly', {'band': '64', 'chunk': '128'}); unknown methods, keys, keys
    without a value and values of the wrong type raise, naming what is allowed."""
    base, _, opt = name.partition(":")
    if base not in SPEC_KEYS:
        raise ValueError(f"unknown method {base!r} in {name!r}; choose from {', '.join(SPEC_KEYS)} "
                         "(poly:degree=,band=,chunk=,kernel=; conv:k=,placement=)")
    allowed, extra = SPEC_KEYS[base], {}
    for item in filter(None, opt.split(",")):
        key, eq, value = item.partition("=")
        if key not in allowed:
            keys = ", ".join(allowed) or "none"
            hint = f" ({key} is the config's name; the op's is {OP_NAMES[key]}=)" if OP_NAMES.get(key) in allowed else ""
            raise ValueError(f"method {name!r}: unknown option {key!r}{hint}; {base} takes {keys}")
        if not eq or not value:
            raise ValueError(f"method {name!r}: option {key!r} needs a value ({key}=...)")
        kind = allowed[key]
        if kind is int and not re.fullmatch(r"-?\d+", value):
            raise ValueError(f"method {name!r}: {key}={value!r} must be an integer")
        if kind is int and int(value) < SPEC_MIN.get(key, 0):
            raise ValueError(f"method {name!r}: {key}={value!r} must be >= {SPEC_MIN.get(key, 0)}")
        if key == "degree" and int(value) % 2:
            raise ValueError(f"method {name!r}: degree={value!r} must be even (the polynomial method's degree)")
        if kind is not int and value not in kind:
            raise ValueError(f"method {name!r}: {key}={value!r}; choose from {', '.join(kind)}")
        extra[key] = value
    return base, extra


def split_specs(text: str) -> list[str]:
    """A comma list of method specs where an item `option=value` without a method continues the spec before it:
    "sdpa,poly:chunk=64,kernel=triton" is two. ("+" between specs, the older form, is still read.)"""
    if "+" in text:
        return text.split("+")
    specs: list[str] = []
    for item in text.split(","):
        if specs and "=" in item and ":" not in item:
            specs[-1] += "," + item
        else:
            specs.append(item)
    return specs


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: choose from {', '.join(MODES)}")
    return mode


def check_args(args) -> tuple[list[int], list[str], list[str]]:
    """(lengths, methods, modes) from the string options, every one checked before anything is timed (a bad
    spec must not surface after an hour of measuring); a method that cannot run here (flash-attn missing)
    is refused too."""
    try:
        lengths, modes = comma_list(at_least(1))(args.lengths), comma_list(check_mode)(args.modes)
    except argparse.ArgumentTypeError as err:
        raise ValueError(f"--lengths {args.lengths!r} / --modes {args.modes!r}: {err}") from None
    methods = split_specs(args.methods)
    for m in methods:
        _method_fn(m, args)
        triton = parse_spec(m)[1].get("kernel", args.kernel if m.startswith("poly") else "") == "triton"
        if triton and not str(args.device).startswith("cuda") and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"method {m!r}: kernel=triton needs --device cuda (or TRITON_INTERPRET=1 on CPU)")
    return lengths, methods, modes


def _method_fn(name: str, args):
    """fn(q, k, v) -> out for a method spec: sdpa, flash, exact, poly, conv (conv:k=16 style overrides)."""
    base, extra = parse_spec(name)
    scale = args.head_dim**-0.5
    if base == "sdpa":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                              enable_gqa=q.shape[1] != k.shape[1])
    if base == "flash":
        try:
            from flash_attn import flash_attn_func  # optional; GPU only
        except ImportError:
            raise ValueError("method 'flash' needs the flash-attn package (pip install flash-attn, CUDA only); "
                             "drop it from --methods") from None

        return lambda q, k, v: flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               causal=True, softmax_scale=scale).transpose(1, 2)
    if base == "exact":
        from .ops.exact import exact_attention

        return lambda q, k, v: exact_attention(q, k, v, scale)
    if base == "poly":
        from .ops.poly import poly_attention

        degree = int(extra.get("degree", args.degree))
        band = int(extra.get("band", args.band))
        chunk = int(extra.get("chunk", args.chunk))
        kernel = extra.get("kernel", args.kernel)
        if TRITON_KNOBS & extra.keys():  # the Triton kernels' schedule knobs, for the benchmark only
            from .ops.poly.features import poly_coefficients
            from .ops.poly.triton import BA, poly_triton_attention

            c, tile, rows = poly_coefficients(degree), int(extra.get("tile", BA)), extra.get("rows")
            seg = int(extra["seg"]) if "seg" in extra else "auto"
            save = bool(int(extra.get("save", 0)))
            return lambda q, k, v: poly_triton_attention(q, k, v, scale, c, band, chunk, tile=tile, segment=seg,
                                                         rows_per_block=rows and int(rows), save_states=save)
        return lambda q, k, v: poly_attention(q, k, v, scale, degree=degree, band=band, chunk=chunk, kernel=kernel)
    if base == "conv":
        from .ops.conv import conv_attention

        kb = int(extra.get("k", args.conv_k))
        placement = extra.get("placement", "even")
        return lambda q, k, v: conv_attention(q, k, v, scale, k_bases=kb, placement=placement)


def flop_count(name: str, b: int, h: int, hkv: int, n: int, d: int, mode: str, args) -> float:
    """Our own FLOP count (matmuls only). Causal softmax attention: 4 B H N^2 D / 2 forward, x3.5 fwd+bwd."""
    base, extra = parse_spec(name)
    mult = 1.0 if mode == "fwd" else 3.5
    if base in ("sdpa", "flash", "exact"):
        return mult * 2.0 * b * h * n * n * d
    if base == "poly":
        from .ops.poly import _TRITON_CHUNK, auto_uses_triton
        from .ops.poly.features import FeatureMap

        degree = int(extra.get("degree", args.degree))
        chunk = int(extra.get("chunk", args.chunk))
        band = int(extra.get("band", args.band))
        r, g = FeatureMap.get(d, degree).r, h // hkv
        kernel = extra.get("kernel", args.kernel)
        auto = kernel == "auto" and auto_uses_triton(args.device.startswith("cuda"), degree, d, DTYPES[args.dtype])
        if TRITON_KNOBS & extra.keys() or kernel == "triton" or auto:
            # segmented schedule: states at segment boundaries, the rest of the window direct
            from .ops.poly.triton import BA, auto_segment, state_budget

            tc = _TRITON_CHUNK if auto else chunk  # "auto" runs the kernels at their own chunk size
            if "seg" in extra:
                seg = int(extra["seg"])
            else:
                item = 4 if args.dtype == "fp32" else 2
                seg = auto_segment(b, hkv, n, d, d, tc, int(extra.get("tile", BA)), item, state_budget(args.device))
            state, window = segmented_terms(n, d, r, tc, band, seg)
            fwd = b * (hkv + h) * state + b * h * n * window * 4 * d
            # the backward reruns the key sweep unless the states were saved (counted: it is work that runs, as
            # FlashAttention's backward count includes its recomputed logits)
            sweeps = 2 if int(extra.get("save", 0)) else 3
            bwd = b * (sweeps * hkv + 2 * h) * state + b * h * n * window * 10 * d
            return fwd if mode == "fwd" else fwd + bwd
        lag = math.ceil(band / chunk) if band else 0
        chunks = n / chunk
        state = 2.0 * r * (d + 1) * chunk  # one [r, C] x [C, D+1] product
        direct = 2.0 * g * chunk * (lag + 1) * chunk * d  # one [G C, K] x [K, D] product
        fwd = chunks * ((1 + g) * state + 2 * direct)
        bwd = chunks * ((3 + 2 * g) * state + 5 * direct)
        return b * hkv * (fwd if mode == "fwd" else fwd + bwd)
    if base == "conv":
        kb = int(extra.get("k", args.conv_k))
        fft = 5.0 * 2 * n * math.log2(2 * n)  # one real FFT of length 2N ~ 2.5 * 2N log2(2N), fwd + inverse
        fwd = b * h * kb * ((d + 1) * fft + 2 * n * d)  # k bases x (D + 1) channels + score columns
        return fwd * mult
    return float("nan")


# ---------------------------------------------------------------------------------------- measuring
@contextlib.contextmanager
def _quiet_stderr():
    """File descriptor 2 to /dev/null: some torch builds' profiler prints two lines to it at every start and stop."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


@contextlib.contextmanager
def cpu_peak():
    """Yields a dict whose "bytes", after the block, is the peak of CPU tensor bytes alive at once during it above
    those alive at its start. Torch's profiler sees every allocation and free of the CPU allocator; the process's
    peak RSS does not (pages the allocator frees and reuses are counted once, by whichever run touched them
    first: rows of 0 MiB, and peaks that fell with N)."""
    from torch.profiler import ProfilerActivity, profile

    prof, result = profile(activities=[ProfilerActivity.CPU], profile_memory=True), {}
    with _quiet_stderr():
        prof.start()
    try:
        yield result
    finally:
        with _quiet_stderr():
            prof.stop()
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        live = peak = 0
        for e in sorted(events, key=lambda e: e.start_ns()):  # stable: an alloc and free in one ns keep their order
            live += e.nbytes()
            peak = max(peak, live)
        result["bytes"] = peak


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed_run(step, device) -> tuple[float, bool]:
    _sync(device)
    t0 = time.perf_counter()
    out = step()
    _sync(device)
    return time.perf_counter() - t0, bool(torch.isfinite(out).all())


def time_step(step, device, repeats, warmup, budget=None, warm=False):
    """(median seconds, peak MiB above what was allocated before, finite?, runs timed) of `step()`, which returns
    a tensor to check for non-finite values. The peak is the CUDA allocator's over the timed runs, or on CPU that
    of one run under the profiler (`cpu_peak`): the first warm-up run, or an extra untimed run without one.

    budget: seconds; the timed runs stop once they add up to more (at least one runs). With `warm` (the step's
    kernels already ran at a shorter length: compiled, autotuned), a warm-up run longer than `budget` is kept as
    the one timed run: SDPA at 1M tokens takes 30 s a run, and the allocator's growth is a negligible part of it.
    """
    cuda = device.type == "cuda"

    def start():
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated()
        return 0

    peak = [0]

    def warm_up(first):
        if cuda or not first:
            return _timed_run(step, device)
        with cpu_peak() as mem:
            result = _timed_run(step, device)
        peak[0] = mem["bytes"]
        return result

    before = start()
    times, finite = [], True
    for i in range(warmup if cuda else max(warmup, 1)):
        sec, fin = warm_up(i == 0)
        if warm and budget is not None and sec > budget:
            times, finite = [sec], fin
            break
    if not times:
        before = start()
        for _ in range(repeats):
            sec, fin = _timed_run(step, device)
            times.append(sec)
            finite = finite and fin
            if budget is not None and sum(times) > budget:
                break
    if cuda:
        peak[0] = torch.cuda.max_memory_allocated() - before
    times.sort()
    return times[len(times) // 2], max(peak[0], 0) / 2**20, finite, len(times)


def measure(fn, q, k, v, mode, repeats, warmup, budget=None, warm=False):
    """(median seconds, peak MiB above the inputs, finite?, runs timed); budget and warm as for `time_step`."""
    leaves = [t.detach().requires_grad_(mode == "fwdbwd") for t in (q, k, v)]
    do = torch.randn_like(q)

    def once():
        if mode == "fwd":
            with torch.no_grad():
                return fn(*leaves)
        out = fn(*leaves)
        out.backward(do)
        for t in leaves:
            t.grad = None
        return out.detach()

    return time_step(once, q.device, repeats, warmup, budget, warm)


def timed_row(row: dict, skip: set, args, device, timed) -> dict:
    """`row` (keys: a label, "mode", "n") with ms, peak_mb, finite, runs from `timed()` -> `time_step`'s tuple.
    A (label, mode) in `skip` is not run again; an error (out of memory, a kernel that does not compile for the
    shape) is recorded in the row and skips the label's longer lengths, as does a time over --max-seconds."""
    key = tuple(v for k, v in row.items() if k != "n")  # (label, mode)
    if key in skip:
        return dict(row, skipped=f"slower than --max-seconds {args.max_seconds} at a shorter length")
    try:
        sec, peak, finite, runs = timed()
    except Exception as err:
        skip.add(key)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return dict(row, error=f"{type(err).__name__}: {str(err)[:200]}")
    if sec > args.max_seconds:
        skip.add(key)
    return dict(row, ms=sec * 1e3, peak_mb=peak, finite=finite, runs=runs)


def compare(results: list, label: str, fit_points: int) -> dict:
    """Adds speedup_vs_sdpa to every timed row (the rows whose `label` is "sdpa" at the same mode and length are
    the reference) and returns the scaling exponents {label: {mode: slope}} over each one's longest lengths."""
    sdpa = {(r["mode"], r["n"]): r["ms"] for r in results if r[label] == "sdpa" and "ms" in r}
    for r in results:
        if "ms" in r and (r["mode"], r["n"]) in sdpa:
            r["speedup_vs_sdpa"] = sdpa[(r["mode"], r["n"])] / r["ms"]
    exponents = {}
    for name, mode in dict.fromkeys((r[label], r["mode"]) for r in results):
        pts = [(r["n"], r["ms"]) for r in results if r[label] == name and r["mode"] == mode and "ms" in r]
        if len(pts[-fit_points:]) >= 2:
            exponents.setdefault(name, {})[mode] = scaling_exponent(*zip(*pts[-fit_points:]))
    return exponents


def report_path(out: str, kind: str, device: str, dtype: str) -> Path:
    """--out, or benchmarks/results/<kind>-<device type>-<dtype>-<date>.json."""
    if out:
        return Path(out)
    date = datetime.date.today().isoformat()
    return Path("benchmarks/results") / f"{kind}-{torch.device(device).type}-{dtype}-{date}.json"


def write_json(report: dict, path: Path) -> None:
    """Write the report whole or not at all (a run killed mid-write keeps the previous checkpoint)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(path)


def checkpoint_to(path: Path):
    """A `run(..., checkpoint=)` callback writing the report so far to `path` after every row, marked partial: a
    run cut off by a time limit (a GPU session's device call) still leaves every row it finished."""

    def write(report):
        last = report["results"][-1]
        label = last.get("method") or last.get("arm")
        write_json(dict(report, partial=f"rows through {label} {last['mode']} at n={last['n']}"), path)

    return write


def save_report(report: dict, path: Path, print_table, plot, no_plot: bool) -> int:
    """Print the table, write the JSON to `path` (`report_path`) and, unless no_plot, the PNG beside it."""
    print_table(report)
    write_json(report, path)
    print(f"wrote {path}")
    if not no_plot:
        plot(report, path.with_suffix(".png"))
        print(f"wrote {path.with_suffix('.png')}")
    return 0


def scaling_exponent(ns, ts) -> float:
    """Least-squares slope of log t vs log n over the given points (nan without two distinct lengths)."""
    if len(set(ns)) < 2:
        return float("nan")
    xs, ys = [math.log(n) for n in ns], [math.log(t) for t in ts]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def _cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what platform knows ("x86_64" tells machines apart badly)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def args_config(args) -> dict:
    """A report's `config`: every option of the command line that ran (not where it wrote), so that it can be rerun."""
    return {k: v for k, v in vars(args).items() if k not in ("func", "out", "quiet", "no_plot", "command")}


def peak_memory(device) -> str:
    """What a report's peak_mb is (`time_step`); reports before 2026-12-07 took the CPU's from the peak RSS."""
    return "CUDA allocator peak" if device.type == "cuda" else "CPU tensor bytes alive (torch profiler)"


def environment(device) -> dict:
    import transformers

    from . import __version__

    env = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": shlex.join(sys.argv),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "device_type": device.type,
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "hf_fastattn": __version__,
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    return env


# ----------------------------------------------------------------------------------------------- run
def run(args, checkpoint=None) -> dict:
    """The attention benchmark; `checkpoint(report so far)` after each row, if given."""
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    lengths, methods, modes = check_args(args)
    results, skip, ran = [], set(), set()
    b, h, hkv, d = args.batch, args.heads, args.kv_heads or args.heads, args.head_dim
    from tqdm import tqdm

    bar = tqdm(total=len(lengths) * len(methods) * len(modes), desc="bench", disable=args.quiet)
    for n in lengths:
        # drawn where they are used: on a GPU at 1M tokens, D = 128, CPU draws took ~10 s a tensor
        gen = torch.Generator(device=device).manual_seed(n)
        q = (torch.randn(b, h, n, d, generator=gen, device=device) * d**-0.25).to(dtype)
        k = (torch.randn(b, hkv, n, d, generator=gen, device=device) * d**-0.25).to(dtype)
        v = torch.randn(b, hkv, n, d, generator=gen, device=device).to(dtype)
        for method in methods:
            fn = _method_fn(method, args)
            for mode in modes:
                bar.update(1)
                timing = (args.repeats, args.warmup, args.repeat_seconds, (method, mode) in ran)
                row = timed_row(dict(method=method, mode=mode, n=n), skip, args, device,
                                lambda: measure(fn, q, k, v, mode, *timing))
                results.append(row)
                if "ms" in row:
                    ran.add((method, mode))
                    flops = flop_count(method, b, h, hkv, n, d, mode, args)
                    row.update(flops=flops, tflops=flops / row["ms"] / 1e9)
                    bar.set_postfix_str(f"{method} {mode} n={n}: {row['ms']:.0f} ms")
                if checkpoint:
                    checkpoint(_report(args, device, results))
        del q, k, v
    bar.close()
    return _report(args, device, results)


def _report(args, device, results) -> dict:
    config = args_config(args)
    exponents = compare(results, "method", args.fit_points)
    return {"env": environment(device), "config": config, "peak_memory": peak_memory(device), "results": results,
            "exponents": exponents}


def print_table(report) -> None:
    rows = [r for r in report["results"] if "ms" in r]
    print(f"\n{report['env']['device']} ({report['env']['device_type']}, {report['env']['cpu_threads']} threads), "
          f"config {report['config']}")
    w = max([22] + [len(r["method"]) + 2 for r in report["results"]])  # method specs can be long
    print(f"{'method':<{w}}{'mode':<8}{'n':>8}{'ms':>11}{'x sdpa':>8}{'peak MiB':>10}{'TFLOP/s':>9}")
    for r in rows:
        ratio = f"{r['speedup_vs_sdpa']:.2f}" if "speedup_vs_sdpa" in r else "-"
        print(f"{r['method']:<{w}}{r['mode']:<8}{r['n']:>8}{r['ms']:>11.1f}{ratio:>8}{r['peak_mb']:>10.0f}"
              f"{r['tflops']:>9.3f}")
    for r in report["results"]:
        if "ms" not in r:
            print(f"{r['method']:<{w}}{r['mode']:<8}{r['n']:>8}  {r.get('skipped') or r.get('error')}")
    print("scaling exponents (fit over the longest lengths):",
          json.dumps({m: {k: round(v, 3) for k, v in e.items()} for m, e in report["exponents"].items()}))


def plot(report, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    series = {}
    for r in report["results"]:
        if "ms" in r:
            series.setdefault((r["method"], r["mode"]), []).append(r)
    for (method, mode), rows in series.items():
        ns = [r["n"] for r in rows]
        style = "-" if mode == "fwdbwd" else "--"
        axes[0].loglog(ns, [r["ms"] for r in rows], style, marker="o", label=f"{method} {mode}")
        axes[1].loglog(ns, [max(r["peak_mb"], 1e-1) for r in rows], style, marker="o", label=f"{method} {mode}")
    axes[0].set(xlabel="sequence length N", ylabel="time (ms)", title="time (dashed: forward, solid: fwd+bwd)")
    axes[1].set(xlabel="sequence length N", ylabel="peak memory (MiB)", title="peak memory above inputs")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    env = report["env"]
    fig.suptitle(f"hf_fastattn vs SDPA on {env['device']} — {report['config']['dtype']}, B={report['config']['batch']}, "
                 f"H={report['config']['heads']}, D={report['config']['head_dim']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--methods", default="sdpa,exact,poly",
                   help="comma list; an option=value item continues the spec before it (sdpa,poly:chunk=64,kernel=triton is "
                   "two): sdpa, flash, exact, "
                   "poly[:degree=2,band=0,chunk=128,kernel=torch|triton,tile=8|16,seg=,rows=,save=0|1], "
                   "conv[:k=16,placement=even]")
    p.add_argument("--lengths", default="1024,2048,4096,8192,16384", help="comma list of sequence lengths")
    p.add_argument("--modes", default="fwd,fwdbwd", help="fwd and/or fwdbwd")
    p.add_argument("--batch", type=at_least(1), default=1, help="batch size B")
    p.add_argument("--heads", type=at_least(1), default=4, help="query heads H")
    p.add_argument("--kv-heads", type=at_least(0), default=0, help="key/value heads (0: same as --heads)")
    p.add_argument("--head-dim", type=at_least(1), default=64, help="head dimension D")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="input dtype")
    p.add_argument("--device", type=device_name, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda")
    p.add_argument("--threads", type=at_least(0), default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--degree", type=even_degree, default=2, help="poly degree")
    p.add_argument("--band", type=at_least(0), default=0, help="poly exact band W")
    p.add_argument("--chunk", type=at_least(1), default=128, help="poly chunk size")
    p.add_argument("--kernel", default="auto", choices=["auto", "torch", "triton"], help="poly kernel")
    p.add_argument("--conv-k", type=at_least(1), default=16, help="conv bases k")
    p.add_argument("--repeats", type=at_least(1), default=3, help="timed repeats (median reported)")
    p.add_argument("--warmup", type=at_least(0), default=1, help="untimed warm-up runs")
    p.add_argument("--repeat-seconds", type=float, default=None,
                   help="stop the timed repeats once they add up to this many seconds; a warm-up run that long, at a "
                   "length after the method's first, is kept as the one timed run (a GPU session's time budget)")
    p.add_argument("--max-seconds", type=float, default=120.0, help="stop growing N for a method once one run takes longer")
    p.add_argument("--fit-points", type=int, default=3, help="longest lengths used for the scaling exponent")
    p.add_argument("--out", default="", help="JSON path (default benchmarks/results/attention-<device>-<date>.json)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG plot")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def main(args) -> int:
    try:
        check_args(args)
    except ValueError as err:
        raise SystemExit(f"hf-fastattn bench: {err}") from None
    path = report_path(args.out, "attention", args.device, args.dtype)
    return save_report(run(args, checkpoint_to(path)), path, print_table, plot, args.no_plot)
