#!/usr/bin/env python
"""Train the embedded default model: a small byte-level Llama (RoPE, GQA) on the Python standard library's
own source, with repeated passages in the mix so that it learns to copy from far context.

The checkpoint (fp16 safetensors, < 10 MB), its tokenizer and TRAINING.json (this command, the step count,
time, losses, the copy probe and per-layer attention-logit statistics) go to --out, by default the package
asset `hf_fastattn/assets/tiny-llama-bytes`, which `hf-fastattn demo` and the tests load.

    python scripts/train_tiny.py --minutes 70            # 2 CPU cores (at 31 min it copied at distance 64 and 256,
                                                         # weakly at 448: 3.47 -> 2.21 nats/byte)
    python scripts/train_tiny.py --device cuda --minutes 6.5 --batch 32 --induction-batch 128 --eval-every 500 \
        --stdlib /tmp/std/python3.11                      # what made the shipped checkpoint (see TRAINING.json)

The corpus is this interpreter's standard library unless --stdlib names another copy (the shipped model was
trained on a GPU machine from a copy of the CPython 3.11.7 library, so its held-out split is the one the
tests and the demo read here).

Copying is taught in two phases. Phase 1 (--induction-share of the time): short rows, 70 % of them a random
printable string repeated over the whole row (every later byte predictable only by copying: induction heads
form there first), 30 % text. Phase 2: full-length rows of text, rows in which a passage recurs 2-4 times with
gaps growing to most of the row, and induction rows with longer periods.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from hf_fastattn.data import BOS, EOS, PAD, VOCAB, byte_tokenizer, copy_probe, copy_row, encode, stdlib_text

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "hf_fastattn" / "assets" / "tiny-llama-bytes"


def build_config(args):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB, hidden_size=args.hidden, intermediate_size=args.hidden * 3, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, head_dim=args.hidden // args.heads,
        max_position_embeddings=8192, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, attention_dropout=0.0,
        initializer_range=0.02,
    )


ASCII = np.arange(33, 127, dtype=np.uint8)


def _text_row(text, length, rng):
    off = rng.randrange(0, len(text) - length)
    return text[off : off + length]


def induction_row(text, length, period, rng):
    """A string repeated over the whole row: every byte after the first period is predictable by copying.
    Mostly random printable ASCII (94 symbols: a one-byte match usually finds the right earlier occurrence),
    sometimes a snippet of real text."""
    if rng.random() < 0.7:
        s = ASCII[np.array([rng.randrange(len(ASCII)) for _ in range(period)])]
    else:
        s = _text_row(text, period, rng)
    return np.resize(s, length)


def far_copy_row(text, length, spread, rng):
    """Real text in which a passage (random letters or text) recurs 2-4 times, the gaps up to `spread` of the
    free room."""
    passage = rng.randint(24, 96)
    repeats = rng.randint(2, 4)
    room = length - repeats * passage
    gap_max = max(0, min(room // (repeats - 1), int(8 + spread * room)))
    donor, first, _ = copy_row(text, length, passage, passage, rng, random_passage=rng.random() < 0.6)
    p = donor[first : first + passage].copy()
    row = _text_row(text, length, rng).copy()
    gaps = [rng.randint(0, gap_max) for _ in range(repeats - 1)]
    pos = rng.randint(0, max(0, room - sum(gaps)))
    for r in range(repeats):
        row[pos : pos + passage] = p
        pos += passage + (gaps[r] if r < repeats - 1 else 0)
    return row


def sample_batch(text: np.ndarray, args, progress: float, rng: random.Random) -> torch.Tensor:
    """Phase 1 (the first --induction-share of the time): short rows, mostly induction rows with short periods
    (copying forms fastest there). Phase 2: --seq-len rows of text, far-copy rows whose gaps grow over the
    --curriculum fraction of the rest, and some induction rows with long periods."""
    if progress < args.induction_share:
        length, batch = args.induction_len, args.induction_batch
        make = [lambda: induction_row(text, length, rng.randint(6, 32), rng)] * 7 + [lambda: _text_row(text, length, rng)] * 3
        return torch.tensor(np.stack([rng.choice(make)() for _ in range(batch)]), dtype=torch.long)
    frac = min(1.0, (progress - args.induction_share) / args.curriculum)
    rows = []
    for _ in range(args.batch):
        u = rng.random()
        if u < 0.15:
            rows.append(induction_row(text, args.seq_len, rng.randint(8, int(32 + frac * (args.seq_len // 2 - 32))), rng))
        elif u < 0.15 + args.copy_fraction:
            rows.append(far_copy_row(text, args.seq_len, frac, rng))
        else:
            rows.append(_text_row(text, args.seq_len, rng))
    return torch.tensor(np.stack(rows), dtype=torch.long)


@torch.no_grad()
def evaluate(model, heldout: np.ndarray, args) -> dict:
    model.eval()
    rng = random.Random(123)
    offs = [rng.randrange(0, len(heldout) - args.seq_len) for _ in range(16)]
    x = torch.tensor(np.stack([heldout[o : o + args.seq_len] for o in offs]), dtype=torch.long, device=model.device)
    text_loss = float(model(input_ids=x, labels=x).loss)
    out = {"heldout_nats_per_byte": text_loss}
    for distance in (64, args.seq_len // 2, args.seq_len - 64):
        ids, m1, m2 = copy_probe(heldout, 16, args.seq_len, 48, distance, seed=7)
        ids, m1, m2 = ids.to(model.device), m1.to(model.device), m2.to(model.device)
        logits = model(input_ids=ids).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        out[f"copy{distance}_first"] = float(nll[m1[:, 1:]].mean())
        out[f"copy{distance}_second"] = float(nll[m2[:, 1:]].mean())
    model.train()
    return out


def logit_statistics(model, heldout: np.ndarray, seq_len: int) -> list[dict]:
    from hf_fastattn.diagnostics import diagnose

    x = torch.tensor(heldout[:seq_len][None].astype(np.int64))
    report = diagnose(model, x, {}, depth_settings=[], progress=False)
    layers = []
    for layer in range(report.num_layers):
        hs = [report.head(layer, h) for h in range(report.num_heads)]
        layers.append({"layer": layer, "max_abs_logit": max(h.logit_max for h in hs),
                       "rms_logit": [round(h.rms_logit, 2) for h in hs],
                       "entropy_nats": [round(h.entropy, 2) for h in hs]})
    return layers


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="checkpoint directory")
    p.add_argument("--minutes", type=float, default=70.0, help="wall-clock training budget")
    p.add_argument("--max-steps", type=int, default=100_000, help="stop after this many steps")
    p.add_argument("--seq-len", type=int, default=512, help="training row length (bytes)")
    p.add_argument("--batch", type=int, default=12, help="rows per step")
    p.add_argument("--hidden", type=int, default=256, help="hidden size")
    p.add_argument("--layers", type=int, default=4, help="decoder layers")
    p.add_argument("--heads", type=int, default=8, help="query heads")
    p.add_argument("--kv-heads", type=int, default=4, help="key/value heads (GQA)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (AdamW)")
    p.add_argument("--warmup", type=int, default=100, help="warm-up steps")
    p.add_argument("--copy-fraction", type=float, default=0.4, help="phase 2: share of rows with a far-repeated passage")
    p.add_argument("--curriculum", type=float, default=0.4, help="phase 2: fraction of the run over which copy gaps grow")
    p.add_argument("--induction-share", type=float, default=0.3, help="fraction of the time spent in phase 1")
    p.add_argument("--induction-len", type=int, default=128, help="phase 1 row length")
    p.add_argument("--induction-batch", type=int, default=48, help="phase 1 rows per step")
    p.add_argument("--eval-every", type=int, default=200, help="steps between evaluations")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--stdlib", default=None, help="read the corpus from this standard-library directory")
    args = p.parse_args(argv)

    from transformers import AutoModelForCausalLM

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    train, heldout = encode(stdlib_text("train", root=args.stdlib)), encode(stdlib_text("heldout", root=args.stdlib))
    source = args.stdlib or f"Python {sys.version.split()[0]} stdlib"
    print(f"corpus: {len(train) / 1e6:.1f} MB train, {len(heldout) / 1e6:.1f} MB held-out ({source})")
    torch.backends.cuda.matmul.allow_tf32 = True
    model = AutoModelForCausalLM.from_config(build_config(args), attn_implementation="sdpa").to(args.device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f} M parameters")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    other = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    budget = args.minutes * 60
    t0, step, history, tokens = time.time(), 0, [], 0
    model.train()
    while step < args.max_steps and time.time() - t0 < budget:
        progress = (time.time() - t0) / budget
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        for group in opt.param_groups:
            group["lr"] = lr
        x = sample_batch(train, args, progress, rng).to(args.device, non_blocking=True)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens += x.numel()
        if step % 25 == 0:
            el = time.time() - t0
            print(f"step {step:5d}  {el / 60:5.1f} min  loss {loss.item():.3f}  lr {lr:.2e}  {tokens / el:,.0f} tok/s", flush=True)
        if step % args.eval_every == 0:
            ev = evaluate(model, heldout, args)
            history.append({"step": step, "minutes": (time.time() - t0) / 60, **ev})
            print("  eval " + "  ".join(f"{k} {v:.3f}" for k, v in ev.items()), flush=True)
    final = evaluate(model, heldout, args)
    history.append({"step": step, "minutes": (time.time() - t0) / 60, **final})
    print("final " + "  ".join(f"{k} {v:.3f}" for k, v in final.items()))

    args.out.mkdir(parents=True, exist_ok=True)
    model.config.use_cache = True
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    model.cpu().to(torch.float16).save_pretrained(args.out, safe_serialization=True)
    model.float()
    byte_tokenizer().save_pretrained(args.out)
    stats = logit_statistics(model, heldout, args.seq_len)
    info = {
        "command": "python scripts/train_tiny.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "parameters": n_params, "steps": step, "tokens": tokens, "minutes": (time.time() - t0) / 60,
        "torch": torch.__version__, "device": device_name, "corpus": source,
        "threads": torch.get_num_threads(), "args": {k: str(v) for k, v in vars(args).items()},
        "final": final, "history": history, "attention_logits_on_heldout": stats,
    }
    (args.out / "TRAINING.json").write_text(json.dumps(info, indent=1))
    size = sum(f.stat().st_size for f in args.out.iterdir()) / 2**20
    print(f"wrote {args.out} ({size:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
