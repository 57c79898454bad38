"""method="poly" through the backend: every family runs forward, backward and generate; small logits stay
within the stated bound of eager; padding, packing and decode are exact properties of the approximation;
the guard policies do what they say."""

import copy
import warnings

import pytest
import torch

import hf_fastattn
from hf_fastattn import backend
from hf_fastattn.config import FastAttnConfig
from hf_fastattn.ops.exact import naive_attention
from hf_fastattn.ops.poly import guard_stats, poly_coefficients
from hf_fastattn.ops.poly.naive import naive_poly_attention
from hf_fastattn.testing import FAMILIES, model_pair, packing_error, shrink_logits, tiny_config

N = 70  # several chunks of 8


def _tokens(b, n, seed):
    return torch.randint(3, 97, (b, n), generator=torch.Generator().manual_seed(seed))


def _poly_pair(family, factor=1.0, **options):
    ref, new = model_pair(tiny_config(family))
    shrink_logits(ref, factor)
    shrink_logits(new, factor)
    hf_fastattn.configure(new, method="poly", chunk_size=8, **({"guard": "off"} | options))
    return ref, new


@pytest.mark.parametrize("family", FAMILIES)
def test_families_forward_backward_generate(family):
    _, model = _poly_pair(family, local_window=4)
    model.train()
    x = _tokens(2, N, 0)
    out = model(input_ids=x, labels=x)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    grads = [p.grad for n, p in model.named_parameters() if ".self_attn." in n and "proj" in n]  # q, k, v, o
    assert grads and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    model.eval()
    gen = model.generate(x[:, :20], attention_mask=torch.ones_like(x[:, :20]), max_new_tokens=12, do_sample=False)
    assert gen.shape == (2, 32)


@pytest.mark.parametrize("family", FAMILIES)
def test_small_logits_within_stated_bound(family):
    """Stated bound: relative logit error <= sum over layers of the guard's predicted per-layer error
    (max over heads) + 1e-5 (float32 floor). Measured ratios 0.14-0.49 on these families."""
    ref, new = _poly_pair(family, factor=0.4)
    predicted = []
    real = backend._METHODS["poly"]

    def spy(q, k, v, **kw):
        if kw["window"] is None:
            predicted.append(max(guard_stats(q, k, kw["scale"], poly_coefficients(2), kw["kv_valid"]).predicted))
        return real(q, k, v, **kw)

    x = _tokens(2, N, 1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(backend._METHODS, "poly", spy)
        b = new(input_ids=x).logits
    a = ref(input_ids=x).logits
    rel = ((a - b).norm() / a.norm()).item()
    assert rel <= sum(predicted) + 1e-5
    if predicted:  # the approximation is actually in use (Mistral's layers are all sliding: exact)
        assert rel > 1e-6


def test_padding_is_exact_property():
    """A left-padded row gives the same logits as the sequence alone (keys at pads contribute nothing)."""
    _, model = _poly_pair("llama", local_window=3)
    x = _tokens(2, N, 2)
    mask = torch.ones_like(x)
    mask[0, :9] = 0
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    padded = model(input_ids=x, attention_mask=mask, position_ids=pos).logits[0, 9:]
    alone = model(input_ids=x[:1, 9:]).logits[0]
    assert (padded - alone).abs().max().item() < 1e-4


def test_packing_resets_state():
    _, model = _poly_pair("qwen2", local_window=2)
    assert packing_error(model, [30, 19, 41]) < 1e-4


def test_cached_decode_equals_recomputation():
    """Prefill uses the chunked form and decode the direct one: the same function, so greedy generation with
    a cache equals generation that recomputes the whole prefix each step."""
    _, model = _poly_pair("gemma", local_window=5)
    x = _tokens(1, 40, 3)
    kw = dict(attention_mask=torch.ones_like(x), max_new_tokens=10, do_sample=False)
    assert torch.equal(model.generate(x, use_cache=True, **kw), model.generate(x, use_cache=False, **kw))


def _decode_setup(family, n, seed, pad, new):
    """A poly model (band 1), two prompts of n tokens (the second left-padded by `pad`), generate()'s keywords."""
    _, model = _poly_pair(family, local_window=1)
    x = _tokens(2, n, seed)
    mask = torch.ones_like(x)
    mask[1, :pad] = 0
    kw = dict(attention_mask=mask, max_new_tokens=new, do_sample=False, return_dict_in_generate=True,
              output_scores=True)
    return model, x, mask, kw


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt_oss"])  # GQA; softcap + sliding layers; sinks
def test_decode_state_generates_what_the_direct_form_does(family):
    """Past r = 209 far keys (head_dim 16) decode reads them from a kept prefix state: greedy and beam search
    (which reorders the cache: the state is rebuilt) give the direct form's tokens, scores within float32 rounding;
    a training forward, reset_states and configure drop the states."""
    from hf_fastattn.ops import stats

    model, x, mask, kw = _decode_setup(family, 230, 8, pad=5, new=8)
    runs = {}
    for on in (False, True):  # the state last: it stays on the layers (configure drops kept states)
        hf_fastattn.configure(model, method="poly", chunk_size=8, guard="off", local_window=1, poly_decode_state=on)
        stats.reset()
        greedy = model.generate(x, **kw)
        beams = model.generate(x, num_beams=2, **kw)
        runs[on] = (greedy, beams, stats.COUNTS["poly.recurrent"], stats.COUNTS["poly.direct"])
    (g1, b1, rec1, _), (g0, b0, rec0, dir0) = runs[True], runs[False]
    assert rec1 > 0 and rec0 == 0 and dir0 > 0
    assert torch.equal(g1.sequences, g0.sequences) and torch.equal(b1.sequences, b0.sequences)
    for a, b in zip(g1.scores + b1.scores, g0.scores + b0.scores):
        assert (a - b).abs().max().item() < 1e-4
    def kept():
        return [n for n, m in model.named_modules() if backend._POLY_STATE in m.__dict__]

    assert kept()  # full-attention layers (sliding ones run exactly)
    model.train()
    model(input_ids=x[:, :40], labels=x[:, :40]).loss.backward()
    assert not kept()
    model.eval()
    model.generate(x, attention_mask=mask, max_new_tokens=2, do_sample=False)
    n = len(kept())
    assert n and hf_fastattn.reset_states(model) == n and not kept()
    model.generate(x, attention_mask=mask, max_new_tokens=2, do_sample=False)
    hf_fastattn.configure(model, local_window=2)  # other options: the kept states are dropped
    assert not kept()


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_prefill_hands_its_state_to_decoding(family):
    """In inference the prefill's chunk path hands its last prefix state over: greedy decoding then builds no state
    from the cache (one hand-over per full-attention layer, no rebuild), with the tokens and scores of the direct
    form, and beam search's too."""
    from hf_fastattn.ops import stats

    model, x, mask, kw = _decode_setup(family, 300, 10, pad=7, new=6)
    runs = {}
    for on in (False, True):
        hf_fastattn.configure(model, method="poly", chunk_size=64, guard="off", local_window=1, poly_decode_state=on)
        stats.reset()
        runs[on] = (model.generate(x, **kw), dict(stats.COUNTS))
    (g1, c1), (g0, c0) = runs[True], runs[False]
    layers = sum(1 for m in model.modules() if backend._POLY_STATE in m.__dict__)
    assert layers and c1.get("poly.state_from_prefill") == layers and not c1.get("poly.recurrent_build")
    assert c1["poly.recurrent"] == layers * 5 and not c0.get("poly.recurrent")
    assert torch.equal(g1.sequences, g0.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(g1.scores, g0.scores)) < 1e-4
    # beams reordered within a prompt keep the state: their absorbed (far) keys are the shared prompt's
    beams = model.generate(x, num_beams=2, **kw)
    hf_fastattn.configure(model, poly_decode_state=False)
    assert torch.equal(beams.sequences, model.generate(x, num_beams=2, **kw).sequences)


def test_decode_state_guard_sees_what_the_direct_guard_sees():
    """With the state the guard reads its key moments from it (no pass over the cache): the same statistics per
    call as the direct path's guard, and its rounding term is the state path's (float32) instead of none."""
    seen = {}
    _, model = _poly_pair("llama", local_window=1)
    x = _tokens(1, 230, 9)
    for on in (False, True):
        hf_fastattn.configure(model, guard="warn", poly_decode_state=on)
        calls = seen.setdefault(on, [])
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(backend, "_guard_allows", lambda method, stats, *a: calls.append(stats) or True)
            model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=4, do_sample=False)
    assert len(seen[True]) == len(seen[False]) > 2
    for a, b in zip(seen[True], seen[False]):
        assert a.sigma == pytest.approx(b.sigma, rel=1e-5) and a.bound == pytest.approx(b.bound, rel=1e-5)
    decode = seen[True][2:]  # after the prefill's layers
    assert all(r > 0 for st in decode for r in st.rounding) and all(r == 0 for st in seen[False][2:] for r in st.rounding)


# ---------------------------------------------------------------------------------------- guard
def test_guard_error_names_the_problem():
    _, model = _poly_pair("llama", guard="error")
    with pytest.raises(ValueError, match=r"predicted relative output error .* exceeds guard_tolerance 5.0%"):
        model(input_ids=_tokens(1, N, 4))


def test_guard_exact_falls_back_to_exact():
    ref, model = _poly_pair("llama", guard="exact")
    x = _tokens(1, N, 5)
    with pytest.warns(RuntimeWarning, match="Running exact attention instead"):
        out = model(input_ids=x).logits
    assert (out - ref(input_ids=x).logits).abs().max().item() < 1e-5


@pytest.mark.parametrize("options", [{"guard": "warn"}, {}], ids=["warn", "default"])
def test_guard_warns_once_per_layer(options):
    backend._warned.clear()
    _, model = model_pair(tiny_config("llama"))
    hf_fastattn.configure(model, method="poly", chunk_size=8, **options)  # "warn" is the default
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(input_ids=_tokens(1, N, 6))
        model(input_ids=_tokens(1, N, 7))
    layers = [str(w.message) for w in caught if "guard='warn'" in str(w.message)]
    assert len(layers) == model.config.num_hidden_layers
    assert "layer 0" in layers[0] and "|x|<=" in layers[0]
    # once per layer of each model: a second model in the same process warns too
    _, other = model_pair(tiny_config("llama"))
    hf_fastattn.configure(other, method="poly", chunk_size=8, **options)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        other(input_ids=_tokens(1, N, 6))
    assert sum("guard='warn'" in str(w.message) for w in caught) == model.config.num_hidden_layers


@pytest.mark.parametrize("method", ["exact", "poly"])
def test_autocast_reaches_the_ops_as_16_bit_inputs(method):
    """Under torch.autocast (accelerate's bf16 mixed precision) the methods get q, k, v in bf16, as SDPA would, and
    run with autocast off, so that their float32 accumulation holds (autocast would make every matmul inside bf16);
    the outputs equal the same call without autocast on bf16 inputs."""
    _, model = _poly_pair("llama", factor=0.3, local_window=4)
    hf_fastattn.configure(model, method=method)
    seen, real = [], backend._METHODS[method]

    def spy(q, k, v, **kw):
        seen.append((q.dtype, k.dtype, v.dtype, torch.is_autocast_enabled("cpu")))
        return real(q, k, v, **kw)

    x = _tokens(1, N, 13)
    with pytest.MonkeyPatch.context() as mp, torch.no_grad():
        mp.setitem(backend._METHODS, method, spy)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=x)
    assert seen and all(s == (torch.bfloat16,) * 3 + (False,) for s in seen)
    q, k, v = (torch.randn(1, 4, 40, 16) for _ in range(3))
    attn = model.model.layers[0].self_attn
    plain = backend.fastattn_attention_forward(attn, q.bfloat16(), k.bfloat16(), v.bfloat16(), None)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(backend.fastattn_attention_forward(attn, q, k, v, None)[0], plain)


def test_guard_message_names_the_layers_heads_and_the_band():
    """A plan group's warning names the layer's head numbers (not the group's indices), and says that the
    prediction leaves the exact band out where there is one, or suggests one where there is none."""
    backend._warned.clear()
    _, model = model_pair(tiny_config("llama"))
    h = model.config.num_attention_heads
    heads = ["e"] * h
    heads[1] = heads[3] = "p"
    settings = {"e": {"method": "exact"}, "p": {"method": "poly", "chunk_size": 8, "local_window": 2, "guard": "warn"}}
    hf_fastattn.configure(model, plan={"settings": settings, "layers": {0: heads}})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(input_ids=_tokens(1, N, 6))
    (msg,) = [str(w.message) for w in caught if "guard='warn'" in str(w.message)]
    assert "on 2/2 heads [h1: " in msg and ", h3: " in msg and "leaves out the exact band (local_window=2)" in msg
    backend._warned.clear()
    hf_fastattn.configure(model, replace=True, method="poly", chunk_size=8, local_window=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(input_ids=_tokens(1, N, 6))
    assert "A local_window (an exact band)" in str(caught[0].message)


def test_guard_catches_float_rounding_with_small_logits():
    """Degree 4 on heads whose logits are small but whose coordinate products (+-100) cancel: the torch chunk path's
    float32 rounding leaves nothing of the denominator (outputs many times |v|; ops test). The guard's rounding term
    sends the call to exact attention, with a warning that names it."""
    backend._warned.clear()
    sign = torch.tensor([1.0, -1.0])
    q = torch.ones(1, 1, 64, 2) + 1e-3 * torch.randn(1, 1, 64, 2)
    k = sign.repeat(1, 1, 64, 1) + 1e-3 * torch.randn(1, 1, 64, 2)
    v = torch.randn(1, 1, 64, 4)
    cfg = FastAttnConfig(method="poly", degree=4, chunk_size=8, guard="exact", kernel="torch")
    common = dict(scale=100.0, causal=True, window=None, softcap=None, kv_valid=None, layer_idx=0)
    with pytest.warns(RuntimeWarning, match="float rounding bound"):
        out = backend._METHODS["poly"](q, k, v, cfg=cfg, **common)
    assert torch.allclose(out, naive_attention(q, k, v, 100.0), atol=1e-5)


def test_guard_off_and_small_logits_are_silent():
    backend._warned.clear()
    for model in (_poly_pair("llama", guard="off")[1], _poly_pair("llama", factor=0.2, guard="warn")[1]):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model(input_ids=_tokens(1, N, 8))


@pytest.mark.parametrize("bad", ["all", "one"])
def test_non_finite_output_falls_back(monkeypatch, bad):
    import hf_fastattn.ops.poly as poly

    def broken(q, *args, **kwargs):
        if bad == "all":
            return torch.full_like(q, float("nan"))
        out = torch.randn_like(q)
        out[0, -1, -1, 0] = float("inf")  # one element of one head is enough to fall back
        return out

    ref, model = _poly_pair("llama")
    monkeypatch.setattr(poly, "poly_attention", broken)
    backend._warned.clear()
    x = _tokens(1, N, 9)
    with pytest.warns(RuntimeWarning, match="non-finite values"):
        out = model(input_ids=x).logits
    assert (out - ref(input_ids=x).logits).abs().max().item() < 1e-5


@pytest.mark.parametrize("window", [None, 3])
def test_methods_pass_softcap_and_window(window):
    """The registered method functions hand the layer's softcap and sliding window to their ops: band takes the
    narrower of the window and local_window, poly on a sliding layer is exact, and off it applies softcap in its
    band (float64 against the references)."""
    q = torch.randn(1, 4, 40, 16, dtype=torch.float64)
    k, v = torch.randn(2, 1, 2, 40, 16, dtype=torch.float64)
    s, cap = 0.25, 1.0
    common = dict(scale=s, causal=True, window=window, softcap=cap, kv_valid=None, layer_idx=0)
    band = backend._METHODS["band"](q, k, v, cfg=FastAttnConfig(method="band", local_window=6), **common)
    assert torch.allclose(band, naive_attention(q, k, v, s, True, 6 if window is None else min(window, 6), cap),
                          atol=1e-12)
    cfg = FastAttnConfig(method="poly", local_window=4, chunk_size=8, guard="off")
    poly = backend._METHODS["poly"](q, k, v, cfg=cfg, **common)
    ref = naive_attention(q, k, v, s, True, window, cap) if window else naive_poly_attention(
        q, k, v, s, poly_coefficients(2), 4, cap)
    assert torch.allclose(poly, ref, atol=1e-10)


def test_band_covering_everything_is_exact():
    ref, model = _poly_pair("llama", local_window=10_000)
    x = _tokens(2, N, 11)
    assert (model(input_ids=x).logits - ref(input_ids=x).logits).abs().max().item() < 1e-5


def test_configure_keeps_model_usable_after_copy():
    _, model = _poly_pair("llama", local_window=4)
    clone = copy.deepcopy(model)
    x = _tokens(1, N, 12)
    assert torch.equal(model(input_ids=x).logits, clone(input_ids=x).logits)
