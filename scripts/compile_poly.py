#!/usr/bin/env python
"""Compile the poly Triton kernels for a GPU architecture without a GPU, and report what each one needs.

    TRITON_INTERPRET=0 python scripts/compile_poly.py --head-dim 64 128 --arch 90

One forward + backward of `poly_triton_attention` runs on small CPU tensors with every kernel launch captured
(not run); each captured launch is specialised by Triton's own argument binder (constexprs, dtypes, pointer
alignment, integer divisibility, warps, stages: what a real launch compiles) and compiled to a cubin for
sm_<arch> with Triton's own ptxas, lowering num_stages while it exceeds the SM's shared memory (the rule of
`_launch`). `ptxas -v` reads registers and spills, and says when it had to serialise the kernel's wgmma (C7515:
every tensor-core MMA waited for as soon as it is issued); the PTX says which loops were software-pipelined
(cp.async) and whether the dots use wgmma. This catches what the interpreter cannot: constructs the compiler
rejects, shared memory over the SM's limit (227 KiB on sm_90), spills, lost pipelining, serialised MMAs. Times
are not measured.

    python scripts/compile_poly.py --memory 262144 1048576 --head-dim 64 128

runs the same forward + backward on the meta device under a TorchDispatchMode that counts live tensor bytes:
the peak device memory of a run at any length, with no device, and what is held from the forward to the
backward (per layer, in a model), with and without `save_states`. For the kernels measured on the H100 (6629a06)
it gives 73.1 / 22.1 GiB at D = 64, 1M / 256k tokens, where the GPU measured ~71 / ~22 GiB (65.2 / 20.2 above
the inputs).
"""

import argparse
import contextlib
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import weakref

os.environ.setdefault("TRITON_INTERPRET", "0")  # compile, do not interpret

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from hf_fastattn.ops.poly import triton as pt  # noqa: E402
from hf_fastattn.ops.poly.features import poly_coefficients  # noqa: E402

SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024, 100: 227 * 1024}  # bytes per block (opt-in maximum)


def capture(d, dtype, tile, rows, chunk, n, heads, hkv, band, softcap, segment=None, device="cpu", mode=None,
            save_states=False):
    """Every kernel launch of one forward + backward, as (kernel, positional args, keyword args). The kernels do
    not run, so `device="meta"` works at any length; `mode` (a TorchDispatchMode) sees every torch op, and then
    no launch is kept (the log would keep the kernels' tensors alive); its `between()`, if it has one, is
    called after the forward."""
    log = []
    rows = rows or pt.default_rows(chunk, dtype, d)

    class Recorder:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            return lambda *args, **kwargs: None if mode else log.append((self.fn, args, kwargs))

    kernels = {name: obj for name, obj in vars(pt).items() if isinstance(obj, triton.runtime.jit.KernelInterface)}
    try:
        for name, fn in kernels.items():
            setattr(pt, name, Recorder(fn))
        with mode or contextlib.nullcontext():
            q = torch.randn(1, heads, n, d, device=device, dtype=dtype).requires_grad_()
            k, v = (torch.randn(1, hkv, n, d, device=device, dtype=dtype).requires_grad_() for _ in range(2))
            out = pt.poly_triton_attention(q, k, v, d**-0.5, poly_coefficients(2), band, chunk, softcap, tile=tile,
                                           segment=segment or 4 * chunk * rows, rows_per_block=rows,
                                           save_states=save_states)
            getattr(mode, "between", lambda: None)()
            out.backward(torch.ones_like(out))
    finally:
        for name, fn in kernels.items():
            setattr(pt, name, fn)
    return log


class LiveBytes(TorchDispatchMode):
    """Bytes held by live tensors and their peak over a region, counting every tensor an op allocates (views
    and in-place results alias an allocation and are not counted) until it is freed. This is what a caching
    allocator must hold at least; it does not see the allocator's rounding or fragmentation."""

    def __init__(self, big=2**30):
        super().__init__()
        self.live = self.peak = self.held = 0
        self.big, self.allocations = big, []  # allocations of >= `big` bytes: (bytes, op, shape, dtype)

    def between(self):
        """Mark the end of the forward: `held` is what is live then (what a layer keeps until its backward)."""
        self.held = self.live

    def _free(self, nbytes):
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not any(r.alias_info is not None for r in func._schema.returns):
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    nbytes = t.untyped_storage().nbytes()
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(t, self._free, nbytes)
                    if nbytes >= self.big:
                        self.allocations.append((nbytes, str(func), tuple(t.shape), str(t.dtype)))
        return out


def peak_memory(d, dtype, n, heads, tile, rows, chunk, save_states=False):
    """Live bytes of one forward + backward at length n (B = 1, K/V heads = heads) on the meta device (no memory
    is used and no kernel runs): `.peak` (inputs and gradients included) and `.held` (after the forward, inputs
    and output included)."""
    tracker = LiveBytes()
    capture(d, dtype, tile, rows, chunk, n, heads, heads, 0, None, segment="auto", device="meta", mode=tracker,
            save_states=save_states)
    return tracker


def _source(fn, args, kwargs, target):
    """What a launch of fn[grid](*args, **kwargs) compiles for `target`: Triton's own argument binder, so the
    source carries the same specialisation a real launch gets (pointers aligned to 16 bytes and integers
    divisible by 16 marked as such, integers equal to 1 folded). Without it, loads are not known to be
    aligned, cannot be vectorised or pipelined with cp.async, and the report describes other code."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(target)
    bound, spec, opts = create_function_from_signature(fn.signature, fn.params, backend)(*args, **kwargs)
    _, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
    options = {key: kwargs[key] for key in ("num_warps", "num_stages") if key in kwargs}
    return ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs), options


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
    return {"regs": int(regs.group(1)) if regs else -1, "stack": stack, "spill_stores": stores, "spill_loads": loads,
            # ptxas's C7515: it found a non-wgmma write to an accumulator register while a wgmma may be in flight,
            # and so waits for every wgmma of the kernel as soon as it is issued (no MMA overlaps anything)
            "wgmma_serialized": "C7515" in text,
            # asynchronous copies exist only where a loop's loads were software-pipelined (num_stages > 1 and
            # aligned, vectorisable addresses); wgmma is Hopper's asynchronous tensor-core MMA, mma.sync the older
            # synchronous one (or none: float32 "ieee" dots run on the FMA units)
            "cp_async": len(re.findall(r"\bcp\.async\.c[ag]\.", ptx)),
            "wgmma": len(re.findall(r"\bwgmma\.mma_async\.", ptx)), "mma_sync": len(re.findall(r"\bmma\.sync\.", ptx))}


# dense tensor-core FLOPs per SM per clock on sm_90 (989 TFLOP/s bf16 = 132 SMs x 1.83 GHz x 4096)
MMA_RATE = {"BF16": 4096, "F16": 4096, "TF32": 2048, "E4M3": 8192, "E5M2": 8192}


def hot_loop(sass: str, warps: int) -> dict:
    """A static issue model of a kernel's busiest loop, read off its SASS (`cuobjdump -sass`): the innermost loop
    with the most tensor-core work per iteration (the first of equals: the kernels put their direct windows'
    far-only loops, the ones long contexts run, before the near ones). Per iteration: instructions per warp, MMA
    FLOPs of the CTA (every warpgroup runs each HGMMA of the loop), and the clocks both take on one SM: its 4
    schedulers issue one warp instruction each per clock, and the MMAs run at the dense rate of `MMA_RATE`.
    `mma_bound` = MMA clocks / max(MMA, issue clocks) is the most of the tensor-core peak the loop can reach with
    one CTA per SM, before latencies, barriers and branches skipped inside it: a model of the code, not a
    measurement. `loop_flop_per_byte`: those MMA FLOPs per byte the loop's global loads (cp.async LDGSTS, LDG;
    all lanes of every warp, widths from the opcode) bring in. It leaves out L2 hits, so it says what an
    iteration asks of L2: an H100 feeds roughly 180 FLOP per byte at its dense bf16 rate (989 TFLOP/s over
    about 5.5 TB/s), and a loop below that cannot reach `mma_bound` where its loads come from L2."""
    ins = [(int(a, 16), t.strip()) for a, t in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    loops = []
    for addr, text in ins:
        jump = re.match(r"(?:@!?U?P\w+\s+)?BRA\s+(?:`\()?0x([0-9a-f]+)", text)
        if jump and int(jump.group(1), 16) < addr:
            loops.append((int(jump.group(1), 16), addr))
    inner = [(a, b) for a, b in loops if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in loops)]
    best = None
    for a, b in inner:
        body = [t for addr, t in ins if a <= addr <= b]
        flops = raw = 0
        for m, n, k, kind in re.findall(r"HGMMA\.(\d+)x(\d+)x(\d+)\.F32\.(\w+)", " ".join(body)):
            raw += 2 * int(m) * int(n) * int(k) * (warps // 4)
            flops += 2 * int(m) * int(n) * int(k) * (warps // 4) / MMA_RATE.get(kind, 4096)  # in clocks
        if best is None or flops > best[0]:
            best = (flops, raw, body)
    if not best or not best[0]:
        return {}
    mma_clk, raw, body = best
    loaded = 0  # global bytes per iteration: width (bits in the opcode, else 32) x 32 lanes x warps
    for op in re.findall(r"\b(?:LDGSTS|LDG)\b((?:\.\w+)*)", " ".join(body)):
        bits = [int(w) for w in re.findall(r"\.(?:U|S)?(8|16|32|64|128)\b", op)]
        loaded += (bits[-1] if bits else 32) // 8 * 32 * warps
    issue_clk = len(body) * warps / 4

    def count(pattern):
        return sum(1 for t in body if re.search(pattern, t))

    return {"loop_insts": len(body), "loop_mma_clk": round(mma_clk), "loop_issue_clk": round(issue_clk),
            "mma_bound": round(100 * mma_clk / max(mma_clk, issue_clk)), "loop_bar": count(r"\bBAR\.SYNC"),
            "loop_fp32": count(r"\b(FFMA|FMUL|FADD)\b"), "loop_red": count(r"\b(RED|ATOM)\w*\."),
            "loop_flop_per_byte": round(raw / loaded) if loaded else None}


def _sass(cubin: bytes, arch: int) -> str:
    """The SASS of a cubin, by the cuobjdump that ships beside Triton's ptxas."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        tool = os.path.join(os.path.dirname(get_ptxas(arch).path), "cuobjdump")
        return subprocess.run([tool, "-sass", path], capture_output=True, text=True).stdout


def _compile(fn, args, kwargs, target, arch):
    """One launch compiled as `hf_fastattn.ops.poly.triton._launch` would run it: at its num_stages, then
    shallower while the kernel exceeds the shared memory of sm_<arch>. A report row."""
    wanted = kwargs.get("num_stages", 3)
    for stages in range(wanted, 0, -1):
        src, options = _source(fn, args, dict(kwargs, num_stages=stages), target)
        row = {"kernel": fn.__name__, "warps": options.get("num_warps", 4), "stages": stages}
        t0 = time.perf_counter()
        try:
            compiled = triton.compile(src, target=target, options=options)
        except Exception as err:  # the report says which kernel and why; the exit code says it failed
            return dict(row, error=f"{type(err).__name__}: {str(err).strip().splitlines()[-1][:300]}")
        row.update(shared_kib=round(compiled.metadata.shared / 1024, 1), **_resources(compiled.asm["ptx"], arch),
                   **hot_loop(_sass(compiled.asm["cubin"], arch), row["warps"]),
                   compile_s=round(time.perf_counter() - t0, 1))
        if compiled.metadata.shared <= SHARED_LIMIT.get(arch, compiled.metadata.shared):
            return dict(row, stages_wanted=wanted) if stages < wanted else row
    return dict(row, error=f"shared memory {compiled.metadata.shared} B > {SHARED_LIMIT[arch]} B of sm_{arch} "
                           "even unpipelined")


def compile_all(log, arch):
    """Compile every distinct captured launch for sm_<arch>: a list of report rows."""
    seen, rows, target = set(), [], GPUTarget("cuda", arch, 32)
    for fn, args, kwargs in log:
        key = (fn.__name__, _source(fn, args, kwargs, target)[0].hash(), str(kwargs.get("num_warps")),
               str(kwargs.get("num_stages")))
        if key not in seen:
            seen.add(key)
            rows.append(_compile(fn, args, kwargs, target, arch))
    return rows


def _save(a, **report):
    """Write the report to --out (if given) with versions, date, target, tuning and the command's options."""
    if a.out:
        from hf_fastattn.bench import environment

        env = dict(environment(torch.device("cpu")), target=f"sm_{a.arch}", tuning=dict(pt.TUNING))
        with open(a.out, "w") as f:
            json.dump({"env": env, "config": vars(a), **report}, f, indent=1)


def memory_report(a, dtypes):
    rows = []
    for name in a.dtype:
        for d in a.head_dim:
            for n, save in itertools.product(a.memory, (False, True)):
                t = peak_memory(d, dtypes[name], n, a.heads, a.tile, a.rows, a.chunk, save)
                big = sorted(t.allocations, reverse=True)
                rows.append(dict(dtype=name, d=d, n=n, heads=a.heads, save_states=save,
                                 peak_gib=round(t.peak / 2**30, 2), held_gib=round(t.held / 2**30, 2),
                                 allocations_gib=[(round(b / 2**30, 2), op, shape, dt) for b, op, shape, dt in big]))
                print(f"{name} D={d} N={n} H={a.heads} save_states={save}: peak {t.peak / 2**30:.1f} GiB of live "
                      f"tensors (fwd + bwd, inputs and gradients included), {t.held / 2**30:.1f} GiB held from "
                      "forward to backward (inputs and output included); allocations >= 1 GiB:")
                for b, op, shape, dt in big:
                    print(f"    {b / 2**30:6.2f} GiB  {op:<28} {list(shape)} {dt}")
    _save(a, memory=rows)
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--head-dim", type=int, nargs="+", default=[64, 128], help="head dimensions D to compile for")
    p.add_argument("--dtype", nargs="+", choices=["bf16", "fp16", "fp32"], default=["bf16"], help="input dtypes")
    p.add_argument("--tile", type=int, default=pt.BA, help="quadratic tile width (8 or 16)")
    p.add_argument("--rows", type=int, default=None,
                   help="query chunks per readout block (1 or 2; default: the kernels' default_rows)")
    p.add_argument("--chunk", type=int, default=64, help="chunk size")
    p.add_argument("--band", type=int, default=0, help="exact band (0: none)")
    p.add_argument("--softcap", type=float, default=None, help="logit softcap (compiles the softcap variant)")
    p.add_argument("--gqa", type=int, default=1, help="query heads per K/V head (the U sweep unrolls over them)")
    p.add_argument("--arch", type=int, default=90, help="compute capability x10 (80 A100, 90 H100/H200)")
    p.add_argument("--tuning", nargs="*", default=[], metavar="KEY=VALUE",
                   help="overrides of hf_fastattn.ops.poly.triton.TUNING (" + ", ".join(pt.TUNING) + ")")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--out", default=None, help="also write the report, with versions and date, to this JSON file")
    p.add_argument("--memory", type=int, nargs="+", default=None, metavar="N",
                   help="instead of compiling: peak live tensor bytes of a forward + backward at these lengths "
                        "(B = 1, --heads heads, segment 'auto'), on the meta device")
    p.add_argument("--heads", type=int, default=16, help="heads for --memory")
    a = p.parse_args(argv)
    for kv in a.tuning:
        key, _, value = kv.partition("=")
        if key not in pt.TUNING:
            raise SystemExit(f"--tuning: unknown key {key!r}; choose from {', '.join(pt.TUNING)}")
        pt.TUNING[key] = int(value)
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if a.memory:
        return memory_report(a, dtypes)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("compiling needs TRITON_INTERPRET=0 (interpreted kernels cannot be compiled)")
    report = []
    for name in a.dtype:
        for d in a.head_dim:
            n = 32 * a.chunk  # enough chunks for three boundary states
            log = capture(d, dtypes[name], a.tile, a.rows, a.chunk, n, 2 * a.gqa, 2, a.band, a.softcap)
            report += [dict(dtype=name, d=d, **row) for row in compile_all(log, a.arch)]
    _save(a, kernels=report)
    if a.json:
        print(json.dumps(report, indent=1))
    else:
        print(f"sm_{a.arch}, tile {a.tile}, rows {a.rows or 'default'}, chunk {a.chunk}, {pt.TUNING}, "
              f"triton {triton.__version__}")
        cols = ("dtype", "d", "kernel", "warps", "stages", "regs", "spill_stores", "spill_loads", "shared_kib",
                "cp_async", "wgmma", "wgmma_serialized", "loop_insts", "mma_bound")
        head = " ".join(f"{c:>12}" for c in cols[:4]) + f" {'stages':>6}{'':7} "
        print(head + " ".join(f"{c:>12}" for c in cols[5:]))
        for r in report:
            cells = " ".join(f"{r.get(c, ''):>12}" for c in cols[:4])
            cells += f" {r['stages']:>6}" + (f" (of {r['stages_wanted']})" if "stages_wanted" in r else " " * 7)
            if "regs" in r:
                shown = (r.get(c, "") for c in cols[5:])  # (bools as yes / no: 0 and 1 are counts)
                cells += " " + " ".join(f"{'yes' if x is True else 'no' if x is False else x:>12}" for x in shown)
            print(cells + (f"  FAILED: {r['error']}" if "error" in r else ""))
    return 1 if any("error" in r for r in report) else 0


if __name__ == "__main__":
    sys.exit(main())
