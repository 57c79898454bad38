"""Text every machine has offline, a byte-level tokenizer, and the synthetic long-range probes.

* Corpus: the Python standard library's own source files (PSF licence), split by file into train and
  held-out by a hash of the path — no downloads, the same split on every machine with the same Python.
* Tokenizer: one token per UTF-8 byte (ids 0..255) plus <bos>, <eos>, <pad>; a `PreTrainedTokenizerFast`
  built from a byte-level BPE with no merges, so transformers, lm-eval and `generate` use it as usual.
* Probes: repeated passages (the loss on the second copy, at a distance far beyond a local band, is low
  only if the model reads far context) and passkey retrieval.
"""

from __future__ import annotations

import hashlib
import random
import sysconfig
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

BOS, EOS, PAD = 256, 257, 258
VOCAB = 259
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "__pycache__"}


# ------------------------------------------------------------------------------------------ corpus
@lru_cache(maxsize=4)
def stdlib_files(root: str | None = None) -> tuple[Path, ...]:
    """The library's .py files (tests, idlelib, site-packages... excluded), from `root` or this interpreter's."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = [p for p in sorted(root.rglob("*.py")) if not (set(p.relative_to(root).parts[:-1]) & _SKIP_DIRS)]
    return tuple(files)


def _split_of(path: Path) -> str:
    digest = hashlib.sha1(path.name.encode()).digest()[0]
    return "heldout" if digest % 10 == 0 else "train"


def stdlib_text(split: str = "train", max_bytes: int | None = None, root: str | None = None) -> str:
    """Concatenated source files of one split ("train" ~90 %, "heldout" ~10 %), files separated by a blank line.
    `root` reads another copy of a standard library (to train elsewhere on the same text)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    parts, size = [], 0
    for path in stdlib_files(root):
        if _split_of(path) != split:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        parts.append(text)
        size += len(text)
        if max_bytes is not None and size >= max_bytes:
            break
    return "\n\n".join(parts)


def encode(text: str) -> np.ndarray:
    """UTF-8 bytes as token ids (uint8 array)."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)


def decode(ids) -> str:
    ids = [int(i) for i in ids if int(i) < 256]
    return bytes(ids).decode("utf-8", errors="replace")


# --------------------------------------------------------------------------------------- tokenizer
def byte_tokenizer():
    """A transformers tokenizer with one token per byte (ids 0..255) and <bos>=256, <eos>=257, <pad>=258."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    # ByteLevel maps byte b to a printable char; order the vocabulary by byte value so that id == byte
    table = _bytes_to_unicode()
    vocab = {table[b]: b for b in range(256)}
    assert set(vocab) == set(byte_chars)
    vocab.update({"<bos>": BOS, "<eos>": EOS, "<pad>": PAD})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    fast.add_bos_token = False
    return fast


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what ByteLevel pre-tokenisation uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


# ------------------------------------------------------------------------------------------ probes
LETTERS = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", dtype=np.uint8)


def copy_row(source: np.ndarray, length: int, passage: int, distance: int, rng: random.Random,
             random_passage: bool = False) -> tuple[np.ndarray, int, int]:
    """A row of `length` bytes with one passage repeated: the second copy starts `distance` bytes after the
    first. Filler and passage are taken from `source` (or the passage is random letters). Returns
    (row, start of the first copy, start of the second copy)."""
    if passage + distance > length:
        raise ValueError(f"passage ({passage}) + distance ({distance}) must fit in the row ({length})")
    off = rng.randrange(0, max(1, len(source) - length))
    row = source[off : off + length].copy()
    if random_passage:
        p = LETTERS[np.array([rng.randrange(26) for _ in range(passage)])]
    else:
        poff = rng.randrange(0, max(1, len(source) - passage))
        p = source[poff : poff + passage]
    first = rng.randrange(0, length - passage - distance + 1)
    second = first + distance
    row[first : first + passage] = p
    row[second : second + passage] = p
    return row, first, second


def copy_probe(source: np.ndarray, n_rows: int, length: int, passage: int, distance: int, seed: int = 0,
               random_passage: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[n_rows, length] ids and the boolean masks [n_rows, length] of the positions predicted inside the first
    and the second copy (the loss at position t predicts token t; the first byte of each copy is excluded)."""
    rng = random.Random(seed)
    rows, m1, m2 = [], [], []
    for _ in range(n_rows):
        row, a, b = copy_row(source, length, passage, distance, rng, random_passage)
        rows.append(row)
        mask1, mask2 = np.zeros(length, bool), np.zeros(length, bool)
        mask1[a + 1 : a + passage] = True
        mask2[b + 1 : b + passage] = True
        m1.append(mask1)
        m2.append(mask2)
    return (torch.tensor(np.stack(rows), dtype=torch.long), torch.tensor(np.stack(m1)), torch.tensor(np.stack(m2)))


def passkey_prompt(source: np.ndarray, length: int, depth: float, key: str, rng: random.Random) -> tuple[np.ndarray, int]:
    """Filler text of ~`length` bytes with "the pass key is <key>." inserted at relative `depth`, ending with
    "the pass key is " so that the model must continue with the key. Returns (ids, position of the answer)."""
    needle = encode(f" the pass key is {key}. ")
    question = encode(" the pass key is ")
    filler_len = length - len(needle) - len(question)
    off = rng.randrange(0, max(1, len(source) - filler_len))
    filler = source[off : off + filler_len]
    at = int(depth * filler_len)
    ids = np.concatenate([filler[:at], needle, filler[at:], question])
    return ids, len(ids)
