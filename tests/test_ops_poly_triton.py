"""The fused Triton kernels of poly attention, run under TRITON_INTERPRET=1 on CPU (set in conftest.py)
against the float64 quadratic reference; the `gpu` marker runs them on CUDA, including bf16."""

import os

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed (pip install 'hf-fastattn[test]')")

from hf_fastattn.ops import stats  # noqa: E402
from hf_fastattn.ops.poly import poly_attention  # noqa: E402
from hf_fastattn.ops.poly.features import FeatureMap, poly_coefficients  # noqa: E402
from hf_fastattn.ops.poly.naive import naive_poly_attention  # noqa: E402
from hf_fastattn.ops.poly.triton import poly_triton_attention  # noqa: E402

interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="CPU tensors need TRITON_INTERPRET=1 (conftest sets it when there is no GPU)")

CASES = [
    pytest.param(1, 2, 1, 40, 40, 16, 0, None, False, id="MQA-T40-D16-W0"),
    pytest.param(2, 4, 2, 35, 50, 16, 5, 2.0, True, id="GQA-Tq35-Tk50-W5-softcap-pad"),
    pytest.param(1, 2, 2, 20, 70, 24, 20, None, True, id="T70-D24-W20>C-pad"),
    pytest.param(1, 1, 1, 33, 33, 60, 3, None, False, id="D60-T33"),
    pytest.param(1, 2, 1, 100, 100, 16, 0, None, False, id="T100-3-states"),
]


def _inputs(b, h, hkv, nq, nk, d, pad, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(b * 1000 + nq * 10 + d)
    q = torch.randn(b, h, nq, d, generator=g) * 0.5
    k = torch.randn(b, hkv, nk, d, generator=g) * 0.5
    v = torch.randn(b, hkv, nk, d, generator=g)
    valid = None
    if pad:
        valid = torch.ones(b, nk, dtype=torch.bool)
        valid[0, : nk // 4] = False
        valid[-1, -2:] = False
    return [t.to(device=device, dtype=dtype) for t in (q, k, v)], valid if valid is None else valid.to(device)


def _compare(q, k, v, valid, band, softcap, chunk, coeffs, tol_out, tol_grad, tile=8, segment=32, rows=2):
    """Small segments, so that the stored boundary states (not only the direct window) carry far keys."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = poly_triton_attention(q, k, v, 0.3, coeffs, band, chunk, softcap, valid, tile=tile, segment=segment,
                                rows_per_block=rows)
    ref = naive_poly_attention(*(t.double() for t in (q, k, v)), 0.3, coeffs, band, softcap, valid)
    do = torch.randn_like(ref)
    assert (out.double() - ref).abs().max().item() < tol_out * ref.abs().max().item()
    for a, b in zip(torch.autograd.grad(out, (q, k, v), do.to(out.dtype)), torch.autograd.grad(ref, (q, k, v), do)):
        assert (a.double() - b).abs().max().item() < tol_grad * b.abs().max().item()


@interpreted
@pytest.mark.parametrize("b, h, hkv, nq, nk, d, band, softcap, pad", CASES)
@pytest.mark.parametrize("kind", ["taylor", "fit"])
def test_triton_matches_naive_interpreted(b, h, hkv, nq, nk, d, band, softcap, pad, kind):
    (q, k, v), valid = _inputs(b, h, hkv, nq, nk, d, pad)
    _compare(q, k, v, valid, band, softcap, 16, poly_coefficients(2, kind, 2.0), 1e-5, 1e-5)


@interpreted
@pytest.mark.parametrize("dv", [8, 24])
def test_triton_value_width_of_its_own(dv):
    """Values of another width than q/k (DeepSeek's latent attention, d = 16)."""
    (q, k, _), valid = _inputs(2, 4, 2, 35, 50, 16, True)
    v = torch.randn(2, 2, 50, dv, generator=torch.Generator().manual_seed(dv))
    _compare(q, k, v, valid, 5, None, 16, poly_coefficients(2), 1e-5, 1e-5)


@interpreted
@pytest.mark.parametrize("b, h, hkv, nq, nk, d, band, softcap, pad", CASES[1:3])
def test_triton_tile16_matches_naive(b, h, hkv, nq, nk, d, band, softcap, pad):
    (q, k, v), valid = _inputs(b, h, hkv, nq, nk, d, pad)
    _compare(q, k, v, valid, band, softcap, 16, poly_coefficients(2), 1e-5, 1e-5, tile=16)
    with pytest.raises(ValueError, match="tile must be 8 or 16"):
        poly_triton_attention(q, k, v, 0.3, poly_coefficients(2), band, 16, tile=12)


@interpreted
@pytest.mark.parametrize("segment, rows, chunk", [(16, 1, 16), (64, 1, 16), (512, 2, 16), (128, 1, 64),
                                                   (128, 2, 64), (256, 1, 128)])
def test_triton_schedules_agree(segment, rows, chunk):
    """The segment length, rows per readout block and chunk are a schedule: the function must not change (512:
    no stored state at all, everything in the direct window; 64 x 2: the default readout blocks of 128 rows;
    chunk 64 / 128: the key-major backward walks each query chunk in 32-row blocks, as float32 does on a GPU,
    and its far-only blocks can start inside a chunk). Band 5 and the padded first keys put far-only (`FAR`)
    blocks with invalid keys in the direct windows."""
    (q, k, v), valid = _inputs(1, 2, 1, 290, 320, 16, True) if chunk >= 64 else _inputs(1, 2, 1, 90, 120, 16, True)
    _compare(q, k, v, valid, 5, None, chunk, poly_coefficients(2), 1e-5, 1e-5, segment=segment, rows=rows)


@interpreted
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tile", [8, 16])
def test_triton_16bit_interpreted(dtype, tile):
    """The speed path (16-bit inputs: bf16 dots, bf16 states, float32 accumulation) on CPU, through the
    conftest shim for the interpreter's bf16 dot. flash-attention's rule against a float64 reference: the error
    is at most 2x (3x for gradients) that of torch computing the same function in bf16, plus 1e-3. float16
    inputs are held to the bf16 bound too: the kernels feed their dots bf16 (fp16 states would overflow)."""
    (q, k, v), valid = _inputs(1, 4, 2, 100, 100, 24, True)
    q, k, v = (t.to(dtype).requires_grad_() for t in (q, k, v))
    args = (0.3, poly_coefficients(2), 5, 2.0, valid)
    out = poly_triton_attention(q, k, v, args[0], args[1], args[2], 16, args[3], args[4], tile=tile, segment=32)
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    bf_in = [t.detach().bfloat16().requires_grad_() for t in (q, k, v)]
    ref, bf = naive_poly_attention(*ref_in, *args), naive_poly_attention(*bf_in, *args)
    do = torch.randn_like(ref)
    assert out.dtype == dtype and out.abs().max() > 0
    assert (out.double() - ref).abs().max() <= 2 * (bf.double() - ref).abs().max() + 1e-3
    grads = zip(torch.autograd.grad(out, (q, k, v), do.to(dtype)), torch.autograd.grad(ref, ref_in, do),
                torch.autograd.grad(bf, bf_in, do.bfloat16()))
    for ours, exact, torch_bf16 in grads:
        assert (ours.double() - exact).abs().max() <= 3 * (torch_bf16.double() - exact).abs().max() + 1e-3


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=interpreted),
                                    pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("tile", [8, 16])
def test_triton_bf16_stages_match_float32(tile, device):
    """The bf16 builds of the feature-block stages multiply their tile features in bf16 (a product of two bf16
    values is exact in float32: the float32 feature rounded once) and form tile denominators on the tensor cores
    (key sweep: exact bf16 operands; readout: the float32 state split into two bf16 terms). Run on the same
    values, each stage must agree with the float32 build: denominators (float32) to 1e-5 (measured: 1e-7),
    bf16-stored numerators to bf16 rounding (measured: 2.6e-3). The outputs alone cannot show this: their bf16
    rounding is as large as the error of a transposed denominator tile (that mutation fails here, 8e-3, and
    passes the output tests). On a GPU the float32 build's numerators take TF32 products: a looser bound."""
    from hf_fastattn.ops.poly import triton as pt

    n, d, h = 160, 24, 4
    (q, k, v), _ = _inputs(1, h, 2, n, n, d, False, device=device)
    g = torch.Generator().manual_seed(7)
    do = torch.randn(1, h, n, d, generator=g).to(device)
    fa = (torch.rand(1, h, n, generator=g) + 0.5).to(device)  # far row factors
    fb = torch.randn(1, h, n, generator=g).to(device)
    valid = hasfar = torch.ones(1, n, dtype=torch.int32, device=device)
    bound = torch.zeros(1, h, n, device=device)  # the far rows' shift: any value, the same for both builds
    weights = (0.3, *poly_coefficients(2))
    res = {}
    for dt in (torch.bfloat16, torch.float32):
        qq, kk, vv, dd = (t.bfloat16().to(dt) for t in (q, k, v, do))
        p = pt._Plan(qq, kk, vv, 5, 16, tile, 32, 1)
        ta, tb = pt._tiles(p.d, tile, kk.device)
        st, sd = pt._key_states(p, kk, vv, valid, ta, tb, weights)
        _, m, den = pt._readout(p, qq, kk, vv, valid, bound, hasfar, ta, tb, st, sd, weights, 5, None)
        u, ud = pt._query_states(p, qq, dd, fa, fb, ta, tb, weights)
        assert p.ns > 2
        res[dt] = dict(s=st.float(), sd=sd, m=m, den=den, u=u.float(), ud=ud)
    ours, ref = res[torch.bfloat16], res[torch.float32]
    num = 2**-8 if device == "cpu" else 2**-7
    for name, rtol in (("sd", 1e-5), ("den", 1e-5), ("m", 1e-6), ("ud", 1e-5), ("s", num), ("u", num)):
        scale = ref[name].abs().max()
        assert scale > 0 and ours[name].shape == ref[name].shape, name
        assert (ours[name] - ref[name]).abs().max() <= rtol * scale, name


@interpreted
def test_triton_large_logits_finite():
    (q, k, v), _ = _inputs(1, 2, 2, 48, 48, 16, False)
    q, k = q * 12, k * 12  # |s q.k| in the hundreds
    _compare(q, k, v, None, 4, None, 16, poly_coefficients(2), 1e-4, 1e-3)


@interpreted
def test_triton_rows_without_far_keys_below_float32_exp_range():
    """The first real token of a left-padded row sees only itself, at logit -200: its shift e^{-m} overflows
    float32 while its far terms (a boundary state of padding, far direct blocks of padding) are 0. They must
    stay 0 in the forward and in the backward's row factors, or inf * 0 spreads NaN through dk / dv."""
    (q, k, v), _ = _inputs(1, 2, 1, 64, 64, 16, False)
    valid = torch.ones(1, 64, dtype=torch.bool)
    valid[0, :32] = False
    q[0, :, 32, 0], k[0, :, 32, 0] = 20.0 / 0.3 ** 0.5, -20.0 / 0.3 ** 0.5  # s q.k = -400 / 3 at scale 0.3
    _compare(q, k, v, valid, 4, None, 16, poly_coefficients(2), 1e-4, 1e-3, rows=1, segment=16)


@interpreted
def test_triton_saved_or_recomputed_states_agree():
    """The boundary states are a cache: recomputed in the backward (default: a layer keeps only O(N D) between
    forward and backward) or saved by the forward, the outputs and gradients must be bit-identical, the key
    sweep must run once per pass that needs it, and a second backward through the same graph (retain_graph;
    the backward frees saved states once read) must rebuild them."""
    (q, k, v), _ = _inputs(1, 2, 1, 100, 100, 16, False)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    do = torch.randn(1, 2, 100, 16)
    grads = {}
    for save in (False, True):
        stats.reset()
        out = poly_triton_attention(q, k, v, 0.3, poly_coefficients(2), 5, 16, segment=32, save_states=save)
        assert stats.COUNTS["poly_triton.key_sweep"] == 1
        first = torch.autograd.grad(out, (q, k, v), do, retain_graph=True)
        assert stats.COUNTS["poly_triton.key_sweep"] == (1 if save else 2)
        second = torch.autograd.grad(out, (q, k, v), do)
        assert stats.COUNTS["poly_triton.key_sweep"] == (2 if save else 3)
        for a, b in zip(first, second):
            assert a.abs().max() > 0 and torch.equal(a, b)
        grads[save] = (out.detach(), *first)
    for a, b in zip(grads[False], grads[True]):
        assert torch.equal(a, b)


@interpreted
def test_triton_errors_and_dispatch():
    (q, k, v), _ = _inputs(1, 2, 2, 40, 40, 16, False)
    with pytest.raises(ValueError, match="implement degree 2"):
        poly_triton_attention(q, k, v, 0.3, poly_coefficients(4), 0, 16)
    with pytest.raises(ValueError, match="power of two >= 16"):
        poly_triton_attention(q, k, v, 0.3, poly_coefficients(2), 0, 24)
    with pytest.raises(ValueError, match="segment must be 'auto' or a power of two"):
        poly_triton_attention(q, k, v, 0.3, poly_coefficients(2), 0, 16, segment=48)
    with pytest.raises(ValueError, match="rows_per_block must be 1 or 2"):
        poly_triton_attention(q, k, v, 0.3, poly_coefficients(2), 0, 16, rows_per_block=4)
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        poly_triton_attention(q.double(), k.double(), v.double(), 0.3, poly_coefficients(2), 0, 16)
    wide = [torch.randn(1, 1, 40, 256) for _ in range(3)]
    with pytest.raises(ValueError, match="head_dim > 128 need chunk_size <= 32"):
        poly_triton_attention(*wide, 0.3, poly_coefficients(2), 0, 64)
    # kernel="triton" on CPU tensors runs the interpreted kernels through the public entry point
    out = poly_attention(q, k, v, 0.3, chunk=16, kernel="triton")
    assert torch.allclose(out, poly_attention(q, k, v, 0.3, chunk=16, kernel="torch"), atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("b, h, hkv, nq, nk, d, band, softcap, pad", CASES)
def test_triton_gpu_fp32(b, h, hkv, nq, nk, d, band, softcap, pad):
    (q, k, v), valid = _inputs(b, h, hkv, nq, nk, d, pad, device="cuda")
    # fp32 tl.dot runs on TF32 tensor cores (10-bit mantissa): ~1e-3 relative, measured 1.8e-3 on an H100
    _compare(q, k, v, valid, band, softcap, 16, poly_coefficients(2), 5e-3, 5e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("n, d", [(1000, 64), (4096, 128)])
def test_triton_gpu_bf16_vs_torch_error(n, d):
    """flash-attention's rule: the kernel's bf16 error is at most 2x (3x for gradients) torch's own bf16 error
    of the same function, against a float64 reference."""
    (q, k, v), _ = _inputs(1, 4, 2, n, n, d, False, device="cuda")
    coeffs = poly_coefficients(2)
    ref = naive_poly_attention(q.double(), k.double(), v.double(), 0.3, coeffs, 64)
    ours = poly_triton_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), 0.3, coeffs, 64, 64)
    torch_bf16 = naive_poly_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), 0.3, coeffs, 64)
    assert (ours.double() - ref).abs().max() <= 2 * (torch_bf16.double() - ref).abs().max() + 1e-3


@pytest.mark.gpu
def test_triton_gpu_recomputed_states_hold_less():
    """On the GPU: with the states recomputed (default) the forward leaves only its outputs and row stats
    allocated, with save_states it also holds the states (at least `_key_states`' bytes more); the function is
    the same (the VJPs' atomic adds may reorder float32 sums: gradients agree to bf16 rounding)."""
    from hf_fastattn.ops.poly import triton as pt

    (q, k, v), _ = _inputs(1, 4, 4, 4096, 4096, 128, False, device="cuda", dtype=torch.bfloat16)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    coeffs, held, results = poly_coefficients(2), {}, {}
    for save in (False, True):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        out = poly_triton_attention(q, k, v, 0.3, coeffs, 0, 64, segment=512, save_states=save)
        held[save] = torch.cuda.memory_allocated() - before
        results[save] = (out.detach(), *torch.autograd.grad(out, (q, k, v), torch.ones_like(out)))
        del out
    p = pt._Plan(q, k, v, 0, 64, pt.BA, 512, pt.default_rows(64, q.dtype, 128))
    states = p.b * p.hkv * p.ns * p.nr * (p.dv * 2 + 4)
    assert held[True] - held[False] >= states, (held, states)
    assert torch.equal(results[False][0], results[True][0])
    for a, b in zip(results[False][1:], results[True][1:]):
        assert (a.float() - b.float()).abs().max() <= 2**-7 * b.float().abs().max()


@interpreted
@pytest.mark.parametrize("reshape, key_major", [(False, True), (True, False)])
def test_triton_tuning_knobs_agree(monkeypatch, reshape, key_major):
    """The `TUNING` knobs are schedules: gathered features with selector-matrix VJPs, value blocks narrower
    than D (D = 40 in blocks of 16: the dv loops and their masks), and the direct window's dk / dv added
    atomically from the query pass give the same function."""
    from hf_fastattn.ops.poly import triton as pt

    monkeypatch.setitem(pt.TUNING, "reshape", reshape)
    monkeypatch.setitem(pt.TUNING, "key_major", key_major)
    monkeypatch.setitem(pt.TUNING, "bdv_read", 16)
    monkeypatch.setitem(pt.TUNING, "bdv_state", 32)
    (q, k, v), valid = _inputs(1, 2, 1, 80, 96, 40, True)
    _compare(q, k, v, valid, 3, None, 16, poly_coefficients(2), 1e-5, 1e-5)


def test_launch_lowers_pipelining_to_fit_shared_memory():
    """Pipelining depth is a speed choice: `_launch` retries a launch that exceeds the GPU's shared memory
    (Triton raises before the kernel runs) with fewer stages, remembers what fit, and names the options when even
    one stage does not fit. A fake kernel needs 100 KiB per stage."""
    from triton.runtime.errors import OutOfResources

    from hf_fastattn.ops.poly import triton as pt

    class Kernel:
        __name__ = "_fake"

        def __init__(self, limit):
            self.limit, self.stages = limit, []

        def __getitem__(self, grid):
            def run(*args, num_stages, **meta):
                self.stages.append(num_stages)
                if 100 * 1024 * num_stages > self.limit:
                    raise OutOfResources(100 * 1024 * num_stages, self.limit, "shared memory")
            return run

    x = torch.randn(3)
    h100 = Kernel(227 * 1024)
    pt._launch(h100, (1,), x, 3, num_stages=3, BT=16)
    pt._launch(h100, (1,), x, 5, num_stages=3, BT=16)
    assert h100.stages == [3, 2, 2]  # the second launch starts from what fit
    pt._launch(h100, (1,), x, num_stages=3, BT=32)  # another variant is tried afresh
    assert h100.stages[3:] == [3, 2]
    with pytest.raises(ValueError, match="_fake needs 102400 B of shared memory even unpipelined.*chunk_size"):
        pt._launch(Kernel(64 * 1024), (1,), x, num_stages=2)
    assert pt.default_rows(64, torch.bfloat16, 128) == 2
    assert pt.default_rows(128, torch.bfloat16, 128) == 1  # 2 x 128 rows do not fit even unpipelined
    assert pt.default_rows(64, torch.float32, 128) == 1


_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository


def _has_nvidia_backend():
    import importlib.util

    return importlib.util.find_spec("triton.backends.nvidia") is not None


@pytest.mark.skipif(not _has_nvidia_backend(), reason="triton has no NVIDIA backend (ptxas) to compile with")
@pytest.mark.parametrize("args, default", [
    pytest.param(["--head-dim", "64", "128"], True, id="bf16-D64,128"),
    pytest.param(["--head-dim", "128", "--dtype", "fp32"], False, id="fp32-D128"),
    pytest.param(["--head-dim", "256", "--dtype", "bf16", "fp32", "--chunk", "32"], False, id="D256-chunk32"),
    pytest.param(["--head-dim", "96", "--dtype", "fp16", "--band", "100", "--softcap", "30", "--gqa", "4",
                  "--rows", "2", "--tile", "8"], False, id="fp16-D96-softcap-GQA-rows2-tile8"),
])
def test_kernels_compile_for_sm90(args, default, tmp_path):
    """What the interpreter cannot check: every kernel launch of a forward + backward compiles for an H100
    (sm_90) with Triton's own ptxas, specialised as a real launch is, and fits its shared memory at the depth
    `_launch` would settle on. float32 at D = 128 did not fit at all until it got 1-stage readouts. At the
    default bf16 schedule every loop that loads must be software-pipelined (cp.async copies in the PTX): with
    num_stages=1 the readouts waited on every state slice they read; and no kernel may have its wgmma
    serialised by ptxas (C7515): `_fwd`'s readout behind an `if`, and the direct backward passes' zero
    accumulators, made every tensor-core MMA wait for itself."""
    import json
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=_ROOT, TRITON_DEFAULT_FP_FUSION="1")
    out = tmp_path / "report.json"
    run = subprocess.run([sys.executable, os.path.join(_ROOT, "scripts", "compile_poly.py"), *args, "--out", str(out)],
                         env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    kernels = json.loads(out.read_text())["kernels"]
    assert {r["kernel"] for r in kernels} >= {"_state_fwd", "_fwd", "_direct_bwd_q", "_far_bwd_k"}
    if default:
        assert all(r["cp_async"] > 0 and r["wgmma"] > 0 and "stages_wanted" not in r for r in kernels), kernels
        assert not [r["kernel"] for r in kernels if r["wgmma_serialized"]], kernels


def _compile_poly():
    """scripts/compile_poly.py as a module (scripts/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("compile_poly", os.path.join(_ROOT, "scripts", "compile_poly.py"))
    cp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cp)
    return cp


def test_hot_loop_model_reads_sass():
    """The static issue model on a hand-written SASS listing: an outer loop holding two inner ones; the inner
    loop with the most HGMMA work is picked (not the longer one without MMAs), and its clocks follow from the
    counts: 2 HGMMA 64x128x16 bf16 on 2 warpgroups = 4 x 262144 FLOP / 4096 per clock = 256; 11 instructions
    x 8 warps / 4 = 22 issue clocks; global loads 16 + 2 bytes x 32 lanes x 8 warps = 4608 B (LDGDEPBAR is no
    load), 1048576 / 4608 = 228 FLOP per byte."""
    lines = ["/*0000*/ MOV R1, c[0x0][0x28] ;", "/*0010*/ S2R R0, SR_TID.X ;"]
    body = ["LDS R2, [R3] ;", "LDGSTS.E.BYPASS.LTC128B.128 [R8], desc[UR4][R10.64] ;", "LDG.E.U16 R9, [R12] ;",
            "LDGDEPBAR ;", "FMUL R4, R2, R2 ;", "HGMMA.64x128x16.F32.BF16 R24, R112, gdesc[UR12], R24 ;",
            "HGMMA.64x128x16.F32.BF16 R24, R116, gdesc[UR12], R24, gsb0 ;", "WARPGROUP.DEPBAR.LE gsb0, 0x1 ;",
            "BAR.SYNC.DEFER_BLOCKING 0x0 ;", "FFMA R5, R4, R2, R5 ;"]
    addr = 0x20
    for text in body:
        lines.append(f"/*{addr:04x}*/ {text}")
        addr += 0x10
    lines.append(f"/*{addr:04x}*/ @P0 BRA 0x20 ;")  # back edge of the MMA loop (11 instructions)
    start = addr = addr + 0x10
    for _ in range(20):  # a longer loop without MMAs
        lines.append(f"/*{addr:04x}*/ FADD R6, R6, R7 ;")
        addr += 0x10
    lines.append(f"/*{addr:04x}*/ @!P1 BRA 0x{start:x} ;")
    lines.append(f"/*{addr + 0x10:04x}*/ @P2 BRA 0x20 ;")  # the outer loop around both
    cp = _compile_poly()
    row = cp.hot_loop("\n".join(lines), warps=8)
    assert row == {"loop_insts": 11, "loop_mma_clk": 256, "loop_issue_clk": 22, "mma_bound": 100, "loop_bar": 1,
                   "loop_fp32": 2, "loop_red": 0, "loop_flop_per_byte": 228}, row
    assert cp.hot_loop("/*0000*/ EXIT ;", warps=4) == {}  # no loop: no row


def test_peak_memory_at_1m_tokens_fits_an_h100():
    """Allocation-level peak of one bf16 forward + backward (B = 1, H = 16, D = 128) on the meta device, kernels
    captured, not run: the layout with float32 [N, D + 1] partials and a torch epilogue needed 125 GiB at 1M
    tokens (out of memory on the H100), this one must stay well inside 80 GB and grow at most linearly. The same
    accounting gave 73.1 / 22.1 GiB for the old kernels at D = 64, 1M / 256k, where the H100 measured ~71 / ~22."""
    cp = _compile_poly()
    runs = {n: cp.peak_memory(128, torch.bfloat16, n, 16, 16, None, 64) for n in (2**18, 2**20)}
    gib = {n: t.peak / 2**30 for n, t in runs.items()}
    assert gib[2**20] < 64, gib
    assert gib[2**20] < 4.4 * gib[2**18], gib  # no N^2 term: a quadratic one would give 16x
    # between forward and backward (per layer, in a model) only q, k, v, out (4 GiB each) and a few floats per row
    # stay: the boundary states (9.1 GiB here) are recomputed unless save_states
    assert runs[2**20].held / 2**30 < 16.6, runs[2**20].held / 2**30
    saved = cp.peak_memory(128, torch.bfloat16, 2**20, 16, 16, None, 64, save_states=True)
    assert saved.held - runs[2**20].held > 9 * 2**30 and saved.peak == runs[2**20].peak


@interpreted
def test_backend_poly_save_states_reaches_the_kernels(monkeypatch):
    """`poly_save_states` in the model's fastattn config selects saved vs recomputed states in every layer's
    kernels (counted key sweeps), and the loss gradient does not depend on it."""
    import hf_fastattn
    from hf_fastattn.ops.poly import triton as pt
    from hf_fastattn.testing import model_pair, tiny_config

    monkeypatch.setattr(pt, "auto_segment", lambda *a, **k: 32)  # 40 tokens in 3 chunks: 2 boundary states

    x = torch.randint(3, 97, (1, 40), generator=torch.Generator().manual_seed(5))
    grads = {}
    for save in (False, True):
        _, model = model_pair(tiny_config("llama"))
        hf_fastattn.configure(model, method="poly", chunk_size=16, kernel="triton", guard="off",
                              poly_save_states=save)
        stats.reset()
        model(input_ids=x, labels=x).loss.backward()
        layers = model.config.num_hidden_layers
        assert stats.COUNTS["poly_triton.forward"] == layers
        assert stats.COUNTS["poly_triton.key_sweep"] == layers * (1 if save else 2)
        grads[save] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    assert grads[False].abs().max() > 0 and torch.equal(grads[False], grads[True])


def test_state_budget_follows_the_gpu(monkeypatch):
    """`segment="auto"` keeps the boundary states under an eighth of a GPU smaller than an H100 (a 24 GB card
    gets 3 GiB and so longer segments), never more than STATE_BUDGET; the benchmark's FLOP count follows the
    same segment and counts the backward's second key sweep unless the states are saved."""
    import argparse

    from hf_fastattn.bench import flop_count
    from hf_fastattn.ops.poly import triton as pt

    class Props:
        total_memory = 24 * 2**30

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props)
    assert pt.state_budget("cpu") == pt.STATE_BUDGET and pt.state_budget("meta") == pt.STATE_BUDGET
    assert pt.state_budget("cuda:0") == 3 * 2**30
    n = 2**18
    small, full = (pt.auto_segment(1, 16, n, 128, 128, 64, 16, 2, budget) for budget in (3 * 2**30, pt.STATE_BUDGET))
    assert small == 4 * full  # 256k tokens: 2048-token segments in 3 GiB, 512 in 10
    Props.total_memory = 200 * 2**30
    assert pt.state_budget("cuda") == pt.STATE_BUDGET
    args = argparse.Namespace(device="cpu", dtype="bf16", degree=2, band=0, chunk=64, kernel="triton")
    count = {save: flop_count(f"poly:chunk=64,save={save}", 1, 16, 16, n, 128, "fwdbwd", args) for save in (0, 1)}
    r = FeatureMap.get(128, 2).r  # the benchmark counts the torch path's features, as for every poly schedule
    assert count[0] - count[1] == pytest.approx(16 * 2.0 * r * 128 * n)  # one [r, N] x [N, D] product per head
