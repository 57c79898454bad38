#!/usr/bin/env bash
# What a session with a GPU owes the poly Triton kernels, in order; each part fits one 10-minute device call.
# Output goes to $OUT (the device tool's output folder) or benchmarks/results/gpu. Needs torch + triton on
# the machine (no install step: the GPU machines have them; transformers only for `model`).
#   bash scripts/gpu_checks.sh tests      the gpu-marked tests: compiled kernels vs the float64 reference, bf16
#                                         error against torch's own bf16 error
#   bash scripts/gpu_checks.sh profile    per-kernel CUDA ms at 128k tokens, D = 128, of the default schedule and
#                                         each alternative the defaults were chosen against without a GPU
#   bash scripts/gpu_checks.sh bench D    fwd and fwd+bwd against SDPA (flash), bf16, H = 16, 4k .. 1M tokens,
#                                         head dim D; JSON only (plot it here with hf_fastattn.bench.plot)
#   bash scripts/gpu_checks.sh model      training steps of a 4-layer decoder (H = 16, D = 128) at 16k .. 128k:
#                                         SDPA vs poly (states recomputed / saved) vs band; step ms, peak and
#                                         held memory (needs transformers; plot with hf_fastattn.bench_model.plot)
# bench and model rewrite their JSON after every length: a call cut off at its time limit keeps what finished.
# Then, on the CPU machine: scripts/poly_targets.py on the bench JSON (the rate each target needs beside the rate
# reached) and docs/poly-triton.md section 7.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
dest=${OUT:-benchmarks/results/gpu}
mkdir -p "$dest"
gpu() { python -c "import torch; print(torch.cuda.get_device_name().split()[1].lower())"; }  # h100, h200
case "${1:-}" in
  tests)
    python -m pytest -m gpu -q -p no:cacheprovider tests/test_ops_poly_triton.py 2>&1 | tee "$dest/gpu-tests.txt" ;;
  profile)
    # tile=16 is the default; the others undo one choice each (rows_per_block, pipelining, sweep width, the
    # key-major direct backward, tile size); save=1 keeps the states instead of the backward's second key sweep
    python scripts/profile_poly.py --n 131072 --head-dim 128 --variants tile=16 save=1 rows=1 stages_read=1 \
      stages_sweep=1 bdv_state=64 key_major=0 tile=8 2>&1 | tee "$dest/profile-$(gpu)-128k-d128.txt" ;;
  bench)
    d=${2:?usage: gpu_checks.sh bench HEAD_DIM}
    methods=sdpa+poly:chunk=64,kernel=triton+poly:chunk=64,kernel=triton,save=1
    python -c "import flash_attn" 2>/dev/null && methods=$methods+flash  # flash-attn itself, where installed
    python scripts/bench_attention.py --device cuda --dtype bf16 --heads 16 --head-dim "$d" \
      --methods "$methods" --lengths 4096,16384,65536,131072,262144,1048576 --repeats 2 \
      --quiet --no-plot --out "$dest/attention-$(gpu)-bf16-d$d.json" ;;
  model)
    python -m hf_fastattn.cli bench-model --device cuda --dtype bf16 --layers 4 --heads 16 --head-dim 128 \
      --intermediate 4096 --lengths 16384,65536,131072 --modes fwdbwd,fwd --repeats 2 \
      --arms sdpa,poly,poly:poly_save_states=true,band:local_window=128 \
      --quiet --no-plot --out "$dest/model-$(gpu)-bf16-d128.json" ;;
  *)
    echo "usage: bash scripts/gpu_checks.sh tests | profile | bench HEAD_DIM | model" >&2
    exit 2 ;;
esac
