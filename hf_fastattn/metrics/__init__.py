"""Metric modules shipped with the package, loadable offline with `evaluate.load(path)`."""

from pathlib import Path

PERPLEXITY = str(Path(__file__).with_name("perplexity.py"))
