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
    err_rows = "\n".join(
        f"| {regime} | " + " | ".join(f"{v:.2%}" for v in errs.values()) + " |" for regime, errs in m["errors"].items()
    )
    time_rows = " | ".join(f"{v:.0f}" for v in m["fwd_bwd_ms_n1024"].values())
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
- Bidirectional layers (`use_bidirectional_attention`), attention dropout > 0 and `output_attentions` raise.
"""
    (CARDS / f"{fam}.md").write_text(text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", default=",".join(FAMILIES), help="comma list of families")
    args = p.parse_args(argv)
    CARDS.mkdir(exist_ok=True)
    device = f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}"
    all_m = []
    for fam in args.families.split(","):
        m = measure(fam)
        all_m.append(m)
        write_family_card(m, device)
        print(f"{fam}: exact diff {m['exact_max_diff']:.1e}, errors {m['errors']}, ms {m['fwd_bwd_ms_n1024']}")
    (CARDS / "measurements.json").write_text(json.dumps({"device": device, "families": all_m}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
