#!/usr/bin/env python3
"""Everything a GPU session owes the poly Triton kernels (issue 7), in one device call, most important first.

    python3 scripts/gpu_session.py --out "$OUT"                 # on the device machine: run(..., timeout_s=480)
    python3 scripts/gpu_session.py --only bench-d128 --out "$OUT"  # one stage again, on a machine still warm

A session is lent 15 device minutes in all (the machine's start included), so the stages share one deadline
(--seconds, default 420): each runs under min(its cap, the time left) and is killed at that limit, a stage that
cannot get its minimum is skipped, and the stages go in the order of what the issue needs most:

  tests       the gpu-marked tests: compiled kernels against the float64 reference, bf16 against torch's own error
  bench-d128  fwd and fwd+bwd against SDPA (flash), bf16, H = 16, D = 128, 4k .. 1M tokens (the issue's targets:
              5x at 128k, 30x at 1M), states recomputed and saved
  bench-d64   the same at D = 64
  profile     per-kernel CUDA ms at 128k, D = 128: the default schedule, then the alternatives the defaults were
              chosen against without a GPU, in order of interest (one line each, so a cut-off run keeps the first)
  model       training steps of a 4-layer decoder (H = 16, D = 128): SDPA vs poly vs band, 16k .. 128k
  targets     scripts/poly_targets.py on the bench JSON: the rate each target needs beside the rate reached
  compile     generate() auto-compiled with CUDA graphs through the attention custom op (not issue 7's: last)
  decode      poly decode calls from a kept prefix state vs the direct form, 16k .. 1M keys (not issue 7's either)

The benches rewrite their JSON after every row and time repeats only until --repeat-seconds (SDPA's 30 s run at
1M counts once), so a stage cut off at its limit keeps every row it finished. What comes back: session.log
(every stage's output), session.json (each stage's status and seconds, rewritten after each), and the benches'
the model's and the decode bench's JSON: six files, within the device tool's eight. docs/poly-triton.md, section 7, has the budget.

`--smoke` runs the same stages on the CPU at toy sizes (the test suite does, to check this script's plumbing).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
POLY = "poly:chunk=64,kernel=triton"  # the spec the benches time (scripts/poly_targets.py reads it back)


@dataclass
class Stage:
    name: str
    cmd: list[str]
    cap: float  # seconds at most
    least: float  # skipped with less time left than this
    inputs: tuple[Path, ...] = ()  # files appended to cmd where they exist; skipped if none does


def machine() -> tuple[str, str]:
    """('h200', 'h100', ... for the results' file names, or 'cpu' without CUDA; a line on the device and versions)."""
    import torch

    versions = f"torch {torch.__version__}, python {sys.version.split()[0]}"
    if _has("triton"):
        import triton

        versions += f", triton {triton.__version__}"
    if not torch.cuda.is_available():
        return "cpu", f"no CUDA device; {versions}"
    name = torch.cuda.get_device_name()
    free, total = torch.cuda.mem_get_info()
    words = name.split()
    short = re.sub(r"[^a-z0-9]", "", (words[1] if len(words) > 1 else words[0]).lower()) or "gpu"
    return short, f"{name}, {free / 2**30:.0f} of {total / 2**30:.0f} GiB free; {versions}"


def stages(smoke: bool, dest: Path, gpu: str) -> list[Stage]:
    """The session's stages, in order. smoke: the same commands at toy sizes on the CPU (the torch poly path:
    Triton's interpreter would take minutes), head dims 16 / 8 standing for 128 / 64."""
    py = sys.executable
    dtype = "fp32" if smoke else "bf16"
    dev = ["--device", "cpu" if smoke else "cuda", "--dtype", dtype, "--heads", "2" if smoke else "16"]
    dim = {128: 16, 64: 8} if smoke else {128: 128, 64: 64}
    poly = "poly:chunk=16,kernel=torch" if smoke else POLY
    # the subject first; states saved last (the least needed, so the first a time limit cuts)
    methods = f"sdpa,{poly},{poly},save=1" if not smoke else f"sdpa,{poly}"
    if not smoke and _has("flash_attn"):
        methods += ",flash"
    bench_json = {d: dest / f"attention-{gpu}-{dtype}-d{dim[d]}.json" for d in dim}

    def bench(d):
        return [py, "scripts/bench_attention.py", *dev, "--head-dim", str(dim[d]), "--methods", methods,
                "--lengths", "64,128" if smoke else "4096,16384,65536,131072,262144,1048576",
                "--modes", "fwdbwd,fwd", "--repeats", "3", "--repeat-seconds", "5", "--quiet", "--no-plot",
                "--out", str(bench_json[d])]

    # the default schedule, then each alternative the defaults were chosen against without a GPU, by interest
    variants = ["tile=16", "save=1", "tile=8", "rows=1", "stages_read=1", "stages_sweep=1", "bdv_state=64",
                "key_major=0"]
    profile = [py, "scripts/profile_poly.py", "--n", "256" if smoke else "131072", "--head-dim", str(dim[128]),
               "--variants", *variants]
    model = [py, "-m", "hf_fastattn.cli", "bench-model", *dev, "--layers", "2" if smoke else "4",
             "--head-dim", str(dim[128]), "--intermediate", "64" if smoke else "4096",
             "--lengths", "64,128" if smoke else "16384,65536,131072", "--modes", "fwdbwd", "--repeats", "2",
             "--arms", f"sdpa,poly,band:local_window={16 if smoke else 128}", "--quiet", "--no-plot",
             "--out", str(dest / f"model-{gpu}-{dtype}-d{dim[128]}.json")]
    # xdist (on the GPU machines' image): the tests' time is mostly Triton compiling one kernel set per shape and
    # dtype, which parallelises over the machine's 16 cores
    xdist = ["-n", "8"] if not smoke and _has("xdist") else []
    tests = [py, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider", *xdist,
             "tests/test_ops_poly_triton.py"]
    # generate()'s auto-compiled decode under CUDA graphs (the attention op is tagged unsafe for them): last, it is
    # not issue 7's
    compiled = [py, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider",
                "tests/test_backend_families.py", "-k", "cuda_graphs"]
    # poly decoding from a kept prefix state vs the direct form, Llama-8B-like heads (32 on 8, D = 128): last as well
    decode = [py, "scripts/bench_poly_decode.py", "--device", dev[1], "--dtype", dtype,
              "--heads", "4" if smoke else "32", "--kv-heads", "2" if smoke else "8", "--head-dim", str(dim[128]),
              "--lengths", "300,600" if smoke else "16384,131072,1048576", "--steps", "5" if smoke else "9",
              "--out", str(dest / f"poly-decode-{gpu}-{dtype}-d{dim[128]}.json")]
    return [
        Stage("tests", tests, 120, 30),
        Stage("bench-d128", bench(128), 200, 60),
        Stage("bench-d64", bench(64), 150, 45),
        Stage("profile", profile, 120, 30),
        Stage("model", model, 150, 60),
        Stage("targets", [py, "scripts/poly_targets.py"], 20, 5, (bench_json[128], bench_json[64])),
        Stage("compile", compiled, 90, 30),
        Stage("decode", decode, 60, 20),
    ]


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def run_stage(cmd: list[str], limit: float, env: dict, log) -> tuple[str, int | None]:
    """Runs `cmd` in its own process group, its output copied to stdout and `log`; the group is killed after
    `limit` seconds. Returns (status, exit code)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", start_new_session=True)

    def copy():
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
        log.flush()

    reader = threading.Thread(target=copy, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=limit)
        status = "ok" if rc == 0 else "failed"
    except subprocess.TimeoutExpired:
        rc, status = None, f"timed out after {limit:.0f} s"
        for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=grace)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
    reader.join(timeout=5)
    return status, rc


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results/gpu", help="output folder")
    p.add_argument("--seconds", type=float, default=420.0, help="deadline for all stages together")
    p.add_argument("--only", default="", help="comma list of stages to run (default: all, in order)")
    p.add_argument("--smoke", action="store_true", help="the same stages on the CPU at toy sizes (a plumbing check)")
    a = p.parse_args(argv)
    t0 = time.monotonic()
    dest = Path(a.out).resolve()
    dest.mkdir(parents=True, exist_ok=True)
    gpu, about = machine()
    if gpu == "cpu" and not a.smoke:
        raise SystemExit("gpu_session.py needs a CUDA GPU (--smoke runs its plumbing on the CPU)")
    plan = stages(a.smoke, dest, gpu)
    names = [s.name for s in plan]
    only = [x for x in a.only.split(",") if x]
    unknown = sorted(set(only) - set(names))
    if unknown:
        raise SystemExit(f"--only: unknown stage(s) {unknown}; choose from {', '.join(names)}")
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    if not a.smoke:
        env["TRITON_INTERPRET"] = "0"  # compiled kernels (the test suite interprets them without a GPU)
    summary = {"gpu": gpu, "machine": about, "deadline_s": a.seconds, "stages": []}
    with open(dest / "session.log", "a") as log:

        def say(text):
            sys.stdout.write(text)
            log.write(text)
            log.flush()

        say(f"gpu_session.py at {time.strftime('%Y-%m-%d %H:%M:%S')}: {about}\n")
        for stage in plan:
            if only and stage.name not in only:
                continue
            left = a.seconds - (time.monotonic() - t0) - 5  # 5 s to write what came back
            limit = min(stage.cap, left)
            cmd = stage.cmd + [str(f) for f in stage.inputs if f.exists()]
            say(f"\n===== {stage.name} (limit {limit:.0f} s): {' '.join(cmd)}\n")
            status, rc, took = None, None, 0.0
            if limit < stage.least:
                status = f"skipped: {max(left, 0):.0f} s left, needs {stage.least:.0f}"
            elif stage.inputs and len(cmd) == len(stage.cmd):
                status = "skipped: none of its inputs exists"
            else:
                start = time.monotonic()
                status, rc = run_stage(cmd, limit, env, log)
                took = time.monotonic() - start
            summary["stages"].append(dict(name=stage.name, status=status, rc=rc, seconds=round(took, 1)))
            say(f"===== {stage.name}: {status} ({took:.0f} s)\n")
            tmp = dest / "session.json.tmp"
            tmp.write_text(json.dumps(summary, indent=1))
            tmp.replace(dest / "session.json")
    files = sorted(f.name for f in dest.iterdir() if f.is_file())
    print(f"\n{len(files)} files in {dest}: {', '.join(files)} ({time.monotonic() - t0:.0f} s in all)")
    return 0 if all(s["status"] == "ok" for s in summary["stages"]) else 1


if __name__ == "__main__":
    sys.exit(main())
