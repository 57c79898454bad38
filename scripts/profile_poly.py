#!/usr/bin/env python
"""Per-kernel GPU time of one poly-Triton forward+backward (torch.profiler), to see where the time goes.

    python scripts/profile_poly.py --n 131072 --head-dim 128 --tile 16
"""

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from hf_fastattn.ops.poly.features import poly_coefficients
from hf_fastattn.ops.poly.triton import poly_triton_attention


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=131072)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--tile", type=int, default=16)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--segment", default="auto")
    p.add_argument("--rows", type=int, default=2)
    a = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_poly.py needs a CUDA GPU")
    seg = a.segment if a.segment == "auto" else int(a.segment)
    q, k, v = (torch.randn(1, a.heads, a.n, a.head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))

    def step():
        out = poly_triton_attention(q, k, v, a.head_dim**-0.5, poly_coefficients(2), 0, a.chunk, tile=a.tile,
                                    segment=seg, rows_per_block=a.rows)
        out.backward(torch.ones_like(out))

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=40))


if __name__ == "__main__":
    main()
