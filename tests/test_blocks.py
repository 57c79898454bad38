"""Attention restricted to blocks: Llama 4's chunked layers and packed sequences. The mask function turns
transformers' composed mask into block ids, the backend unpacks the blocks into right-aligned rows (queries
the last Nq slots, as in decode and chunked prefill); both against a dense float64 reference."""

import pytest
import torch

import hf_fastattn
from hf_fastattn import backend
from hf_fastattn.ops.exact import exact_attention
from hf_fastattn.testing import WINDOW, model_pair, tiny_config

mu = pytest.importorskip("transformers.masking_utils")


def _runs(lengths_per_row, seed):
    """[B, L] block ids from run lengths per row, ids drawn at random (only changes between runs matter)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for lengths in lengths_per_row:
        ids = torch.randint(0, 1000, (len(lengths),), generator=g)
        ids[1:] += (ids[1:] == ids[:-1]).long()  # neighbouring runs differ
        rows.append(torch.repeat_interleave(ids, torch.tensor(lengths)))
    return torch.stack(rows)


def _dense_reference(q, k, v, scale, ids, valid):
    """softmax over keys j <= the query's slot, in its block, and valid; GQA by repeating K/V."""
    nq, n = q.shape[2], k.shape[2]
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    slot = torch.arange(n - nq, n)[:, None]
    see = (torch.arange(n)[None] <= slot)[None] & (ids[:, n - nq :, None] == ids[:, None, :]) & valid[:, None, :]
    s = (scale * q @ k.transpose(-1, -2)).masked_fill(~see[:, None], float("-inf"))
    return torch.softmax(s, -1).nan_to_num(0.0) @ v


@pytest.mark.parametrize("nq", [20, 9, 1], ids=["prefill", "chunked_prefill", "decode"])
def test_unpacked_blocks_equal_block_mask(nq):
    """Blocks of every length (1 .. 11, some longer than the queries), padding in two rows, GQA: unpack ->
    exact -> repack equals the dense block-diagonal causal reference on every query that has a real key."""
    lengths = [[3, 11, 6], [20], [1, 1, 7, 5, 6]]
    ids = _runs(lengths, seed=0)
    valid = torch.ones(3, 20, dtype=torch.bool)
    valid[1, :4] = False  # left padding
    valid[2, 8:10] = False  # holes inside a block
    g = torch.Generator().manual_seed(1)
    q = torch.randn(3, 4, nq, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(3, 2, 20, 8, generator=g, dtype=torch.float64) for _ in range(2))
    blocks = backend._Blocks(ids, nq, valid)
    out = blocks.repack(exact_attention(blocks.queries(q), blocks.keys(k), blocks.keys(v), 0.4,
                                        kv_valid=blocks.kv_valid))
    ref = _dense_reference(q, k, v, 0.4, ids, valid)
    real = valid[:, 20 - nq :]
    assert out.shape == q.shape
    assert (out - ref).abs().amax(dim=(1, 3))[real].max().item() < 1e-12
    # rows hold only the blocks that have queries, each right-aligned
    assert blocks.lk == max(l for row in lengths for l in _blocks_with_queries(row, nq))
    if nq == 1:
        assert blocks.lq == 1


def _blocks_with_queries(lengths, nq):
    ends = torch.tensor(lengths).cumsum(0)
    return [l for l, e in zip(lengths, ends.tolist()) if e > sum(lengths) - nq]


def test_unpacked_blocks_gradcheck():
    ids = _runs([[2, 4], [1, 5]], seed=2)
    blocks = backend._Blocks(ids, 4, None)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 2, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 1, 6, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))

    def f(q, k, v):
        return blocks.repack(exact_attention(blocks.queries(q), blocks.keys(k), blocks.keys(v), 0.5,
                                             kv_valid=blocks.kv_valid))

    assert torch.autograd.gradcheck(f, (q, k, v))


def test_mask_function_gives_chunk_ids():
    """transformers' chunked mask (chunks start at each row's first real token), with left padding, a kv offset
    (a sliding cache holding positions 5..) and a static cache's empty tail."""
    c = 4
    attn = torch.ones(2, 16, dtype=torch.long)
    attn[1, :3] = 0
    lp = torch.tensor([0, 3])
    fn = mu.chunked_causal_mask_function(c, lp)
    ids = backend.fastattn_mask(2, 3, 11, q_offset=13, kv_offset=5, attention_mask=attn, mask_function=fn)
    assert ids.dtype == torch.long and ids.shape == (2, 1, 1, 11)  # 4D: transformers passes it on untouched
    ids = ids[:, 0, 0]
    pos = torch.arange(5, 16)
    for b in range(2):
        chunk = (pos - lp[b]) // c
        assert torch.equal(ids[b] >= 0, attn[b, 5:].bool())
        same = ids[b][:, None] == ids[b][None]
        assert torch.equal(same, chunk[:, None] == chunk[None])
    # a static cache: 8 of 12 slots filled; within one chunk per row it is the plain validity mask
    ids = backend.fastattn_mask(2, 2, 12, q_offset=6, kv_offset=0, attention_mask=attn, mask_function=fn)
    assert ids.shape == (2, 1, 1, 8)
    fn1 = mu.chunked_causal_mask_function(16, lp)
    small = backend.fastattn_mask(2, 2, 12, q_offset=6, kv_offset=0, attention_mask=attn, mask_function=fn1)
    assert small.dtype == torch.bool and torch.equal(small[:, 0, 0], attn[:, :8].bool())


@pytest.mark.parametrize("builder", ["create_chunked_causal_mask", "create_causal_mask"])
def test_packed_mask_gives_sequence_ids(builder):
    """Without a cache transformers puts packing into the mask: it reaches the backend as block ids, and in a
    chunked layer the chunks restart with each sequence (transformers 5.17 counted them from the row's start)."""
    cfg = tiny_config("llama4")
    cfg._attn_implementation = "fastattn"
    pos = torch.cat([torch.arange(5), torch.arange(11)])[None]
    ids = getattr(mu, builder)(cfg, torch.zeros(1, 16, 8), None, None, pos)[:, 0, 0]  # config, embeds, mask, cache, pos
    starts = torch.ones(16, dtype=torch.bool)
    starts[1:] = ids[0, 1:] != ids[0, :-1]
    chunked = builder == "create_chunked_causal_mask"
    assert starts.nonzero().flatten().tolist() == ([0, 5, 5 + WINDOW] if chunked else [0, 5])
    assert backend.mask_parts(None) == {}


def _ids(n, seed=0):
    return torch.randint(3, 97, (2, n), generator=torch.Generator().manual_seed(seed))


def test_llama4_chunks_matter():
    """The family tests (tests/test_backend_families.py) compare Llama 4 with eager; this makes them able to fail:
    with the tiny chunk (8) eager's logits differ by O(1) from one long chunk, and fastattn follows the chunks."""
    ref, new = model_pair(tiny_config("llama4"))
    one_chunk, _ = model_pair(tiny_config("llama4", attention_chunk_size=1024))
    x = _ids(3 * WINDOW + 7)
    with torch.no_grad():
        a, b, c = ref(x).logits, new(x).logits, one_chunk(x).logits
    assert (a - c).abs().max().item() > 0.1
    assert (a - b).abs().max().item() < 1e-5


@pytest.mark.parametrize("method", ["poly", "conv"])
def test_llama4_chunked_layers_run_exactly(method):
    """Chunked layers are local (a query sees < attention_chunk_size keys): like sliding layers they run exactly
    under every method; the full NoPE layer is the one approximated. Exact on layer 1 -> eager's logits."""
    ref, new = model_pair(tiny_config("llama4"))
    hf_fastattn.configure(new, method=method, guard="off", conv_k=2, chunk_size=8, layers={1: {"method": "exact"}})
    seen = {}

    def hook(module, layer, q, k, v, kv_valid, opts):
        seen[layer] = opts["window"]

    backend._HOOKS.append(hook)
    try:
        x = _ids(3 * WINDOW + 7, seed=1)
        with torch.no_grad():
            assert (ref(x).logits - new(x).logits).abs().max().item() < 1e-5
            hf_fastattn.configure(new, replace=True, method=method, guard="off", conv_k=2, chunk_size=8)
            assert (ref(x).logits - new(x).logits).abs().max().item() > 1e-3  # layer 1 approximated
    finally:
        backend._HOOKS.remove(hook)
    assert seen[0] == WINDOW and seen[1] is None  # the unpacked chunks' keys; no window on the full layer


def test_llama4_diagnostics_mark_chunked_layers():
    from hf_fastattn.diagnostics import diagnose

    _, model = model_pair(tiny_config("llama4"))
    report = diagnose(model, _ids(40), {"poly": {"method": "poly"}}, depth_settings=[], progress=False)
    assert {h.layer for h in report.heads if h.sliding} == {0}
    assert all(h.errors["poly"] > 1e-3 for h in report.heads if h.layer == 1)
