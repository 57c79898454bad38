"""The plumbing, tested exactly: `fastattn` with method="exact" equals transformers' eager attention on every
supported family (tiny configs, no weights): padding, packing, decode, chunked prefill, static cache,
sliding windows, softcap, GQA, gradients and gradient checkpointing."""

import copy
import inspect

import pytest
import torch
from transformers import AutoModelForCausalLM, DataCollatorWithFlattening, DynamicCache

import hf_fastattn
from hf_fastattn import backend
from hf_fastattn.loading import enable_checkpointing
from hf_fastattn.testing import FAMILIES, WINDOW, cached_forward, model_pair, tiny_config

ATOL = 1e-5
N = 3 * WINDOW + 7  # longer than the sliding window, not a multiple of anything


def _tokens(b, n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 97, (b, n), generator=g)


def _grads(model):
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def _loss_and_grads(model, weights, valid, **inputs):
    model.zero_grad(set_to_none=True)
    logits = model(**inputs).logits
    (logits * weights)[valid].mean().backward()  # a mean keeps gradients O(1e-2): 1e-5 is then meaningful
    return logits.detach(), _grads(model)


def _assert_same(ref_out, new_out, valid=None):
    (la, ga), (lb, gb) = ref_out, new_out
    if valid is not None:
        la, lb = la[valid], lb[valid]
    assert (la - lb).abs().max().item() < ATOL
    assert ga.keys() == gb.keys()
    worst = max((ga[k] - gb[k]).abs().max().item() for k in ga)
    assert worst < ATOL, worst
    assert max(g.abs().max().item() for g in ga.values()) > 100 * ATOL  # the comparison is not vacuous


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request):
    return model_pair(tiny_config(request.param))


def test_registered():
    from transformers import AttentionInterface, AttentionMaskInterface

    assert "fastattn" in AttentionInterface._global_mapping
    assert "fastattn" in AttentionMaskInterface._global_mapping
    assert hf_fastattn.register() == "fastattn"  # idempotent


def test_no_padding(pair):
    ref, new = pair
    x = _tokens(2, N, 0)
    w = torch.randn(2, N, 97, generator=torch.Generator().manual_seed(1))
    valid = torch.ones(2, N, dtype=torch.bool)
    _assert_same(_loss_and_grads(ref, w, valid, input_ids=x), _loss_and_grads(new, w, valid, input_ids=x))


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding(pair, side):
    ref, new = pair
    x = _tokens(3, N, 2)
    mask = torch.ones(3, N, dtype=torch.long)
    if side == "left":
        mask[0, :5], mask[2, :11] = 0, 0
    else:
        mask[0, -5:], mask[2, -11:] = 0, 0
    w = torch.randn(3, N, 97, generator=torch.Generator().manual_seed(3))
    valid = mask.bool()  # padded rows are undefined in every backend
    _assert_same(
        _loss_and_grads(ref, w, valid, input_ids=x, attention_mask=mask),
        _loss_and_grads(new, w, valid, input_ids=x, attention_mask=mask),
        valid,
    )


def _packing_invariant(model):
    """The model itself, or a copy of it with Llama 4's temperature tuning off: that scales the queries of NoPE
    layers by their index in the row (not their position_ids), so under any backend a packed sequence differs
    from itself alone."""
    if not any(getattr(m, "attn_temperature_tuning", False) for m in model.modules()):
        return model
    model = copy.deepcopy(model)
    for m in model.modules():
        if hasattr(m, "attn_temperature_tuning"):
            m.attn_temperature_tuning = False
    return model


@pytest.mark.parametrize("flash_kwargs", [False, True], ids=["position_ids", "cu_seq_lens"])
@pytest.mark.parametrize("lengths", [[9, 2 * WINDOW + 3, 5, 1], [13, 2 * WINDOW]], ids=["4seq", "2seq"])
def test_packed_sequences(pair, flash_kwargs, lengths):
    """Packing means: each sequence as if it ran alone. The reference is eager attention on each sequence by itself
    (logits side by side, gradients summed), not eager on the packed row: some families (gpt_oss, 5.24) build their
    masks without position_ids, so their eager path attends across the packed sequences."""
    ref, new = (_packing_invariant(m) for m in pair)
    seqs = [_tokens(1, n, 10 + i)[0].tolist() for i, n in enumerate(lengths)]
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs)([{"input_ids": s} for s in seqs])
    batch.pop("labels")
    n = batch["input_ids"].shape[1]
    w = torch.randn(1, n, 97, generator=torch.Generator().manual_seed(4))
    # use_cache=False, as in training: only then does transformers put packing into its masks, and Llama 4's layers
    # pass no position_ids to attention (packing reaches the backend through the mask or cu_seq_lens)
    packed_new = _loss_and_grads(new, w, torch.ones(1, n, dtype=torch.bool), use_cache=False, **batch)
    ref.zero_grad(set_to_none=True)
    logits, start = [], 0
    for s in seqs:
        out = ref(input_ids=torch.tensor([s])).logits
        ((out * w[:, start : start + len(s)]).sum() / w.numel()).backward()  # the packed loss's mean, split
        logits.append(out.detach())
        start += len(s)
    _assert_same((torch.cat(logits, 1), _grads(ref)), packed_new)


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no_cache"])
def test_packed_rows_stay_apart(pair, use_cache):
    """Restarting position_ids in a batch of two rows (one unpacked, one packing two sequences): each sequence
    equals itself run alone, so no row's last sequence runs on into the next row's first. With a cache the
    backend finds the packing in position_ids (transformers' masks leave it out); without, in the mask too."""
    new = _packing_invariant(pair[1])
    if use_cache and new.config.model_type == "llama4_text":
        pytest.skip("Llama 4's layers pass no position_ids to attention and, with a cache, transformers keeps packing "
                    "out of the mask: no backend can see it (eager attends across the sequences too)")
    x = _tokens(2, 30, 3)
    pos = torch.stack([torch.arange(30), torch.cat([torch.arange(12), torch.arange(18)])])
    with torch.no_grad():
        packed = new(input_ids=x, position_ids=pos, use_cache=use_cache).logits
        for row, lo, hi in [(0, 0, 30), (1, 0, 12), (1, 12, 30)]:
            alone = new(input_ids=x[row : row + 1, lo:hi]).logits[0]
            assert (alone - packed[row, lo:hi]).abs().max().item() < ATOL


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no_cache"])
def test_position_gaps_are_not_packing(pair, use_cache):
    """position_ids with a gap (PoSE-style skipped positions) and an attention_mask: one sequence, as in eager
    (transformers packs only without a mask and a cache). The backend split at the gap before (logits 3.0 off)."""
    ref, new = pair
    x = _tokens(2, 24, 7)
    pos = torch.cat([torch.arange(10), torch.arange(15, 29)])[None].expand(2, -1)
    kw = dict(input_ids=x, attention_mask=torch.ones_like(x), position_ids=pos, use_cache=use_cache)
    with torch.no_grad():
        assert (ref(**kw).logits - new(**kw).logits).abs().max().item() < ATOL


def test_generate_dynamic_cache_left_padding(pair):
    ref, new = pair
    x = _tokens(2, 2 * WINDOW + 1, 5)
    mask = torch.ones_like(x)
    mask[1, :4] = 0
    kw = dict(attention_mask=mask, max_new_tokens=2 * WINDOW, do_sample=False, pad_token_id=0)
    assert torch.equal(ref.generate(x, **kw), new.generate(x, **kw))


@pytest.mark.parametrize("prompt", [WINDOW + 3, WINDOW - 2])
def test_generate_static_cache(pair, prompt):
    """generate() builds a static cache's masks ahead and the model hands that compact mask back to the mask
    function as a 2D mask; with a prompt shorter than the window the padding stays inside sliding layers' windows."""
    ref, new = pair
    import transformers.masking_utils as mu

    if (ref.config.model_type == "llama4_text"
            and "block_sequence_ids" not in inspect.signature(mu.create_chunked_causal_mask).parameters):
        pytest.skip("this transformers' generate passes block_sequence_ids to create_chunked_causal_mask, which does "
                    "not take it: a static cache fails for Llama 4 under every backend (eager too)")
    x = _tokens(2, prompt, 6)
    mask = torch.ones_like(x)
    mask[0, :3] = 0
    kw = dict(attention_mask=mask, max_new_tokens=2 * WINDOW, do_sample=False, pad_token_id=0)
    out_ref = ref.generate(x, **kw)
    assert torch.equal(out_ref, new.generate(x, cache_implementation="static", **kw))


def test_chunked_prefill_bottom_right(pair):
    """Several queries against a longer cache (Nq < Nkv), including sliding layers whose cache was trimmed."""
    ref, new = pair
    x = _tokens(2, N + 9, 7)
    outs = []
    for model in (ref, new):
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            cached_forward(model, x[:, :N], cache)
            outs.append(cached_forward(model, x[:, N:], cache).logits)
    assert (outs[0] - outs[1]).abs().max().item() < ATOL


def test_gradient_checkpointing(pair):
    ref, new = pair
    new = copy.deepcopy(new)
    enable_checkpointing(new)
    new.train()
    x = _tokens(2, N, 8)
    w = torch.randn(2, N, 97, generator=torch.Generator().manual_seed(9))
    valid = torch.ones(2, N, dtype=torch.bool)
    _assert_same(_loss_and_grads(ref, w, valid, input_ids=x), _loss_and_grads(new, w, valid, input_ids=x))


@pytest.mark.parametrize("family,method", [("llama", "exact"), ("gemma2", "exact"), ("llama", "poly"),
                                           ("llama", "conv"), ("gpt_oss", "exact"), ("gemma2", "poly")])
def test_torch_compile(family, method):
    """torch.compile(model) in training: dynamo traces none of our code but the call of the attention op (traced,
    the guard's float statistics made a layer recompile on every call), whose backward is an op too, so the only
    graph break left is the mask function's (there was one more per layer, and transformers' resumed frames
    recompiled per layer with a cache); the model around compiles, and logits and gradients equal eager."""
    from torch._dynamo.backends.registry import lookup_backend
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family), attn_implementation="fastattn")
    hf_fastattn.configure(model, method=method, local_window=4, guard="off")
    x = _tokens(2, N, 10)
    w = torch.randn(2, N, 97, generator=torch.Generator().manual_seed(11))
    mask = torch.ones_like(x)
    mask[1, :3] = 0  # left padding (the mask travels into the op; gpt_oss: the sinks' gradient comes out of it)
    valid = mask.bool()
    ref = _loss_and_grads(model, w, valid, input_ids=x, attention_mask=mask)
    traced = []

    def backend(gm, example_inputs):
        traced.extend(node.meta.get("stack_trace") or "" for node in gm.graph.nodes)
        return lookup_backend("aot_eager")(gm, example_inputs)

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend=backend)
    for _ in range(2):  # the second call reuses the compiled graphs
        model.zero_grad(set_to_none=True)
        logits = compiled(input_ids=x, attention_mask=mask).logits
        (logits * w)[valid].mean().backward()
    breaks = dict(counters["graph_break"])
    torch._dynamo.reset()
    assert not hf_fastattn.backend._GRAPHS  # every kept forward graph was used by its backward
    assert any("modeling_" in t for t in traced)  # the model itself was compiled
    # the innermost frame of every node of ours is the op's front: the call and the checks that chose it
    ours = {[f for f in t.splitlines() if f.strip().startswith("File ")][-1].split(" in ")[-1]
            for t in traced if "hf_fastattn" in t}
    assert "fastattn_attention_forward" in ours and ours <= {"fastattn_attention_forward", "_op_takes"}, ours
    # ours: the mask function's only (transformers 5.17's MoE experts break on their own in gpt_oss)
    assert any("fastattn_mask" in r for r in breaks) and not any("_attention" in r for r in breaks), breaks
    if family != "gpt_oss":
        assert all("fastattn_mask" in reason for reason in breaks), breaks
    _assert_same(ref, (logits.detach(), _grads(model)), valid)


def _graph_breaks():
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values()), counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("family,method", [("llama", "exact"), ("gemma2", "exact"), ("mistral", "exact"),
                                           ("gpt_oss", "exact"), ("qwen2_moe", "exact"), ("llama", "poly"),
                                           ("gemma2", "conv")])
def test_generate_compiled_static_cache(family, method):
    """generate()'s auto-compiled decode (a static cache): each attention call is one custom op in the graph and the
    prebuilt mask reaches the layers untouched, so a step is one graph, with no graph break; only the first grown
    mask recompiles (its length turns dynamic). With a break per layer, the resumed frames of transformers' shared
    decorator wrappers used up dynamo's recompile limit and decoding fell back to eager. Tokens equal eager
    attention's (exact) and the uncompiled run's (poly, conv: the conv basis from prefill is extended in the op)."""
    from transformers import CompileConfig

    ref, new = model_pair(tiny_config(family))
    if method != "exact":
        new = copy.deepcopy(new)
        hf_fastattn.configure(new, method=method, local_window=4, guard="off")
    x = _tokens(2, WINDOW + 3, 6)
    mask = torch.ones_like(x)
    mask[0, :3] = 0
    kw = dict(attention_mask=mask, max_new_tokens=2 * WINDOW, do_sample=False, pad_token_id=0)
    want = (ref.generate(x, **kw) if method == "exact" else new.generate(x, cache_implementation="static", **kw))
    compile_config = CompileConfig(backend="aot_eager")  # functionalises the op: its fake kernel is checked
    compile_config._compile_all_devices = True  # auto-compile is for GPUs unless told
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    got = new.generate(x, cache_implementation="static", compile_config=compile_config, **kw)
    breaks, graphs = _graph_breaks()
    torch._dynamo.reset()
    assert torch.equal(got, want)
    assert breaks == 0 and 1 <= graphs <= 2, (breaks, graphs)


def test_compiled_inference_is_one_op_per_layer():
    """torch.compile under no_grad: the attention calls are ops in the graph (the only break left is the mask
    function, once per forward), and logits equal the uncompiled model's. One compiled function run on two models
    of the same architecture (which dynamo would share a graph between) keeps each model's layers and settings:
    the layer key the op gets is guarded. The op's schema and fake kernel pass torch.library.opcheck."""
    from torch._dynamo.utils import counters

    _, model = model_pair(tiny_config("gemma2"))
    other = copy.deepcopy(model)
    hf_fastattn.configure(other, method="poly", local_window=4, guard="off")
    x = _tokens(2, N, 12)
    mask = torch.ones_like(x)
    mask[1, :4] = 0
    with torch.no_grad():
        want = [m(input_ids=x, attention_mask=mask).logits for m in (model, other)]
        torch._dynamo.reset()
        counters.clear()
        run = torch.compile(lambda m: m(input_ids=x, attention_mask=mask).logits, backend="aot_eager")
        got = [run(m) for m in (model, other)]
    reasons = " ".join(counters["graph_break"])
    torch._dynamo.reset()
    assert (want[0] - want[1]).abs().max().item() > 100 * ATOL  # the two settings differ
    assert max((g - w).abs().max().item() for g, w in zip(got, want)) < ATOL
    assert "fastattn_mask" in reasons and "_attention" not in reasons.replace("fastattn_mask", "")
    attn = model.model.layers[0].self_attn
    q, k, v = (torch.randn(2, h, 9, 16, generator=torch.Generator().manual_seed(h)) for h in (4, 2, 2))
    valid = torch.ones(2, 1, 1, 9, dtype=torch.bool)
    valid[0, ..., :2] = False
    args = (valid, backend._layer_key(attn), 0, False, 0.25, None, None, None, None)
    torch.library.opcheck(torch.ops.hf_fastattn.attention, (q, k, v, *args, False))
    # differentiated (training under torch.compile): the registered backward (an op of its own) included; not the
    # AOT comparison of outputs, which differ by design in the second, the ticket of the kept autograd graph
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.library.opcheck(torch.ops.hf_fastattn.attention, (*leaves, *args, True),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    assert not backend._GRAPHS  # a kept graph whose backward never ran goes with its ticket


@pytest.mark.parametrize("family", ["qwen2_moe", "phimoe", "gemma2", "mistral", "cohere2"])
def test_masks_moved_between_devices(family):
    """A model split over devices (accelerate's hooks move each layer's inputs to its device) hands the layers copies
    of our mask, without its tags: the window comes from the layer's config, so models whose window is only in the
    mask (Qwen2-MoE, PhiMoE) still slide, and logits equal eager with padding."""
    ref, new = model_pair(tiny_config(family))

    def move(module, args, kwargs):  # a copy, as a .to(another device) makes
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor):
            kwargs["attention_mask"] = mask.clone()
            assert not hasattr(kwargs["attention_mask"], backend._WINDOW_ATTR)
        return args, kwargs

    hooks = [layer.register_forward_pre_hook(move, with_kwargs=True) for layer in new.model.layers]
    try:
        x = _tokens(2, N, 13)
        mask = torch.ones_like(x)
        mask[0, :5] = 0
        with torch.no_grad():
            a, b = ref(input_ids=x, attention_mask=mask).logits, new(input_ids=x, attention_mask=mask).logits
    finally:
        for h in hooks:
            h.remove()
    valid = mask.bool()
    assert (a[valid] - b[valid]).abs().max().item() < ATOL


def test_masks_stay_compact(monkeypatch):
    """The backend only ever sees None or a [B, 1, 1, L] mask, with padding and with a static cache."""
    from hf_fastattn import backend

    seen = []
    real = backend.fastattn_attention_forward

    def spy(module, q, k, v, attention_mask, **kw):
        seen.append(None if attention_mask is None else tuple(attention_mask.shape))
        return real(module, q, k, v, attention_mask, **kw)

    from transformers import AttentionInterface

    monkeypatch.setitem(AttentionInterface._global_mapping, "fastattn", spy)
    _, model = model_pair(tiny_config("gemma2"))
    x = _tokens(2, N, 11)
    mask = torch.ones_like(x)
    mask[0, :3] = 0
    model(input_ids=x, attention_mask=mask)
    model.generate(x, attention_mask=mask, max_new_tokens=3, do_sample=False, cache_implementation="static", pad_token_id=0)
    assert seen and all(s is None or (len(s) == 4 and s[1:3] == (1, 1)) for s in seen)


def test_bidirectional_layer_raises():
    _, model = model_pair(tiny_config("gemma", use_bidirectional_attention=True))
    with pytest.raises(ValueError, match="causal \\(decoder\\) attention only"):
        model(input_ids=_tokens(1, 5, 0))


# ------------------------------------------------------------------------------- configuration
def test_save_load_roundtrip(tmp_path):
    _, model = model_pair(tiny_config("llama"))
    cfg = hf_fastattn.configure(model, method="exact", exact_block=16, layers={1: {"exact_block": 32}})
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="fastattn")
    got = hf_fastattn.get_config(loaded.config)
    assert got == hf_fastattn.FastAttnConfig.from_dict(cfg.to_dict())
    assert got.for_layer(1).exact_block == 32 and got.for_layer(0).exact_block == 16
    x = _tokens(1, N, 13)
    assert torch.allclose(model(input_ids=x).logits, loaded(input_ids=x).logits, atol=ATOL)


def test_configure_switches_implementation():
    ref, _ = model_pair(tiny_config("qwen3"))
    model = copy.deepcopy(ref)
    hf_fastattn.configure(model, exact_block=16)
    assert model.config._attn_implementation == "fastattn"
    x = _tokens(1, N, 14)
    assert (model(input_ids=x).logits - ref(input_ids=x).logits).abs().max().item() < ATOL


def test_layer_keys_int_or_str_are_one_layer():
    """A plan or override keyed by int (as a Python user writes it) is the one keyed by str (as JSON stores it):
    an int-keyed plan used to be accepted and then never found."""
    plan = {"settings": {"b": {"method": "band", "local_window": 2}, "e": {"method": "exact"}}, "layers": {0: ["b", "e"]}}
    as_int = hf_fastattn.FastAttnConfig(plan=plan, layers={1: {"exact_block": 8}})
    as_str = hf_fastattn.FastAttnConfig(plan={**plan, "layers": {"0": ["b", "e"]}}, layers={"1": {"exact_block": 8}})
    assert as_int == as_str and as_int.head_plan(0) == ["b", "e"] and as_int.for_layer(1).exact_block == 8
    assert hf_fastattn.FastAttnConfig.from_dict(as_int.to_dict()) == as_int


def test_configure_takes_a_config_object_whole():
    """configure(model, FastAttnConfig(...)) sets exactly that config: its default-valued fields replace what the
    model had (they used to be dropped, keeping the old method)."""
    _, model = model_pair(tiny_config("llama"))
    hf_fastattn.configure(model, method="band", local_window=3, exact_block=8)
    got = hf_fastattn.configure(model, hf_fastattn.FastAttnConfig(exact_block=16))
    assert got == hf_fastattn.FastAttnConfig(exact_block=16) == hf_fastattn.get_config(model.config)
    assert hf_fastattn.configure(model, hf_fastattn.FastAttnConfig(), guard="off").guard == "off"


@pytest.mark.parametrize(
    "options, message",
    [
        ({"method": "fast"}, "fastattn_config['method'] must be one of 'exact', 'poly', 'conv', 'band'; got 'fast'"),
        ({"guard": "maybe"}, "fastattn_config['guard'] must be one of 'warn', 'exact', 'error', 'off'"),
        ({"degree": 3}, "fastattn_config['degree'] must be even"),
        ({"degree": 0}, "fastattn_config['degree'] must be an integer >= 2"),
        ({"local_window": -1}, "fastattn_config['local_window'] must be an integer >= 0"),
        ({"chunk_size": 1.5}, "fastattn_config['chunk_size'] must be an integer >= 1"),
        ({"chunk_size": 0}, "fastattn_config['chunk_size'] must be an integer >= 1"),
        # from a mutation audit: each bound below was once accepted silently when its check was dropped
        ({"chunk_size": True}, "fastattn_config['chunk_size'] must be an integer >= 1; got True"),
        ({"conv_k": 0}, "fastattn_config['conv_k'] must be an integer >= 1; got 0"),
        ({"feature_cap": 0}, "fastattn_config['feature_cap'] must be an integer >= 1; got 0"),
        ({"exact_block": -16}, "fastattn_config['exact_block'] must be an integer >= 0; got -16"),
        ({"conv_eps": -1e-3}, "fastattn_config['conv_eps'] must be a finite number >= 0; got -0.001"),
        ({"conv_placement": "search", "conv_delta": 0.01}, "fastattn_config['conv_delta'] must exceed 2 conv_T conv_eps = 0.016"),
        ({"layers": {"-1": {}}}, "fastattn_config['layers'] keys must be layer indices (non-negative integers), got '-1'"),
        ({"guard_tolerance": float("nan")}, "fastattn_config['guard_tolerance'] must be a finite number > 0"),
        ({"poly_save_states": "yes"}, "fastattn_config['poly_save_states'] must be true or false; got 'yes'"),
        ({"conv_placement": "random"}, "fastattn_config['conv_placement'] must be one of 'search', 'even', 'geometric'"),
        ({"windw": 3}, "unknown option 'windw'; allowed options are method, guard"),
        ({"layers": {"x": {}}}, "fastattn_config['layers'] keys must be layer indices"),
        ({"layers": {0: {"method": "nope"}}}, "fastattn_config['method'] must be one of"),
        ({"layers": {0: {"plan": {}}}}, "may not set ['plan']"),
        ({"layers": {0: {"bogus": 1}}}, "fastattn_config[layers[0]]: unknown option 'bogus'"),
        ({"layers": {0: {}, "0": {}}}, "fastattn_config['layers'] names layer 0 twice"),
        ({"plan": {"settings": {"e": {}}, "layers": {1: ["e"], "1": ["e"]}}}, "['plan.layers'] names layer 1 twice"),
    ],
)
def test_bad_options(options, message):
    with pytest.raises(ValueError) as err:
        hf_fastattn.FastAttnConfig.from_dict(options)
    assert message in str(err.value)


def test_bad_option_on_model_raises_at_forward():
    _, model = model_pair(tiny_config("llama"))
    model.config.fastattn_config = {"method": "exakt"}
    with pytest.raises(ValueError, match="fastattn_config\\['method'\\] must be one of"):
        model(input_ids=_tokens(1, 5, 0))


def test_dropout_and_output_attentions_raise():
    _, model = model_pair(tiny_config("llama", attention_dropout=0.1))
    model.train()
    with pytest.raises(ValueError, match="does not implement attention dropout"):
        model(input_ids=_tokens(1, 5, 0))
    model.eval()
    model(input_ids=_tokens(1, 5, 0))  # dropout is only active in training
    with pytest.raises(ValueError, match="output_attentions=True is not supported"):
        model(input_ids=_tokens(1, 5, 0), output_attentions=True)


def test_custom_4d_mask_raises():
    _, model = model_pair(tiny_config("llama"))
    mask = torch.ones(1, 1, 5, 5, dtype=torch.bool).tril()
    with pytest.raises(ValueError, match=r"Custom \[B, 1, N_q, N_kv\] masks are not supported"):
        model(input_ids=_tokens(1, 5, 0), attention_mask=mask)


def test_mask_window_and_call_window_must_agree():
    """The window read off transformers' mask and the one the attention call passes name one window: a model
    whose two disagree is refused rather than run with either."""
    mu = pytest.importorskip("transformers.masking_utils")
    mask = backend.fastattn_mask(1, 6, 6, mask_function=mu.sliding_window_causal_mask_function(4))
    _, model = model_pair(tiny_config("mistral"))
    attn = model.model.layers[0].self_attn
    q, k = torch.randn(1, 4, 6, 16), torch.randn(1, 2, 6, 16)
    out, _ = backend.fastattn_attention_forward(attn, q, k, k, mask, sliding_window=4)
    ref, _ = backend.fastattn_attention_forward(attn, q, k, k, None, sliding_window=4)
    alone, _ = backend.fastattn_attention_forward(attn, q, k, k, mask)  # the mask's window alone is applied
    full, _ = backend.fastattn_attention_forward(attn, q, k, k, None)
    assert torch.equal(out, ref) and torch.equal(alone, ref) and (alone - full).abs().max() > 1e-2
    with pytest.raises(ValueError, match="passes sliding_window=8 but its mask was built with a window of 4"):
        backend.fastattn_attention_forward(attn, q, k, k, mask, sliding_window=8)


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["exact", "poly"])
def test_generate_compiled_cuda_graphs(method):
    """On a GPU, generate()'s default auto-compile (inductor, mode='reduce-overhead': CUDA graphs) with a static
    cache: the op is tagged unsafe for CUDA graphs, so its host-side work runs between the captured parts; tokens
    equal the uncompiled run's."""
    _, model = model_pair(tiny_config("gemma2"))
    model = model.cuda()
    hf_fastattn.configure(model, method=method, local_window=4, guard="off")
    x = _tokens(2, WINDOW + 3, 6).cuda()
    mask = torch.ones_like(x)
    mask[0, :3] = 0
    kw = dict(attention_mask=mask, max_new_tokens=2 * WINDOW, do_sample=False, pad_token_id=0,
              cache_implementation="static")
    want = model.generate(x, disable_compile=True, **kw)
    torch._dynamo.reset()
    got = model.generate(x, **kw)
    again = model.generate(x, **kw)  # replays the captured graphs
    torch._dynamo.reset()
    assert torch.equal(got, want) and torch.equal(again, want)
