#!/usr/bin/env python
"""Compile the poly Triton kernels for a GPU architecture without a GPU, and report what each one needs.

    TRITON_INTERPRET=0 python scripts/compile_poly.py --head-dim 64 128 --arch 90

One forward + backward of `poly_triton_attention` runs on small CPU tensors with every kernel launch captured
(not run); each captured launch (its exact constexprs, dtypes, warps and stages) is then compiled to a cubin
for sm_<arch> with Triton's own ptxas, and `ptxas -v` reads its registers and spills.
Shared memory comes from the compiler. This catches what the interpreter cannot: constructs the compiler
rejects, shared memory over the SM's limit (227 KiB on sm_90), register spills. Times are not measured.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TRITON_INTERPRET", "0")  # compile, do not interpret

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from hf_fastattn.ops.poly import triton as pt  # noqa: E402
from hf_fastattn.ops.poly.features import poly_coefficients  # noqa: E402

SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024, 100: 227 * 1024}  # bytes per block (opt-in maximum)
_PTR = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.int32: "*i32",
        torch.int64: "*i64"}


def capture(d, dtype, tile, rows, chunk, n, heads, hkv, band, softcap):
    """Every kernel launch of one forward + backward, as (kernel, positional args, keyword args)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("compile_poly needs TRITON_INTERPRET=0 (interpreted kernels cannot be compiled)")
    log = []

    class Recorder:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            return lambda *args, **kwargs: log.append((self.fn, args, kwargs))

    kernels = {name: obj for name, obj in vars(pt).items() if isinstance(obj, triton.runtime.jit.JITFunction)}
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads, n, d, generator=g).to(dtype).requires_grad_()
    k, v = (torch.randn(1, hkv, n, d, generator=g).to(dtype).requires_grad_() for _ in range(2))
    try:
        for name, fn in kernels.items():
            setattr(pt, name, Recorder(fn))
        out = pt.poly_triton_attention(q, k, v, d**-0.5, poly_coefficients(2), band, chunk, softcap, tile=tile,
                                       segment=4 * chunk * rows, rows_per_block=rows)
        out.backward(torch.ones_like(out))
    finally:
        for name, fn in kernels.items():
            setattr(pt, name, fn)
    return log


def _signature(fn, args, kwargs):
    names = fn.arg_names
    sig, consts = {}, {}
    for name, value in zip(names, args):
        if isinstance(value, torch.Tensor):
            sig[name] = _PTR[value.dtype]
        elif isinstance(value, bool):
            sig[name] = "i1"
        elif isinstance(value, int):
            sig[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
        elif isinstance(value, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: cannot type argument {name}={value!r}")
    options = {key: kwargs[key] for key in ("num_warps", "num_stages") if key in kwargs}
    for name, value in kwargs.items():
        if name not in options:
            sig[name], consts[name] = "constexpr", value
    return sig, consts, options


def _resources(ptx: str, arch: int) -> dict:
    """Registers, stack frame and spill bytes of the kernel, from `ptxas -v` on the PTX Triton generated (the
    same ptxas Triton assembles with)."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        suffix = "a" if arch >= 90 else ""
        text = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name=sm_{arch}{suffix}", src, "-o",
                               os.path.join(tmp, "k.o")], capture_output=True, text=True).stderr
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", text)
    stack, stores, loads = (int(x) for x in spill.groups()) if spill else (0, 0, 0)
    return {"regs": int(regs.group(1)) if regs else -1, "stack": stack, "spill_stores": stores, "spill_loads": loads}


def compile_all(log, arch):
    """Compile every distinct captured launch for sm_<arch>: a list of report rows."""
    seen, rows = set(), []
    for fn, args, kwargs in log:
        sig, consts, options = _signature(fn, args, kwargs)
        key = (fn.__name__, tuple(sorted(sig.items())), tuple(sorted((k, str(v)) for k, v in consts.items())))
        if key in seen:
            continue
        seen.add(key)
        t0 = time.perf_counter()
        row = {"kernel": fn.__name__, "warps": options.get("num_warps", 4), "stages": options.get("num_stages", 3)}
        try:
            compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                                      target=GPUTarget("cuda", arch, 32), options=options)
        except Exception as err:  # the report says which kernel and why; the exit code says it failed
            row.update(error=f"{type(err).__name__}: {str(err).strip().splitlines()[-1][:300]}")
        else:
            row.update(shared_kib=round(compiled.metadata.shared / 1024, 1), **_resources(compiled.asm["ptx"], arch))
            if arch in SHARED_LIMIT and compiled.metadata.shared > SHARED_LIMIT[arch]:
                row["error"] = f"shared memory {compiled.metadata.shared} B > {SHARED_LIMIT[arch]} B of sm_{arch}"
        row["compile_s"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--head-dim", type=int, nargs="+", default=[64, 128], help="head dimensions D to compile for")
    p.add_argument("--dtype", nargs="+", choices=["bf16", "fp16", "fp32"], default=["bf16"], help="input dtypes")
    p.add_argument("--tile", type=int, default=pt.BA, help="quadratic tile width (8 or 16)")
    p.add_argument("--rows", type=int, default=1, help="query chunks per forward block (1 or 2)")
    p.add_argument("--chunk", type=int, default=64, help="chunk size")
    p.add_argument("--band", type=int, default=0, help="exact band (0: none)")
    p.add_argument("--softcap", type=float, default=None, help="logit softcap (compiles the softcap variant)")
    p.add_argument("--gqa", type=int, default=1, help="query heads per K/V head (the U sweep unrolls over them)")
    p.add_argument("--arch", type=int, default=90, help="compute capability x10 (80 A100, 90 H100/H200)")
    p.add_argument("--tuning", nargs="*", default=[], metavar="KEY=VALUE",
                   help="overrides of hf_fastattn.ops.poly.triton.TUNING (reshape, bdv_read, bdv_state)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--out", default=None, help="also write the report, with versions and date, to this JSON file")
    a = p.parse_args(argv)
    for kv in a.tuning:
        key, _, value = kv.partition("=")
        if key not in pt.TUNING:
            raise SystemExit(f"--tuning: unknown key {key!r}; choose from {', '.join(pt.TUNING)}")
        pt.TUNING[key] = int(value)
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    report = []
    for name in a.dtype:
        for d in a.head_dim:
            n = 16 * a.chunk * a.rows  # enough chunks for three boundary states
            log = capture(d, dtypes[name], a.tile, a.rows, a.chunk, n, 2 * a.gqa, 2, a.band, a.softcap)
            report += [dict(dtype=name, d=d, **row) for row in compile_all(log, a.arch)]
    if a.out:
        from hf_fastattn.bench import environment

        env = dict(environment(torch.device("cpu")), target=f"sm_{a.arch}", tuning=dict(pt.TUNING))
        with open(a.out, "w") as f:
            json.dump({"env": env, "config": vars(a), "kernels": report}, f, indent=1)
    if a.json:
        print(json.dumps(report, indent=1))
    else:
        print(f"sm_{a.arch}, tile {a.tile}, rows {a.rows}, chunk {a.chunk}, {pt.TUNING}, triton {triton.__version__}")
        cols = ("dtype", "d", "kernel", "warps", "stages", "regs", "spill_stores", "spill_loads", "shared_kib")
        print(" ".join(f"{c:>12}" for c in cols))
        for r in report:
            cells = " ".join(f"{r.get(c, ''):>12}" for c in cols[:3])
            if "regs" in r:
                cells += " " + " ".join(f"{r[c]:>12}" for c in cols[3:])
            print(cells + (f"  FAILED: {r['error']}" if "error" in r else ""))
    return 1 if any("error" in r for r in report) else 0


if __name__ == "__main__":
    sys.exit(main())
