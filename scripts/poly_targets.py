#!/usr/bin/env python
"""What the speed targets ask of poly's Triton kernels, from a bench JSON's SDPA times and our FLOP count.

    python scripts/poly_targets.py benchmarks/results/h100/attention-h100-bf16-d{64,128}-segmented.json

For each file (its B, H, Hkv, D, dtype) and each length with an SDPA fwd+bwd time: the FLOPs of poly's Triton
schedule as the code is now (`bench.flop_count`, states recomputed by the backward / saved, the default
segment under the 10 GiB state budget of an 80 GB GPU), and the rate it must run at to be `target` times faster
than that SDPA time (issue 7: 5x at 128k, 30x at 1M; parity elsewhere), also as a share of the bf16 dense
peak. Where the file timed poly too, the rate and ratio that run reached, on its own FLOP count.
"""

from __future__ import annotations

import argparse
import json
import sys

from gpu_session import POLY  # the spec the GPU session's benches time
from hf_fastattn import bench

TARGETS = {131072: 5.0, 1048576: 30.0}  # issue 7's ratios to SDPA, fwd+bwd
PEAK = 989.0  # H100 / H200 SXM dense bf16 TFLOP/s (the same tensor cores)


def rows(report: dict, peak: float = PEAK) -> list[dict]:
    """One dict per length with an SDPA fwd+bwd time in `report` (a bench JSON)."""
    cfg = report["config"]
    b, h, d = cfg["batch"], cfg["heads"], cfg["head_dim"]
    hkv = cfg.get("kv_heads") or h
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    # device cpu: the state budget of an 80 GB GPU (STATE_BUDGET) without asking CUDA for its memory
    args = parser.parse_args(["--device", "cpu", "--dtype", cfg["dtype"], "--head-dim", str(d)])
    timed = {(r["method"], r["n"]): r for r in report["results"] if r["mode"] == "fwdbwd" and r.get("ms")}
    out = []
    for (method, n), sdpa in sorted(timed.items(), key=lambda kv: kv[0][1]):
        if method != "sdpa":
            continue
        target = TARGETS.get(n, 1.0)
        row = dict(d=d, n=n, sdpa_ms=sdpa["ms"], target=target)
        sdpa_flops = bench.flop_count("sdpa", b, h, hkv, n, d, "fwdbwd", args)
        for key, spec in (("recomputed", POLY), ("saved", POLY + ",save=1")):
            flops = bench.flop_count(spec, b, h, hkv, n, d, "fwdbwd", args)
            need = flops * target / (sdpa["ms"] / 1e3) / 1e12
            row[key] = dict(tflop=flops / 1e12, flop_ratio=sdpa_flops / flops, needs_tflops=need,
                            needs_peak=need / peak)
        ran = [r for (m, m_n), r in timed.items() if m_n == n and m.startswith("poly")]
        if ran:
            row["measured"] = [dict(method=r["method"], tflops=r["tflops"], ratio=r.get("speedup_vs_sdpa"))
                               for r in ran]
        out.append(row)
    return out


def table(all_rows: list[dict]) -> str:
    lines = ["| D | N | SDPA fwd+bwd | poly TFLOP (recomputed / saved) | FLOP ratio | target | poly needs | "
             "measured (its own FLOP count) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in all_rows:
        rc, sv = r["recomputed"], r["saved"]
        measured = "; ".join(f"{m['method']}: {m['tflops']:.0f} TFLOP/s, {m['ratio']:.2f}x"
                             for m in r.get("measured", []))
        lines.append(f"| {r['d']} | {r['n']} | {r['sdpa_ms']:.4g} ms | {rc['tflop']:.1f} / {sv['tflop']:.1f} | "
                     f"{rc['flop_ratio']:.1f} / {sv['flop_ratio']:.1f} | {r['target']:g}x | "
                     f"{rc['needs_tflops']:.0f} / {sv['needs_tflops']:.0f} TFLOP/s "
                     f"({100 * rc['needs_peak']:.0f} / {100 * sv['needs_peak']:.0f} % of peak) | {measured or '-'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("reports", nargs="+", help="bench JSON files with SDPA fwd+bwd rows")
    p.add_argument("--peak", type=float, default=PEAK, help="dense bf16 TFLOP/s of the GPU (default: H100 SXM)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    a = p.parse_args(argv)
    all_rows = [r for path in a.reports for r in rows(json.load(open(path)), a.peak)]
    print(json.dumps(all_rows, indent=1) if a.json else table(all_rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
