"""Test-suite set-up.

* `TRITON_INTERPRET=1` before anything imports Triton when there is no GPU, so the Triton kernels run on CPU
  tensors (with a GPU they compile; set TRITON_INTERPRET=1 yourself to interpret there too).
* `torch.empty` / `empty_like` return NaN-filled tensors (floating dtypes), so that an op that forgets to
  write part of its output fails loudly instead of passing on whatever memory held (fla's trick).
* `gpu` marked tests are skipped without CUDA.
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
