"""One poly decode call against a cache of N keys: the kept prefix state (`ops/poly/recurrent.py`) vs the direct
form, per call and for the state's first build, with the two outputs' relative difference (float32 rounding of
the state). Writes JSON under benchmarks/results/.

    python scripts/bench_poly_decode.py --lengths 4096,16384,65536 --threads 2
    python scripts/bench_poly_decode.py --device cuda --dtype bf16 --lengths 16384,131072,1048576
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from hf_fastattn.cli import at_least, comma_list, device_name, even_degree
from hf_fastattn.bench import DTYPES, _sync, args_config, environment, report_path, write_json
from hf_fastattn.ops.poly import poly_coefficients, poly_recurrent_attention
from hf_fastattn.ops.poly.chunk import poly_direct_attention
from hf_fastattn.ops.poly.features import feature_count


def _ms(times) -> float:
    return statistics.median(times) * 1e3


def measure(n: int, args, device, dtype) -> dict:
    """Decode steps n+1 .. n+steps: each arm's median ms per call."""
    g = torch.Generator(device="cpu").manual_seed(n)
    q = torch.randn(args.batch, args.heads, args.steps, args.head_dim, generator=g).to(device, dtype)
    k, v = (torch.randn(args.batch, args.kv_heads, n + args.steps, args.head_dim, generator=g).to(device, dtype)
            for _ in range(2))
    scale, coeffs = args.head_dim**-0.5, poly_coefficients(args.degree)
    _sync(device)
    t0 = time.perf_counter()
    _, state = poly_recurrent_attention(q[:, :, :1], k[:, :, :n], v[:, :, :n], scale, coeffs, args.band)
    _sync(device)
    build = time.perf_counter() - t0
    with_state, direct, diff = [], [], 0.0
    for i in range(1, args.steps):
        row, cache = q[:, :, i : i + 1], (k[:, :, : n + i], v[:, :, : n + i])
        _sync(device)
        t0 = time.perf_counter()
        a, state = poly_recurrent_attention(row, *cache, scale, coeffs, args.band, state=state)
        _sync(device)
        with_state.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        b = poly_direct_attention(row, *cache, scale, coeffs, args.band)
        _sync(device)
        direct.append(time.perf_counter() - t0)
        diff = max(diff, ((a.float() - b.float()).abs().max() / b.float().abs().max()).item())
    return {"n": n, "state_ms": _ms(with_state), "direct_ms": _ms(direct), "build_s": build,
            "speedup": _ms(direct) / _ms(with_state), "rel_diff": diff}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=comma_list(at_least(1)), default=[4096, 16384, 65536])
    p.add_argument("--batch", type=at_least(1), default=1)
    p.add_argument("--heads", type=at_least(1), default=8)
    p.add_argument("--kv-heads", type=at_least(1), default=4)
    p.add_argument("--head-dim", type=at_least(1), default=64)
    p.add_argument("--degree", type=even_degree, default=2)
    p.add_argument("--band", type=at_least(0), default=64)
    p.add_argument("--steps", type=at_least(1), default=33, help="decode calls per length (the first builds)")
    p.add_argument("--device", type=device_name, default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--threads", type=at_least(0), default=0)
    p.add_argument("--out", default="")
    return p


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.heads % args.kv_heads:
        p.error(f"--heads ({args.heads}) must be a multiple of --kv-heads ({args.kv_heads})")
    if args.steps < 2:
        p.error("--steps must be >= 2 (the first call builds the state)")
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    rows = []
    for n in args.lengths:
        rows.append(measure(n, args, device, dtype))
        r = rows[-1]
        print(f"N = {n:>8}: state {r['state_ms']:8.3f} ms  direct {r['direct_ms']:9.3f} ms  x{r['speedup']:6.2f}  "
              f"build {r['build_s']:7.3f} s  rel diff {r['rel_diff']:.1e}", flush=True)
    config = dict(args_config(args), features=feature_count(args.head_dim, args.degree))
    path = report_path(args.out, "poly-decode", args.device, args.dtype)
    write_json({"env": environment(device), "config": config, "rows": rows}, path)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
