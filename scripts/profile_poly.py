#!/usr/bin/env python
"""Per-kernel GPU time of one poly-Triton forward+backward (torch.profiler), for one or more schedules.

    python scripts/profile_poly.py --n 131072 --head-dim 128 --variants tile=16 rows=1 stages_read=1 bdv_state=64
Variant keys: tile, rows, segment, save (1: keep the boundary states for the backward), and the `TUNING`
knobs of hf_fastattn.ops.poly.triton (reshape, bdv_read, bdv_state, key_major, stages_read, stages_sweep; 0/1
for the switches). One line per variant: total CUDA ms and each kernel's ms with, in brackets, the TFLOP/s of
its tensor-core work (`kernel_flops`; an H100 SXM peaks at ~990 dense bf16).
"""

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from hf_fastattn.bench import segmented_terms
from hf_fastattn.ops.poly import triton as pt
from hf_fastattn.ops.poly.features import FeatureMap, poly_coefficients


def kernel_flops(n, heads, d, chunk, segment, save_states=False):
    """Tensor-core FLOPs of each kernel (B = 1, K/V heads = heads), on the benchmark's cost model
    (`hf_fastattn.bench.segmented_terms`): every far kernel is one state product per head; the direct window is
    one [N, W] x [W, D] product per dot: 2 in the forward, 3 in the query pass (logits, dW, dq), 4 in the key pass
    (logits, dW, dk, dv; the benchmark's fwd+bwd count has 5 backward dots, not the 7 that run). Feature maps,
    denominators and VJPs are not counted. Without save_states the key sweep runs twice (forward and backward;
    the profiler sums both launches)."""
    state, window = segmented_terms(n, d, FeatureMap.get(d, 2).r, chunk, 0, segment)
    far, direct = heads * state, 2.0 * heads * n * window * d
    return {"_state_fwd": far * (1 if save_states else 2), "_fwd": far + 2 * direct,
            "_direct_bwd_q": 3 * direct, "_direct_bwd_kv": 4 * direct,
            "_far_bwd_dq": far, "_state_bwd": far, "_far_bwd_v": far, "_far_bwd_k": far}


def run_variant(spec: str, a) -> str:
    opts = dict(kv.split("=") for kv in spec.split(",") if kv)
    defaults = dict(pt.TUNING)
    for key in pt.TUNING:
        if key in opts:
            pt.TUNING[key] = int(opts[key])
    tile = int(opts.get("tile", pt.BA))
    seg = opts.get("segment", "auto")
    seg = seg if seg == "auto" else int(seg)
    budget = pt.state_budget("cuda")
    auto = seg == "auto"
    tokens = pt.auto_segment(1, a.heads, a.n, a.head_dim, a.head_dim, a.chunk, tile, 2, budget) if auto else seg
    save = bool(int(opts.get("save", 0)))
    flops = kernel_flops(a.n, a.heads, a.head_dim, a.chunk, tokens, save)
    q, k, v = (torch.randn(1, a.heads, a.n, a.head_dim, device="cuda", dtype=torch.bfloat16) * a.head_dim**-0.25
               for _ in range(3))
    q, k, v = (t.requires_grad_() for t in (q, k, v))

    def step():
        out = pt.poly_triton_attention(q, k, v, a.head_dim**-0.5, poly_coefficients(2), 0, a.chunk,
                                       tile=tile, segment=seg,
                                       rows_per_block=int(opts["rows"]) if "rows" in opts else None,
                                       save_states=save)
        out.backward(torch.ones_like(out))

    try:
        step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
    except Exception as err:  # a schedule that does not compile: say so and go on
        return f"{spec:<36} {type(err).__name__}: {str(err)[:120]}"
    finally:
        pt.TUNING.update(defaults)
    times = {e.key: e.device_time_total / 1e3 for e in prof.key_averages()}
    total = sum(times.values())
    ours = sorted(((t, n) for n, t in times.items() if n.startswith("_")), reverse=True)
    # per kernel: ms (TFLOP/s of its tensor-core work, `kernel_flops`)
    return f"{spec:<36} {total:8.1f} ms | " + " ".join(
        f"{n} {t:.1f}" + (f" ({flops[n] / t / 1e9:.0f})" if n in flops and t > 0 else "") for t, n in ours) + \
        f" | other {total - sum(t for t, _ in ours):.1f}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=131072, help="sequence length")
    p.add_argument("--heads", type=int, default=16, help="heads H (K/V heads too)")
    p.add_argument("--head-dim", type=int, default=128, help="head dimension D")
    p.add_argument("--chunk", type=int, default=64, help="chunk size")
    p.add_argument("--variants", nargs="+", default=["tile=16"], help="schedules to time (see the module doc)")
    a = p.parse_args(argv)
    known = {"tile", "rows", "segment", "save", *pt.TUNING}
    for spec in a.variants:  # a misspelt knob would time the default schedule under another name
        bad = sorted({kv.split("=")[0] for kv in spec.split(",") if kv} - known)
        if bad or not all("=" in kv for kv in spec.split(",") if kv):
            raise SystemExit(f"--variants: {spec!r} is not KEY=VALUE[,KEY=VALUE] over {', '.join(sorted(known))}")
    if not torch.cuda.is_available():
        raise SystemExit("profile_poly.py needs a CUDA GPU")
    print(f"n={a.n} H={a.heads} D={a.head_dim} bf16 fwd+bwd, CUDA ms per kernel (TFLOP/s)", flush=True)
    for spec in a.variants:
        print(run_variant(spec, a), flush=True)


if __name__ == "__main__":
    main()
