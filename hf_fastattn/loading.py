"""Loading models and text for the command line and the scripts (all offline).

Model names: "embedded" (the byte-level Llama shipped in `hf_fastattn/assets`), "tiny:<family>" (a random
2-layer model of a supported family, for smoke tests), or any local path `from_pretrained` accepts (hub
names work when the machine is online).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

EMBEDDED = Path(__file__).resolve().parent / "assets" / "tiny-llama-bytes"


class _ModTokenizer:
    """For random tiny models: bytes modulo the vocabulary (only shapes matter there)."""

    def __init__(self, vocab: int):
        self.vocab = vocab

    def __call__(self, text, **_):
        return {"input_ids": [b % self.vocab for b in text.encode("utf-8")]}


def load_model(name: str = "embedded", attn: str = "fastattn", dtype=torch.float32, device="cpu"):
    """(model, tokenizer) for a model name (see the module docstring)."""
    import hf_fastattn  # noqa: F401  (registers the backend)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name in ("", "embedded"):
        if not (EMBEDDED / "config.json").exists():
            raise FileNotFoundError(
                f"the embedded model is missing at {EMBEDDED}; build it with `python scripts/train_tiny.py`"
            )
        name = str(EMBEDDED)
    if name.startswith("tiny:"):
        from .testing import model_pair, tiny_config

        _, model = model_pair(tiny_config(name.split(":", 1)[1]), attn=attn, reference=attn)
        return model.to(device=device, dtype=dtype), _ModTokenizer(model.config.vocab_size)
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation=attn, dtype=dtype).to(device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError):
        from .data import byte_tokenizer

        tokenizer = byte_tokenizer()
    return model, tokenizer


def enable_checkpointing(model) -> None:
    """Recompute each decoder layer in the backward. transformers 5.x renamed gradient_checkpointing_enable to
    activation_checkpointing_enable (the old name warns and goes in v6); a release without the new name gets the
    old one."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()


def read_text(path: str | None, split: str = "heldout") -> str:
    """A text file, or the embedded corpus split when no file is given."""
    if path:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    from .data import stdlib_text

    return stdlib_text(split)


def tokenize(tokenizer, text: str) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] if not isinstance(tokenizer, _ModTokenizer) \
        else tokenizer(text)["input_ids"]
    return torch.tensor(np.asarray(ids, dtype=np.int64))


def windows(ids: torch.Tensor, length: int, batch: int, max_batches: int | None = None) -> list[torch.Tensor]:
    """Non-overlapping [batch, length] windows of a 1-D id tensor."""
    rows = ids[: (len(ids) // length) * length].view(-1, length)
    if len(rows) == 0:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one window of {length}")
    out = [rows[i : i + batch] for i in range(0, len(rows), batch) if len(rows[i : i + batch]) == batch] or [rows[:1]]
    return out[:max_batches] if max_batches else out
