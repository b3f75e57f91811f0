"""ROUGE as a local `evaluate` module (evaluate.load("rouge") needs the hub; this loads by path).

    import evaluate
    rouge = evaluate.load("path/to/gist_dist/metrics/rouge.py")
    rouge.compute(predictions=["the cat sat"], references=["the cat"])  # {"rougeL": 0.8, ...}

Scores are F-measures from Google's `rouge_score`, averaged over examples (as the hub's "rouge").
"""

import datasets
import evaluate
from rouge_score import rouge_scorer

_DESCRIPTION = "ROUGE F-measures (rouge1, rouge2, rougeL, rougeLsum) via rouge_score, averaged over examples."
_KWARGS = """
Args:
    predictions: list of strings. references: list of strings (one per prediction).
    rouge_types: default ["rouge1", "rouge2", "rougeL", "rougeLsum"]. use_stemmer: Porter stemming (default False).
    use_aggregator: mean over examples (default True); False returns one score per example.
Returns: {rouge_type: score}.
"""


class Rouge(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Lin (2004), ROUGE",
            inputs_description=_KWARGS,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references, rouge_types=None, use_stemmer=False, use_aggregator=True):
        rouge_types = rouge_types or ["rouge1", "rouge2", "rougeL", "rougeLsum"]
        scorer = rouge_scorer.RougeScorer(rouge_types, use_stemmer=use_stemmer)
        scores = [scorer.score(ref, pred) for pred, ref in zip(predictions, references)]
        per_type = {t: [s[t].fmeasure for s in scores] for t in rouge_types}
        if not use_aggregator:
            return per_type
        return {t: sum(v) / len(v) if v else 0.0 for t, v in per_type.items()}
