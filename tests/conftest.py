"""Test-suite set-up.

* `TRITON_INTERPRET=1` before anything imports Triton when there is no GPU, so the Triton kernels run on CPU
  tensors (with a GPU they compile; set TRITON_INTERPRET=1 yourself to interpret there too).
* `torch.empty` / `empty_like` return NaN-filled tensors (floating dtypes), so that an op that forgets to
  write part of its output fails loudly instead of passing on whatever memory held (fla's trick).
* `gpu` marked tests are skipped without CUDA.
* Shims make Triton's interpreter (3.6 - 3.9) compute bfloat16 as a GPU does, so the 16-bit kernels (the
  speed path) are tested on CPU. It keeps bf16 as uint16, and its `tl.dot` and elementwise arithmetic worked on
  those integers: the shims widen bf16 operands to float32 (exactly: a bf16 MMA accumulates in float32, and a
  bf16 product or sum is the float32 one rounded). It converted float32 to bf16 by truncation where a GPU
  rounds to nearest even (biased errors, ~2.5x a GPU's): the shim rounds as torch does.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

_empty, _empty_like = torch.empty, torch.empty_like


def _nan_fill(t):
    if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()):
        t.fill_(float("nan"))
    return t


def _nan_empty(*args, **kwargs):
    return _nan_fill(_empty(*args, **kwargs))


def _nan_empty_like(*args, **kwargs):
    return _nan_fill(_empty_like(*args, **kwargs))


torch.empty = _nan_empty
torch.empty_like = _nan_empty_like


def _interpreter_bf16():
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:  # no Triton: its tests skip
        return
    original = interpreter.InterpreterBuilder.create_dot

    def widen(h):
        if h.dtype.scalar != tl.bfloat16:
            return h
        return interpreter.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    def to_bf16(data):  # float32 -> bf16 bits, rounded to nearest even (torch's conversion)
        data = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)).to(torch.bfloat16)
        return interpreter.TensorHandle(data.view(torch.int16).numpy().view(np.uint16), tl.bfloat16)

    cast, binary = interpreter.InterpreterBuilder.cast_impl, interpreter.InterpreterBuilder.binary_op

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return to_bf16(src.data)
        return cast(self, src, dst_type)

    arithmetic = (np.add, np.subtract, np.multiply, np.divide, np.fmod, np.maximum, np.minimum, np.fmax, np.fmin)

    def binary_op(self, lhs, rhs, op):
        if lhs.dtype.scalar == tl.bfloat16 and rhs.dtype.scalar == tl.bfloat16:
            out = binary(self, widen(lhs), widen(rhs), op)  # comparisons: booleans as they are
            return to_bf16(out.data) if op in arithmetic else out
        return binary(self, lhs, rhs, op)

    interpreter.InterpreterBuilder.create_dot = create_dot
    interpreter.InterpreterBuilder.cast_impl = cast_impl
    interpreter.InterpreterBuilder.binary_op = binary_op


if os.environ.get("TRITON_INTERPRET") == "1":
    _interpreter_bf16()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seeded(request):
    """Each test draws its own random inputs, reproducibly (seeded from its node id)."""
    import zlib

    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield
