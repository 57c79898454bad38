#!/usr/bin/env python
"""Attention benchmark (same as `hf-fastattn bench`): our ops vs torch SDPA in one run, JSON + PNG.

Examples:
    python scripts/bench_attention.py --lengths 1024,4096,16384,65536 --methods sdpa,exact,poly
    python scripts/bench_attention.py --device cuda --dtype bf16 --heads 16 --head-dim 128 \\
        --lengths 4096,16384,65536,131072 --methods sdpa,poly,conv:k=16
"""

import argparse
import sys

from hf_fastattn import bench

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_arguments(parser)
    sys.exit(bench.main(parser.parse_args()))
