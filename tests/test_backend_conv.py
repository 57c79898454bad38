"""method="conv" through the backend: every family runs forward, backward and generate; k >= N is exact
attention end to end (padding, packing, GQA, softcap); decode extends the prefill's basis."""

import warnings

import pytest
import torch

import hf_fastattn
from hf_fastattn import backend
from hf_fastattn.testing import FAMILIES, cached_forward, model_pair, packing_error, tiny_config

N = 40


def _tokens(b, n, seed):
    return torch.randint(3, 97, (b, n), generator=torch.Generator().manual_seed(seed))


def _conv_pair(family, **options):
    ref, new = model_pair(tiny_config(family))
    hf_fastattn.configure(new, method="conv", **({"conv_k": 4} | options))
    return ref, new


@pytest.mark.parametrize("family", FAMILIES)
def test_families_forward_backward_generate(family):
    _, model = _conv_pair(family)
    model.train()
    x = _tokens(2, N, 0)
    out = model(input_ids=x, labels=x)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for n, p in model.named_parameters() if "k_proj" in n)
    model.eval()
    backend._warned.clear()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*no conv basis.*")  # decode must find the prefill's basis
        gen = model.generate(x[:, :20], attention_mask=torch.ones_like(x[:, :20]), max_new_tokens=8, do_sample=False)
    assert gen.shape == (2, 28)


@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen3"])
def test_k_at_least_n_equals_eager(family):
    """k >= N bases: every column is its own basis, i.e. exact attention — padding, GQA, softcap included."""
    ref, model = _conv_pair(family, conv_k=10_000)
    x = _tokens(2, N, 1)
    mask = torch.ones_like(x)
    mask[0, :7] = 0
    a = ref(input_ids=x, attention_mask=mask).logits
    b = model(input_ids=x, attention_mask=mask).logits
    assert (a - b)[mask.bool()].abs().max().item() < 1e-4


def test_packing_with_conv():
    _, model = _conv_pair("llama", conv_k=3)
    assert packing_error(model, [17, 25], flash_kwargs=False) < 1e-4


def test_decode_without_prefill_state_is_exact_and_says_so():
    ref, model = _conv_pair("llama")
    from transformers import DynamicCache

    x = _tokens(1, N, 2)
    cache = DynamicCache(config=ref.config)
    with torch.no_grad():
        cached_forward(ref, x[:, :-1], cache)  # the cache is filled by another model
        backend._warned.clear()
        with pytest.warns(RuntimeWarning, match="no conv basis from a prefill"):
            out = cached_forward(model, x[:, -1:], cache).logits
        expected = ref(input_ids=x).logits[:, -1:]
    assert (out - expected).abs().max().item() < 1e-4


def test_training_keeps_no_state():
    _, model = _conv_pair("llama")
    model.train()
    model(input_ids=_tokens(1, N, 3)).logits.sum().backward()
    assert not any(hasattr(m, backend._CONV_STATE) for m in model.modules())
