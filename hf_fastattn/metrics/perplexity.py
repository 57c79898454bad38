"""Perplexity as an `evaluate` metric that works offline (load it by path, no hub script):

    import evaluate, hf_fastattn.metrics
    ppl = evaluate.load(hf_fastattn.metrics.PERPLEXITY)
    ppl.add_batch(nll=[sum_of_token_nll_of_window, ...], tokens=[tokens_in_window, ...])
    ppl.compute()  # {"perplexity": ..., "nll_per_token": ..., "tokens": ...}

It aggregates summed negative log-likelihoods (nats) and token counts, so windows of any length combine
exactly (a mean of per-window perplexities would not).
"""

import math

import datasets
import evaluate

_DESCRIPTION = "Perplexity exp(sum NLL / sum tokens) from per-window summed negative log-likelihoods (nats)."
_KWARGS = """
Args:
    nll: summed negative log-likelihood (nats) of each window.
    tokens: number of predicted tokens of each window.
Returns:
    perplexity, nll_per_token (nats), tokens.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class Perplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features({"nll": datasets.Value("float64"), "tokens": datasets.Value("int64")}),
        )

    def _compute(self, nll, tokens):
        total = sum(tokens)
        if total <= 0:
            raise ValueError("perplexity needs at least one predicted token")
        mean = sum(nll) / total
        return {"perplexity": math.exp(mean), "nll_per_token": mean, "tokens": total}
