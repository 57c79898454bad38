#!/usr/bin/env python
"""Measure every supported family on its tiny config and (re)write model_cards/<family>.md.

For each family (random weights, 2 layers, GQA where the family has it, a sliding layer where it has one):
  * plumbing: max |logit diff| of fastattn(exact) vs eager, with padding;
  * approximation error: relative logit error vs eager for poly (W = 0 and 16) and conv (k = 4), at the
    random init's logits and at logits scaled down 4x (the bounded-entry regime);
  * CPU time of a forward + backward at N = 1024 for eager, fastattn exact, poly and conv.
The embedded model's card is written from its TRAINING.json and the headline experiment's results.

    python scripts/make_model_cards.py                # all families, ~3 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch

import hf_fastattn
from hf_fastattn.testing import FAMILIES, model_pair, shrink_logits, tiny_config

ROOT = Path(__file__).resolve().parents[1]
CARDS = ROOT / "model_cards"
FEATURES = {
    "llama": ("LlamaForCausalLM", "GQA", "no", "no"),
    "gemma": ("GemmaForCausalLM", "GQA/MQA", "no", "no"),
    "gemma2": ("Gemma2ForCausalLM", "GQA", "alternating sliding/full", "yes (attn 50, final 30)"),
    "gemma3": ("Gemma3ForCausalLM", "GQA, q/k norm", "5 sliding : 1 full", "no"),
    "mistral": ("MistralForCausalLM", "GQA", "every layer (config.sliding_window)", "no"),
    "qwen2": ("Qwen2ForCausalLM", "GQA, qkv bias", "optional (use_sliding_window)", "no"),
    "qwen3": ("Qwen3ForCausalLM", "GQA, q/k norm", "optional (use_sliding_window)", "no"),
    "gpt_oss": ("GptOssForCausalLM", "GQA, attention sinks (s_aux), MoE", "alternating sliding/full", "no"),
    "llama4": ("Llama4ForCausalLM (text)", "GQA, MoE, NoPE layers with temperature tuning",
               "chunked attention (attention_chunk_size) on RoPE layers, full on NoPE layers", "no"),
    "deepseek_v3": ("DeepseekV3ForCausalLM", "multi-head latent attention (q/k head 24 = 16 + 8 RoPE, values 12), MoE",
                    "no", "no"),
    "phi3": ("Phi3ForCausalLM", "GQA, fused qkv projection", "optional (config.sliding_window; off here)", "no"),
    "olmo2": ("Olmo2ForCausalLM", "GQA, q/k norm over all heads", "no", "no"),
    "granite": ("GraniteForCausalLM", "GQA, attention_multiplier as the logit scale", "no", "no"),
    "cohere2": ("Cohere2ForCausalLM", "GQA, parallel attention + MLP", "alternating sliding (RoPE) / full (NoPE)", "no"),
    "smollm3": ("SmolLM3ForCausalLM", "GQA, NoPE layers (no_rope_layers)", "no", "no"),
}
# family-specific lines for a card's "Known limits"
NOTES = {
    "gpt_oss": ["Attention sinks (one logit per head in every row's normaliser) run in every method, Triton included, "
                "with their gradients."],
    "deepseek_v3": ["Values narrower than queries and keys (v_head_dim != qk_head_dim) run in every method; the "
                    "output has the values' width."],
    "llama4": ["Chunked layers run exactly in every method (a query sees fewer than attention_chunk_size keys); the "
               "full NoPE layers are the ones approximated, so the error above is theirs.",
               "Pack with `use_cache=False` (as in training) or flash kwargs (`cu_seq_lens_*`): Llama 4's layers pass "
               "no `position_ids` to attention, and with a cache transformers leaves packing out of the mask, so "
               "no backend sees it (eager attends across the sequences too).",
               "Temperature tuning scales NoPE queries by their index in the row, not by `position_ids`: a packed "
               "sequence differs from itself alone under every backend (transformers' model code).",
               "transformers 5.17: a static cache fails for Llama 4 under every backend (generate passes "
               "`block_sequence_ids` to `create_chunked_causal_mask`)."],
}
SETTINGS = {"poly W=0": {"method": "poly", "local_window": 0, "chunk_size": 32},
            "poly W=16": {"method": "poly", "local_window": 16, "chunk_size": 32},
            "conv k=4": {"method": "conv", "conv_k": 4}}


def _time(fn, reps=2):
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1e3


def measure(family: str) -> dict:
    cfg = tiny_config(family)
    eager, fast = model_pair(cfg)
    x = torch.randint(3, 97, (2, 96), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(x)
    mask[1, :11] = 0
    out = {"family": family}
    with torch.no_grad():
        a = eager(input_ids=x, attention_mask=mask).logits
        b = fast(input_ids=x, attention_mask=mask).logits
    out["exact_max_diff"] = float((a - b)[mask.bool()].abs().max())
    for regime, factor in (("init", 1.0), ("small logits (q, k / 4)", 0.5)):
        e2, f2 = copy.deepcopy(eager), copy.deepcopy(fast)
        shrink_logits(e2, factor)
        shrink_logits(f2, factor)
        with torch.no_grad():
            ref = e2(input_ids=x).logits
            for name, opts in SETTINGS.items():
                hf_fastattn.configure(f2, replace=True, guard="off", **opts)
                got = f2(input_ids=x).logits
                out.setdefault("errors", {}).setdefault(regime, {})[name] = float((got - ref).norm() / ref.norm())
    long = torch.randint(3, 97, (1, 1024), generator=torch.Generator().manual_seed(1))
    times = {}
    for name, model, opts in [("eager", eager, None), ("fastattn exact", fast, {"method": "exact"}),
                              ("poly W=64", fast, {"method": "poly", "local_window": 64}),
                              ("conv k=16", fast, {"method": "conv", "conv_k": 16})]:
        if opts:
            hf_fastattn.configure(model, replace=True, guard="off", **opts)

        def step():
            model.zero_grad(set_to_none=True)
            model(input_ids=long, labels=long).loss.backward()

        times[name] = _time(step)
    out["fwd_bwd_ms_n1024"] = times
    return out


def write_family_card(m: dict, device: str) -> None:
    fam = m["family"]
    cls, gqa, sliding, softcap = FEATURES[fam]
    notes = "".join(f"\n- {line}" for line in NOTES.get(fam, ()))
    err_rows = "\n".join(
        f"| {regime} | " + " | ".join(f"{v:.2%}" for v in errs.values()) + " |" for regime, errs in m["errors"].items()
    )
    time_rows = " | ".join(f"{v:.0f}" for v in m["fwd_bwd_ms_n1024"].values())
    if max(v for errs in m["errors"].values() for v in errs.values()) < 1e-5:
        err_rows += ("\n\n(Every layer of this config slides with a window shorter than N = 96, and sliding layers are "
                     "always computed exactly: no approximation runs, hence ~0 error.)")
    text = f"""# {fam} through `fastattn`

`{cls}` with `attn_implementation="fastattn"`. Measured on a tiny random config (`hf_fastattn.testing.tiny_config("{fam}")`:
2 layers, hidden 64, 4 query heads, 2 KV heads, head_dim 16) — no weights are downloaded; the numbers show the
plumbing and the approximation behaviour, not a trained model's quality. Device: {device}.
Reproduce: `python scripts/make_model_cards.py`.

## Supported
| feature | |
| --- | --- |
| GQA | {gqa}: KV heads shared, never repeated |
| sliding layers | {sliding}: always exact (already linear in N) |
| logit softcap | {softcap}: exact in the band; the poly far part applies P to the uncapped logit (it is valid only where logits are small, where the cap is the identity) |
| padding, packing (`DataCollatorWithFlattening`), DynamicCache / static cache, gradient checkpointing | yes, tested against eager |

## Measured
fastattn `exact` vs eager, padded batch: max |logit diff| = {m['exact_max_diff']:.1e} (tests assert < 1e-5, also for gradients).

Relative logit error vs eager (B=2, N=96; poly guard off):

| regime | {' | '.join(SETTINGS)} |
| --- | {' | '.join('---' for _ in SETTINGS)} |
{err_rows}

Forward + backward of the whole tiny model at N = 1024 (ms, CPU):

| {' | '.join(m['fwd_bwd_ms_n1024'])} |
| {' | '.join('---' for _ in m['fwd_bwd_ms_n1024'])} |
| {time_rows} |

At this size the model's linear layers dominate and the Python-level chunk loop costs more than it saves;
the ops' own scaling (poly 5.2x faster than SDPA at 64k on CPU) is in `benchmarks/results/`.

## Known limits
- The polynomial method is accurate only for small logits (see `hf-fastattn diagnose`): trained models need the
  exact band, a per-head plan, or fine-tuning through the approximation.
- Conv bases fit positional (Toeplitz) heads; content heads are mostly wrong.
- Bidirectional layers (`use_bidirectional_attention`), attention dropout > 0 and `output_attentions` raise.{notes}
"""
    (CARDS / f"{fam}.md").write_text(text)


def write_embedded_card(headline: Path | None) -> None:
    from hf_fastattn.loading import EMBEDDED

    info = json.loads((EMBEDDED / "TRAINING.json").read_text())
    cfg = json.loads((EMBEDDED / "config.json").read_text())
    fin = info["final"]
    logit_rows = "\n".join(
        f"| {s['layer']} | {s['max_abs_logit']:.1f} | {', '.join(map(str, s['rms_logit']))} | {', '.join(map(str, s['entropy_nats']))} |"
        for s in info["attention_logits_on_heldout"]
    )
    copy_rows = "\n".join(
        f"| {d} | {fin[f'copy{d}_first']:.3f} | {fin[f'copy{d}_second']:.3f} |"
        for d in sorted({int(k[4:].split('_')[0]) for k in fin if k.startswith('copy')})
    )
    head = ""
    if headline and headline.exists():
        from hf_fastattn.experiment import format_table

        res = json.loads(headline.read_text())
        head = f"""
## The headline experiment

`python scripts/headline.py` ({res['config']['steps']} fine-tuning steps per arm, {res['started']}, CPU):

```
{format_table(res)}
```

How to read it:
- **The poly far part has no measured value here.** Its second-copy loss equals the band's and the first
  copy's (nothing is copied from beyond W), and its perplexity is the band's within 1 %. This model's logits
  (rms 2–11, max 30, above) are far outside the polynomial method's bounded-entry regime: degree-2 P(x) of such
  logits is a nearly uniform average of far values, which the fine-tuning cannot turn into retrieval.
- **Exact attention copies** (0.18 vs 3.36 nats/byte) and so does the diagnostics' **plan** (exact on 30/32
  heads, conv k=4 on two): copying survives the plan, and the plan's perplexity is exact's.
- **conv k=16** copies partly (2.49 vs 3.60) at a large perplexity cost (3.74 vs 2.31).
- At 4x the training length exact and the plan break down (RoPE beyond the trained positions: perplexity
  6.6); the band, and poly with it, stay at 2.45 — a window generalises in length, by construction.
- Passkey retrieval is 0 % for every arm, exact included: this model cannot do the task (it continues the
  prompt's prose instead of the key), so the copy probe is the long-range probe that discriminates.
"""
    text = f"""# tiny-llama-bytes (the embedded default model)

A byte-level Llama ({info['parameters'] / 1e6:.2f} M parameters: {cfg['num_hidden_layers']} layers, hidden
{cfg['hidden_size']}, {cfg['num_attention_heads']} query heads / {cfg['num_key_value_heads']} KV heads (GQA), head_dim
{cfg['head_dim']}, RoPE, tied embeddings; vocabulary = 256 bytes + <bos>/<eos>/<pad>), trained on the Python standard
library's own source (PSF licence, present on every machine; files split train/held-out by a hash of the name)
with repeated passages in the mix so that it learns to copy from far context. fp16 safetensors, shipped in
`hf_fastattn/assets/tiny-llama-bytes` and loaded by `hf-fastattn demo` and the tests.

Made by `{info['command']}` — {info['steps']} steps, {info['tokens'] / 1e6:.1f} M tokens, {info['minutes']:.1f} minutes on
{info.get('device', 'cpu')} (torch {info['torch']}). {info.get('note', '')}

## Quality (held-out stdlib source)
- {fin['heldout_nats_per_byte']:.3f} nats/byte on held-out text (512-byte rows).
- It copies from far context: loss on a random 48-letter passage, first vs second occurrence, the second
  `distance` bytes after the first (a model that reads only a local window cannot lower the second):

| distance | 1st copy (nats/byte) | 2nd copy |
| --- | --- | --- |
{copy_rows}

## Attention logits (held-out row of 512 bytes, all heads)
Peaked, trained attention — far outside the polynomial method's bounded-entry regime:

| layer | max abs(s q.k) | rms logit per head | entropy per head (nats) |
| --- | --- | --- | --- |
{logit_rows}
{head}
## Known limits
A 3 M-parameter byte model of Python source: it is a test bed for attention methods (it has real, peaked,
long-range attention and fits in the repository), not a useful language model.
"""
    (CARDS / "tiny-llama-bytes.md").write_text(text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", default=",".join(FAMILIES), help="comma list of families ('' for none)")
    p.add_argument("--headline", default=str(CARDS / "results" / "headline.json"), help="headline results.json")
    args = p.parse_args(argv)
    CARDS.mkdir(exist_ok=True)
    write_embedded_card(Path(args.headline))
    device = f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}"
    path = CARDS / "measurements.json"
    kept = json.loads(path.read_text())["families"] if path.exists() else []  # families not re-measured stay
    measured = {}
    for fam in filter(None, args.families.split(",")):
        m = measure(fam)
        measured[fam] = m
        write_family_card(m, device)
        print(f"{fam}: exact diff {m['exact_max_diff']:.1e}, errors {m['errors']}, ms {m['fwd_bwd_ms_n1024']}")
    rows = [measured.pop(m["family"], m) for m in kept if m["family"] in FAMILIES] + list(measured.values())
    path.write_text(json.dumps({"device": device, "families": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
