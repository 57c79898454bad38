"""Diagnostics and planning: the report's numbers are the ones computed directly; planted heads get the right
method; mixed plans run (and, when every setting is exact by construction, equal eager exactly)."""

import json
import math

import pytest
import torch

import hf_fastattn
from hf_fastattn import backend
from hf_fastattn.diagnostics import (
    DEFAULT_SETTINGS,
    HeadStats,
    Report,
    clone_with_plan,
    diagnose,
    evaluate_plan,
    layer_stats,
    plan,
    plan_summary,
    predicted_vs_realised,
)
from hf_fastattn.ops.conv import conv_attention
from hf_fastattn.ops.exact import naive_attention
from hf_fastattn.ops.poly import poly_coefficients
from hf_fastattn.ops.poly.naive import naive_poly_attention
from hf_fastattn.testing import FAMILIES, model_pair, tiny_config

SMALL = {k: DEFAULT_SETTINGS[k] for k in ("poly-d2-w0", "poly-d2-w64", "conv-k4", "conv-k16")}


def _tokens(b, n, seed):
    return torch.randint(3, 97, (b, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["poly-d2-w64", "conv-k16"])
def test_report_errors_equal_direct_computation(name):
    """The measured error of a setting (poly with a band, conv with an even basis) is the head's relative output
    error against exact attention on the captured inputs, computed here by the op itself."""
    _, model = model_pair(tiny_config("llama"))
    x = _tokens(2, 96, 0)
    report = diagnose(model, x, {name: SMALL[name]}, depth_settings=[], progress=False)
    captured = {}

    def hook(module, layer, q, k, v, kv_valid, opts):
        captured[layer] = (q, k, v, opts)

    backend._HOOKS.append(hook)
    try:
        hf_fastattn.configure(model, method="exact")
        with torch.no_grad():
            model(input_ids=x, use_cache=False)
    finally:
        backend._HOOKS.remove(hook)
    q, k, v, opts = captured[1]
    ref = naive_attention(q, k, v, opts["scale"])
    if name.startswith("poly"):
        out = naive_poly_attention(q, k, v, opts["scale"], poly_coefficients(2), 64)
    else:
        out = conv_attention(q, k, v, opts["scale"], k_bases=16, placement="even")
    head = 3
    direct = ((out - ref)[:, head].norm() / ref[:, head].norm()).item()
    assert direct > 1e-4  # an approximation, not exact by construction
    assert math.isclose(report.head(1, head).errors[name], direct, rel_tol=1e-4)
    logits = opts["scale"] * q[:, head] @ k[:, head // 2].transpose(-1, -2)
    causal = torch.ones(96, 96, dtype=torch.bool).tril()
    assert math.isclose(report.head(1, head).logit_max, logits.abs()[:, causal].max().item(), rel_tol=1e-5)
    assert report.head(1, head).q_inf == pytest.approx(math.sqrt(opts["scale"]) * q[:, head].abs().max().item())


def test_report_outputs(tmp_path):
    _, model = model_pair(tiny_config("gemma2"))
    report = diagnose(model, _tokens(1, 40, 1), SMALL, depth_settings=["poly-d2-w0"], progress=False)
    assert report.head(0, 0).sliding and report.head(0, 0).errors["poly-d2-w0"] == 0.0  # sliding: exact
    assert not report.head(1, 0).sliding and report.head(1, 0).errors["poly-d2-w0"] > 0
    text = report.table()
    assert "max|sqk|" in text and "poly-d2-w0" in text and "end to end" in text
    report.save_json(tmp_path / "r.json")
    again = Report.load_json(tmp_path / "r.json")
    assert again.head(1, 2).errors == report.head(1, 2).errors
    report.heatmap(tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 1000
    rows = report.depth["poly-d2-w0"]
    assert [r["layers"] for r in rows] == [1, 2] and all(r["grad_rel_err"] >= 0 for r in rows)
    json.dumps(report.to_dict())


def _planted_model():
    """Llama, MHA: layer 0 head 0 positional (q, k constant before RoPE: Toeplitz scores), layer 0 head 1
    bounded (logits of rms ~0.15), every other head a random head with wide logits."""
    cfg = tiny_config("llama", num_key_value_heads=4, attention_bias=True, num_hidden_layers=2)
    ref, model = model_pair(cfg)
    d = cfg.head_dim
    with torch.no_grad():
        for m in (ref, model):
            attn = m.model.layers[0].self_attn
            g = torch.Generator().manual_seed(7)
            for proj in (attn.q_proj, attn.k_proj):
                proj.weight[:d] = 0.0  # head 0: constant content
                proj.bias[:d] = 3.0 * torch.randn(d, generator=g)
                proj.weight[d : 2 * d] *= 0.15  # head 1: small logits
                proj.bias[d : 2 * d] = 0.0
    return ref, model


def test_planted_heads_get_the_right_method():
    ref, model = _planted_model()
    x = _tokens(2, 160, 2)
    report = diagnose(model, x, SMALL, depth_settings=[], progress=False)
    p = plan(report, budget=0.01)
    heads0 = p["layers"]["0"]
    assert heads0[0].startswith("conv") and heads0[1].startswith("poly")
    assert heads0[2:] == ["exact", "exact"] and p["layers"]["1"] == ["exact"] * 4
    assert report.head(0, 0).errors["conv-k4"] < 1e-5  # exactly 1-conv
    hf_fastattn.configure(model, replace=True, plan=p)
    held_out = _tokens(2, 160, 3)
    a, b = ref(input_ids=held_out).logits, model(input_ids=held_out).logits
    assert ((a - b).norm() / a.norm()).item() <= 0.01
    realised = evaluate_plan(model, p, held_out)
    assert realised["logit_rel_err"] <= 0.01 and realised["per_head"]["0.1"] <= 0.02
    assert "predicted" in predicted_vs_realised(report, p, realised) and "conv" in plan_summary(p)


def test_plan_rejects_uninformative_settings_and_bad_budget():
    _, model = model_pair(tiny_config("llama"))
    report = diagnose(model, _tokens(1, 48, 4), {"poly-w64": {"method": "poly", "local_window": 64}},
                      depth_settings=[], progress=False)
    assert all(h.errors["poly-w64"] == pytest.approx(0, abs=1e-6) for h in report.heads)  # band covers all 48
    assert set(plan(report, 0.5)["settings"]) == {"exact"}  # ... so it is never chosen
    with pytest.raises(ValueError, match="budget must be a positive"):
        plan(report, 0)


@pytest.mark.parametrize("sliding, feasible, expected",
                         [(False, True, "poly-d4-w0"), (False, False, "exact"), (True, True, "exact")])
def test_plan_skips_infeasible_settings_and_sliding_heads(sliding, feasible, expected):
    """A setting over the feature cap is never planned, nor is any approximation on a sliding head, however small
    its measured error (d = 8: degree 4 is cheaper than exact at 8192 tokens)."""
    head = HeadStats(layer=0, head=0, sliding=sliding, logit_max=0.1, q_inf=0.1, k_inf=0.1, entropy=1.0,
                     rms_logit=0.01, errors={"poly-d4-w0": 1e-4}, feasible={"poly-d4-w0": feasible})
    report = Report([head], {}, {"settings": {"poly-d4-w0": DEFAULT_SETTINGS["poly-d4-w0"]},
                                 "tokens_per_row": 512, "head_dim": 8})
    assert plan(report, 0.05)["layers"]["0"] == [expected]


def test_layer_errors_leave_out_padding_rows():
    """A padded row's output is undefined in every backend, so the measured error sums real rows only."""
    q, k, v = torch.randn(2, 4, 24, 16), torch.randn(2, 2, 24, 16), torch.randn(2, 2, 24, 16)
    valid = torch.ones(2, 24, dtype=torch.bool)
    valid[1, -6:] = False  # right padding: rows that still produce (meaningless) outputs
    _, sums = layer_stats(q, k, v, valid, dict(scale=0.25, window=None, softcap=None),
                          {"c": {"method": "conv", "conv_k": 4}}, 0)
    ref = naive_attention(q, k, v, 0.25, kv_valid=valid)
    out = conv_attention(q, k, v, 0.25, k_bases=4, kv_valid=valid)
    rows = valid[:, None, :, None]
    assert torch.allclose(sums["err_sq"]["c"], (((out - ref) * rows) ** 2).sum((0, 2, 3)), rtol=1e-5)
    assert ((out - ref)[~rows.expand_as(out)] ** 2).sum() > 1e-3 * sums["err_sq"]["c"].sum()  # padding would show


def _round_robin_plan(cfg, settings):
    names = list(settings)
    layers = {str(i): [names[(i + h) % len(names)] for h in range(cfg.num_attention_heads)]
              for i in range(cfg.num_hidden_layers)}
    return {"settings": settings, "layers": layers}


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_plan_runs_everything(family):
    cfg = tiny_config(family)
    _, model = model_pair(cfg)
    settings = {"exact": {"method": "exact"}, "p": {"method": "poly", "local_window": 4, "chunk_size": 8},
                "c": {"method": "conv", "conv_k": 4}}
    hf_fastattn.configure(model, guard="off", plan=_round_robin_plan(cfg, settings))
    model.train()
    x = _tokens(2, 40, 5)
    out = model(input_ids=x, labels=x)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    model.eval()
    gen = model.generate(x[:, :16], attention_mask=torch.ones_like(x[:, :16]), max_new_tokens=6, do_sample=False)
    assert gen.shape == (2, 22)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2"])
def test_mixed_plan_of_exact_equivalents_equals_eager(family):
    """Every setting is exact by construction (band / basis covering all tokens): the grouping, the partial
    GQA groups and the scatter back must then reproduce eager attention."""
    cfg = tiny_config(family)
    ref, model = model_pair(cfg)
    settings = {"exact": {"method": "exact"}, "p": {"method": "poly", "local_window": 1000},
                "c": {"method": "conv", "conv_k": 1000}}
    p = _round_robin_plan(cfg, settings)
    p["layers"]["0"] = ["p", "exact", "exact", "c"]  # query heads 1 and 2 split their KV heads across groups
    hf_fastattn.configure(model, plan=p)
    x = _tokens(2, 40, 6)
    mask = torch.ones_like(x)
    mask[1, :5] = 0
    a, b = ref(input_ids=x, attention_mask=mask).logits, model(input_ids=x, attention_mask=mask).logits
    assert (a - b)[mask.bool()].abs().max().item() < 1e-4


def test_plan_roundtrip_and_validation(tmp_path):
    cfg = tiny_config("llama")
    _, model = model_pair(cfg)
    p = _round_robin_plan(cfg, {"exact": {"method": "exact"}, "c": {"method": "conv", "conv_k": 4}})
    hf_fastattn.configure(model, plan=p)
    model.save_pretrained(tmp_path)
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="fastattn")
    assert hf_fastattn.get_config(loaded.config).plan == p
    with pytest.raises(ValueError, match="names unknown settings \\['z'\\]"):
        hf_fastattn.FastAttnConfig(plan={"settings": {}, "layers": {"0": ["z"]}})
    with pytest.raises(ValueError, match="needs exactly the keys"):
        hf_fastattn.FastAttnConfig(plan={"layers": {}})
    with pytest.raises(ValueError, match="unknown option 'methd'"):
        hf_fastattn.FastAttnConfig(plan={"settings": {"x": {"methd": "poly"}}, "layers": {}})
    model.config.fastattn_config = {"plan": {"settings": {"e": {}}, "layers": {"0": ["e"] * 3}}}
    with pytest.raises(ValueError, match="lists 3 heads; the layer has 4"):
        model(input_ids=_tokens(1, 8, 0))


def test_layer_entropy_ranges_and_norms_equal_direct_computation():
    """Per head, against a loop over real query rows: the entropy is the mean over real rows (padding rows left
    out) of -sum p ln p in nats; max|s q.k| ranges over real query rows and visible real keys; |Q|_inf and |K|_inf
    are sqrt(s) max|q| over real rows and sqrt(s) max|k| over real keys of the head's own KV head (GQA); the rms
    logit is s sqrt(tr(M_q M_k)) over a sequence's real rows and keys, max over the sequences. A huge query, key or
    value in a padded slot changes no statistic (a padded query row or key once set logit_max, q_inf, k_inf and
    rms_logit: the mask hid padded keys only, and the maxima and the guard's moments ran over every slot)."""
    g = torch.Generator().manual_seed(0)
    b, h, hkv, n, d, s = 2, 4, 2, 20, 8, 0.3
    q, k, v = (torch.randn(b, heads, n, d, generator=g) for heads in (h, hkv, hkv))
    k[:, 1] *= 3.0
    valid = torch.ones(b, n, dtype=torch.bool)
    valid[0, :4] = False  # left padding
    valid[1, -5:] = False  # right padding: these rows still see real keys
    opts = dict(scale=s, window=None, softcap=None)
    settings = {"c": {"method": "conv", "conv_k": 4}, "p": {"method": "poly", "degree": 2, "local_window": 4}}
    stats, sums = layer_stats(q, k, v, valid, opts, settings, 0)
    for head in range(h):
        kh = k[:, head // 2]
        ents, top, sigmas = [], 0.0, []
        for i in range(b):
            real = valid[i].nonzero()[:, 0]
            qr, kr = q[i, head, real].double(), kh[i, real].double()
            sigmas.append(s * ((qr.T @ qr / len(real)) * (kr.T @ kr / len(real))).sum().sqrt().item())
            for t in real.tolist():
                keys = [j for j in range(t + 1) if valid[i, j]]
                x = s * kh[i, keys] @ q[i, head, t]
                p = torch.softmax(x.double(), 0)
                ents.append(-(p * p.log()).sum().item())
                top = max(top, x.abs().max().item())
        rows = valid[:, None, :].expand(b, d, n).transpose(1, 2)  # [B, N, D]
        st = stats[head]
        assert st.entropy == pytest.approx(sum(ents) / len(ents), rel=1e-4)
        assert st.logit_max == pytest.approx(top, rel=1e-5)
        assert st.q_inf == pytest.approx(math.sqrt(s) * q[:, head][rows].abs().max().item(), rel=1e-6)
        assert st.k_inf == pytest.approx(math.sqrt(s) * kh[rows].abs().max().item(), rel=1e-6)
        assert st.rms_logit == pytest.approx(max(sigmas), rel=1e-5)
    # a huge value in each kind of padded slot: left-padded key, value and query row, right-padded query row
    qp, kp, vp = q.clone(), k.clone(), v.clone()
    kp[0, :, 1] *= 100.0
    vp[0, :, 1] *= 100.0
    qp[0, :, 2] *= 100.0
    qp[1, :, -2] *= 100.0
    poisoned, psums = layer_stats(qp, kp, vp, valid, opts, settings, 0)
    for a, c in zip(poisoned, stats):
        for name in ("logit_max", "q_inf", "k_inf", "entropy", "rms_logit"):
            assert getattr(a, name) == pytest.approx(getattr(c, name), rel=1e-6), name
        assert a.predicted == pytest.approx(c.predicted, rel=1e-6)
    assert torch.allclose(psums["ref_sq"], sums["ref_sq"], rtol=1e-6)
    assert torch.allclose(psums["ent_sum"], sums["ent_sum"], rtol=1e-6) and psums["rows"] == sums["rows"]
    for name in settings:
        assert torch.allclose(psums["err_sq"][name], sums["err_sq"][name], rtol=1e-4)


def test_diagnose_pools_batches():
    """Over several batches a head's ranges are the maxima of the per-batch ones and its error is the pooled
    relative error sqrt(sum ||O_m - O||^2 / sum ||O||^2): it lies between the per-batch errors (the ratio of the
    sums of both batches, not of one batch's reference)."""
    _, model = model_pair(tiny_config("llama"))
    settings = {k: SMALL[k] for k in ("poly-d2-w0", "conv-k4")}
    x1, x2 = _tokens(1, 48, 11), _tokens(1, 48, 12)
    one, two = (diagnose(model, x, settings, depth_settings=[], progress=False) for x in (x1, x2))
    both = diagnose(model, [x1, x2], settings, depth_settings=[], progress=False)
    assert both.meta["batches"] == 2
    for hb, h1, h2 in zip(both.heads, one.heads, two.heads):
        for field in ("logit_max", "q_inf", "k_inf", "rms_logit"):
            assert getattr(hb, field) == pytest.approx(max(getattr(h1, field), getattr(h2, field)), rel=1e-6)
        for name in settings:
            lo, hi = sorted((h1.errors[name], h2.errors[name]))
            assert lo * (1 - 1e-5) <= hb.errors[name] <= hi * (1 + 1e-5)


@pytest.mark.parametrize("name, options", [("conv-k16", {"method": "conv", "conv_k": 16}),
                                           ("poly-w16", {"method": "poly", "local_window": 16})])
def test_plan_budget_is_inclusive_and_covering_settings_are_skipped(name, options):
    """A measured error equal to the budget qualifies ("<= budget"); a basis or band exactly as long as the
    measured rows (conv k = n, band = n) was exact by construction, so its zero error says nothing and the
    setting is never planned (both are cheaper than exact at 8192 tokens with d = 8)."""
    def report(tokens):
        head = HeadStats(layer=0, head=0, sliding=False, logit_max=0.1, q_inf=0.1, k_inf=0.1, entropy=1.0,
                         rms_logit=0.01, errors={name: 0.05}, feasible={name: True})
        return Report([head], {}, {"settings": {name: options}, "tokens_per_row": tokens, "head_dim": 8})

    assert plan(report(17), 0.05)["layers"]["0"] == [name]
    assert plan(report(17), 0.0499)["layers"]["0"] == ["exact"]
    assert plan(report(16), 0.05)["layers"]["0"] == ["exact"]


def test_setting_costs_agree_with_the_benchmark_count():
    """The planner's cost model is the benchmark's FLOP count (one head, forward, torch chunk path): a band adds
    its chunks (even a band of one key), a conv basis costs (D + 1) FFTs of length 2N, causal exact attention
    2 N^2 D (the planner once took half that, and so refused linear settings up to twice as cheap as exact); a
    band covering every token runs exact attention and costs what exact does; a sliding window 4 N W D."""
    import argparse

    from hf_fastattn.bench import flop_count
    from hf_fastattn.diagnostics import setting_cost

    args = argparse.Namespace(device="cpu", dtype="fp32", degree=2, band=0, chunk=128, kernel="torch", conv_k=16)
    n, d = 4096, 16
    for band in (0, 1, 64, 300):
        for degree in (2, 4):
            cost = setting_cost({"method": "poly", "degree": degree, "local_window": band}, n, d)
            assert cost == pytest.approx(flop_count(f"poly:degree={degree},band={band}", 1, 1, 1, n, d, "fwd", args))
    for kb in (4, 64):
        assert setting_cost({"method": "conv", "conv_k": kb}, n, d) == pytest.approx(
            flop_count(f"conv:k={kb}", 1, 1, 1, n, d, "fwd", args))
    exact = setting_cost({"method": "exact"}, n, d)
    assert exact == flop_count("exact", 1, 1, 1, n, d, "fwd", args) == 2.0 * n * n * d  # causal: half of 4 N^2 D
    assert setting_cost({"method": "poly", "local_window": n}, n, d) == exact
    assert setting_cost({"method": "band", "local_window": 64}, n, d) == 4.0 * n * 64 * d


def test_evaluate_plan_end_to_end_numbers_equal_direct_computation():
    """evaluate_plan's end-to-end numbers against the two models run directly: the logits' relative error
    ||L_plan - L|| / ||L|| (a norm ratio, not its square) and the language-model losses, with padded tokens
    left out of the labels."""
    cfg = tiny_config("llama")
    _, model = model_pair(cfg)
    p = _round_robin_plan(cfg, {"exact": {"method": "exact"}, "c": {"method": "conv", "conv_k": 4}})
    x = _tokens(2, 40, 13)
    mask = torch.ones_like(x)
    mask[0, -6:] = 0  # right padding (a left-padded row's first label is predicted from a padding row)
    realised = evaluate_plan(model, p, {"input_ids": x, "attention_mask": mask})
    exact, planned = model_pair(cfg)[1], model_pair(cfg)[1]
    hf_fastattn.configure(exact, method="exact")
    hf_fastattn.configure(planned, guard="off", plan=p)
    labels = x.masked_fill(mask == 0, -100)
    with torch.no_grad():
        a = exact(input_ids=x, attention_mask=mask, labels=labels)
        b = planned(input_ids=x, attention_mask=mask, labels=labels)
    rel = ((b.logits - a.logits).norm() / a.logits.norm()).item()
    assert 1e-4 < rel and realised["logit_rel_err"] == pytest.approx(rel, rel=1e-3)
    assert realised["loss_exact"] == pytest.approx(a.loss.item(), rel=1e-5)
    assert realised["loss_plan"] == pytest.approx(b.loss.item(), rel=1e-5)


def test_plan_covering_is_decided_on_the_longest_real_row():
    """A band or basis covering every *real* token was exact by construction, whatever the padded width: rows of
    24 (left padded) and 20 (right padded) real tokens in a batch 40 wide, a band of 32 and a basis of 28 lie
    between the two. The plan (and the measured errors) must be those of the same rows run unpadded, where both
    settings cover their rows and are never planned; the padded width once decided, and planned them."""
    _, model = model_pair(tiny_config("llama"))
    settings = {"poly-w32": {"method": "poly", "local_window": 32}, "conv-k28": {"method": "conv", "conv_k": 28}}
    x = _tokens(2, 40, 41)
    mask = torch.ones_like(x)
    mask[0, :16] = 0  # left padding: 24 real tokens
    mask[1, 20:] = 0  # right padding: 20 real tokens
    positions = (mask.cumsum(-1) - 1).clamp_min(0)  # the real tokens at the positions they have unpadded
    padded = diagnose(model, {"input_ids": x, "attention_mask": mask, "position_ids": positions}, settings,
                      depth_settings=[], progress=False)
    rows = [x[0:1, 16:], x[1:2, :20]]
    unpadded = diagnose(model, rows, settings, depth_settings=[], progress=False)
    assert padded.meta["tokens_per_row"] == unpadded.meta["tokens_per_row"] == 24
    assert padded.meta["padded_width"] == 40
    for hp, hu in zip(padded.heads, unpadded.heads):
        for s in settings:
            assert hp.errors[s] == pytest.approx(hu.errors[s], abs=1e-5)
    for budget in (0.01, 0.5):
        assert plan(padded, budget) == plan(unpadded, budget)
        assert set(plan(padded, budget)["settings"]) == {"exact"}


def test_evaluate_plan_reference_keeps_attention_sinks():
    """GPT-OSS sinks (s_aux) are part of the exact attention evaluate_plan compares against: a plan of exact heads
    realises no error, and a conv plan realises the errors diagnose measured on the same inputs (the reference
    once dropped the sinks, so exact heads showed a sizable error)."""
    cfg = tiny_config("gpt_oss")
    _, model = model_pair(cfg)  # sinks ~ N(0, 2): dropping them changes the attention by O(1)
    x = _tokens(2, 24, 42)
    exact = _round_robin_plan(cfg, {"exact": {"method": "exact"}})
    realised = evaluate_plan(model, exact, x)
    assert set(realised["per_head"]) == {f"1.{h}" for h in range(cfg.num_attention_heads)}  # layer 0 is sliding
    assert max(realised["per_head"].values()) < 1e-5
    assert realised["logit_rel_err"] < 1e-5
    conv = {"exact": {"method": "exact"}, "c": {"method": "conv", "conv_k": 4}}
    p = {"settings": conv, "layers": {"0": ["exact"] * 4, "1": ["c"] * 4}}
    report = diagnose(model, x, {"c": conv["c"]}, depth_settings=[], progress=False)
    realised = evaluate_plan(model, p, x)
    for h in range(cfg.num_attention_heads):
        assert report.head(1, h).errors["c"] > 1e-4
        assert realised["per_head"][f"1.{h}"] == pytest.approx(report.head(1, h).errors["c"], rel=1e-4)


def test_clone_with_plan_leaves_the_previous_configuration_behind():
    """The clone runs the plan on default options, as diagnose measured its settings: the model's own method,
    degree, chunk size and per-layer overrides do not leak into it (they once did: degree 4 ran the plan's
    degree-2 setting). The original keeps its configuration."""
    cfg = tiny_config("llama")
    _, model = model_pair(cfg)
    hf_fastattn.configure(model, method="poly", degree=4, chunk_size=8, guard="off", layers={1: {"local_window": 9}})
    before = hf_fastattn.get_config(model.config).to_dict()
    p = _round_robin_plan(cfg, {"exact": {"method": "exact"}, "p": {"method": "poly", "local_window": 4}})
    clone = clone_with_plan(model, p)
    assert hf_fastattn.get_config(clone.config).to_dict() == hf_fastattn.FastAttnConfig(plan=p).to_dict()
    assert hf_fastattn.get_config(clone.config).setting("p").degree == 2
    assert hf_fastattn.get_config(model.config).to_dict() == before
    fresh = model_pair(cfg)[1]
    hf_fastattn.configure(fresh, replace=True, plan=p)
    x = _tokens(2, 24, 43)
    with torch.no_grad():
        a, b = fresh(input_ids=x).logits, clone(input_ids=x).logits
    assert (a - b).abs().max().item() < 1e-5


def test_diagnose_pools_entropy_over_all_real_rows():
    """A head's entropy over several batches is the mean over all their real rows (weighted by rows, padding left
    out): two batches (1 row, then 2 rows with right padding) give what the concatenated batch gives, not the
    first batch's value nor an unweighted mean of the batches."""
    _, model = model_pair(tiny_config("llama"))
    settings = {"conv-k4": SMALL["conv-k4"]}
    x1, x2 = _tokens(1, 32, 44), _tokens(2, 32, 45)
    m1, m2 = torch.ones_like(x1), torch.ones_like(x2)
    m2[1, 12:] = 0
    b1, b2 = {"input_ids": x1, "attention_mask": m1}, {"input_ids": x2, "attention_mask": m2}
    cat = {"input_ids": torch.cat([x1, x2]), "attention_mask": torch.cat([m1, m2])}
    run = lambda data: diagnose(model, data, settings, depth_settings=[], progress=False)  # noqa: E731
    one, two, both, joint = run(b1), run(b2), run([b1, b2]), run(cat)
    rows1, rows2 = 32, 32 + 12
    for h1, h2, hb, hj in zip(one.heads, two.heads, both.heads, joint.heads):
        assert hb.entropy == pytest.approx(hj.entropy, rel=1e-5)
        assert hb.entropy == pytest.approx((rows1 * h1.entropy + rows2 * h2.entropy) / (rows1 + rows2), rel=1e-5)
        assert hb.errors["conv-k4"] == pytest.approx(hj.errors["conv-k4"], rel=1e-4)
    # not vacuous: the batches' entropies differ by more than the tolerance
    assert max(abs(h1.entropy - h2.entropy) / h2.entropy for h1, h2 in zip(one.heads, two.heads)) > 1e-3


def _uneven_batches(seed):
    """Two batches of 32-token rows with different numbers of scored tokens (31, then 31 + 7 with right padding),
    and their concatenation."""
    x1, x2 = _tokens(1, 32, seed), _tokens(2, 32, seed + 1)
    m1, m2 = torch.ones_like(x1), torch.ones_like(x2)
    m2[1, 8:] = 0
    b1, b2 = {"input_ids": x1, "attention_mask": m1}, {"input_ids": x2, "attention_mask": m2}
    return b1, b2, {"input_ids": torch.cat([x1, x2]), "attention_mask": torch.cat([m1, m2])}


def test_evaluate_plan_weights_batches_by_scored_tokens():
    """The losses over several batches are means over all their scored tokens, what the concatenated batch gives
    (they were once unweighted means of the per-batch means); the errors pool the same way."""
    cfg = tiny_config("llama")
    _, model = model_pair(cfg)
    p = _round_robin_plan(cfg, {"exact": {"method": "exact"}, "c": {"method": "conv", "conv_k": 4}})
    b1, b2, cat = _uneven_batches(46)
    one, two, both, joint = (evaluate_plan(model, p, data) for data in (b1, b2, [b1, b2], cat))
    for key in ("loss_exact", "loss_plan", "logit_rel_err"):
        assert both[key] == pytest.approx(joint[key], rel=1e-5), key
    assert both["per_head"] == pytest.approx(joint["per_head"], rel=1e-4)
    # not vacuous: the unweighted mean of the batches is off by far more than the tolerance
    for key in ("loss_exact", "loss_plan"):
        assert abs((one[key] + two[key]) / 2 - joint[key]) > 1e-3 * joint[key]


def test_diagnose_pools_batches_like_the_concatenated_batch():
    """Several batches report what their concatenation reports: the depth sweep's losses and gradient errors pool
    every batch, token-weighted (it once ran the first batch only), and the maxima (logit range, entry norms, the
    per-sequence rms logit and the guard's prediction at it: worst cases, pooled as maxima) agree as well."""
    _, model = model_pair(tiny_config("llama"))
    settings = {"poly-d2-w0": SMALL["poly-d2-w0"], "conv-k4": SMALL["conv-k4"]}
    b1, b2, cat = _uneven_batches(47)
    run = lambda data: diagnose(model, data, settings, depth_settings=["conv-k4"], progress=False)  # noqa: E731
    first, both, joint = run(b1), run([b1, b2]), run(cat)
    assert both.meta["depth_batches"] == 2
    for rb, rj, r1 in zip(both.depth["conv-k4"], joint.depth["conv-k4"], first.depth["conv-k4"]):
        assert rb["layers"] == rj["layers"]
        for key in ("loss", "loss_delta", "grad_rel_err"):
            assert rb[key] == pytest.approx(rj[key], rel=1e-4, abs=1e-7), key
        assert abs(r1["loss"] - rj["loss"]) > 1e-3 * rj["loss"]  # not vacuous: the first batch alone differs
    for hb, hj in zip(both.heads, joint.heads):
        for name in ("logit_max", "q_inf", "k_inf", "rms_logit", "entropy"):
            assert getattr(hb, name) == pytest.approx(getattr(hj, name), rel=1e-5), name
        assert hb.predicted == pytest.approx(hj.predicted, rel=1e-5)
        assert hb.errors == pytest.approx(hj.errors, rel=1e-4)
    only_first = diagnose(model, [b1, b2], settings, depth_settings=["conv-k4"], depth_batches=1, progress=False)
    assert only_first.meta["depth_batches"] == 1
    for ro, r1 in zip(only_first.depth["conv-k4"], first.depth["conv-k4"]):
        assert ro == pytest.approx(r1, rel=1e-5)
