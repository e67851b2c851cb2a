"""Per-task evaluation metrics, as pure functions.

Every score is a percentage on a 0-100 scale (so tables mix metrics without rescaling), except
`perplexity`, which is a ratio. BLEU and chrF come from sacrebleu and ROUGE-L from rouge_score so
our numbers match published ones; only the SQuAD metrics (the official v1.1 script logic) and
accuracy / macro-F1 are written here, to avoid a scikit-learn dependency.

Every function raises `ValueError` when its inputs are empty or their lengths differ, because a
silently truncated or empty evaluation would report a meaningless score.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence

import sacrebleu
from rouge_score import rouge_scorer

__all__ = [
    "accuracy",
    "bleu",
    "chrf",
    "macro_f1",
    "normalize_answer",
    "perplexity",
    "rouge_l",
    "squad_exact_match",
    "squad_f1",
    "squad_scores",
]

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def _check_pair(predictions: Sequence[object], golds: Sequence[object], what: str) -> None:
    """Reject empty or mismatched inputs: a zip() over them would silently drop examples."""
    if len(predictions) == 0:
        raise ValueError("predictions is empty: there is nothing to score")
    if len(predictions) != len(golds):
        raise ValueError(f"got {len(predictions)} predictions but {len(golds)} {what}: they must have the same length")


def _reference_list(refs: Sequence[str], index: int) -> list[str]:
    """One example's references as a non-empty list; a bare string would be read as characters."""
    if isinstance(refs, str):
        raise ValueError(f"references[{index}] is a string, not a list of strings: wrap it as [reference]")
    if len(refs) == 0:
        raise ValueError(f"references[{index}] is empty: every example needs a reference")
    return list(refs)


# --- classification -------------------------------------------------------------------------


def accuracy(predictions: Sequence[str], golds: Sequence[str]) -> float:
    """Percentage of exact string matches; callers normalise labels beforehand."""
    _check_pair(predictions, golds, "golds")
    correct = sum(p == g for p, g in zip(predictions, golds, strict=True))
    return 100.0 * correct / len(golds)


def macro_f1(predictions: Sequence[str], golds: Sequence[str], labels: Sequence[str]) -> float:
    """Unweighted mean of per-class F1, so rare classes count as much as frequent ones.

    Averages over the `labels` that occur in `golds` or `predictions` (sklearn's
    `f1_score(average="macro")` with that set as `labels`); a class's F1 is 0 when undefined. A
    prediction outside `labels` (e.g. a malformed generation) simply counts as wrong.
    """
    _check_pair(predictions, golds, "golds")
    if isinstance(labels, str) or len(labels) == 0:
        raise ValueError("labels must be a non-empty sequence of label strings")
    seen = set(predictions) | set(golds)
    present = [label for label in dict.fromkeys(labels) if label in seen]
    if not present:
        raise ValueError("none of the labels occur in predictions or golds")
    scores = []
    for label in present:
        tp = sum(p == label and g == label for p, g in zip(predictions, golds, strict=True))
        fp = sum(p == label and g != label for p, g in zip(predictions, golds, strict=True))
        fn = sum(p != label and g == label for p, g in zip(predictions, golds, strict=True))
        denominator = 2 * tp + fp + fn
        scores.append(2 * tp / denominator if denominator else 0.0)
    return 100.0 * sum(scores) / len(scores)


# --- extractive QA (SQuAD v1.1) ---------------------------------------------------------------


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 normalisation, so casing, punctuation and articles don't cost points.

    Lowercase, strip punctuation, remove the articles a/an/the, collapse whitespace (in the
    official script's order).
    """
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _check_answers(answers: Sequence[str]) -> None:
    """Scoring against no gold answer is undefined (max over an empty set)."""
    if isinstance(answers, str):
        raise ValueError("answers is a string, not a list of strings: wrap it as [answer]")
    if len(answers) == 0:
        raise ValueError("answers is empty: every question needs at least one gold answer")


def _token_f1(prediction: str, answer: str) -> float:
    """Token-overlap F1 in [0, 1] after normalisation, as in the official script."""
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(answer).split()
    common = Counter(pred_tokens) & Counter(gold_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_exact_match(prediction: str, answers: Sequence[str]) -> float:
    """100 if the normalised prediction equals any normalised gold answer, else 0."""
    _check_answers(answers)
    normalized = normalize_answer(prediction)
    return 100.0 if any(normalized == normalize_answer(a) for a in answers) else 0.0


def squad_f1(prediction: str, answers: Sequence[str]) -> float:
    """Best token-level F1 (0-100) over the gold answers: any valid answer earns full credit."""
    _check_answers(answers)
    return 100.0 * max(_token_f1(prediction, a) for a in answers)


def squad_scores(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> dict[str, float]:
    """Mean exact match and F1 over a dataset, the two numbers SQuAD results are reported as."""
    _check_pair(predictions, answers, "answer lists")
    n = len(predictions)
    exact = sum(squad_exact_match(p, a) for p, a in zip(predictions, answers, strict=True))
    f1 = sum(squad_f1(p, a) for p, a in zip(predictions, answers, strict=True))
    return {"exact_match": exact / n, "f1": f1 / n}


# --- generation -----------------------------------------------------------------------------


def rouge_l(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Mean (0-100) of each example's best ROUGE-L F-measure over its references (stemmed)."""
    _check_pair(predictions, references, "reference lists")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    total = 0.0
    for i, (prediction, refs) in enumerate(zip(predictions, references, strict=True)):
        # rouge_score's signature is score(target, prediction).
        total += max(scorer.score(ref, prediction)["rougeL"].fmeasure for ref in _reference_list(refs, i))
    return 100.0 * total / len(predictions)


def _reference_streams(references: Sequence[Sequence[str]]) -> list[list[str]]:
    """Transpose per-example reference lists into sacrebleu's layout: one stream per ref slot.

    sacrebleu wants every stream to cover every example, so an example with fewer references
    than the longest list is padded by repeating its first reference. Repeating a reference
    leaves BLEU's clipped n-gram counts and chrF's best-reference choice unchanged, so the
    padding does not alter the score.
    """
    lists = [_reference_list(refs, i) for i, refs in enumerate(references)]
    width = max(len(refs) for refs in lists)
    padded = [refs + [refs[0]] * (width - len(refs)) for refs in lists]
    return [list(stream) for stream in zip(*padded, strict=True)]


def bleu(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU (0-100) via sacrebleu's defaults, so it is comparable to published scores."""
    _check_pair(predictions, references, "reference lists")
    return float(sacrebleu.corpus_bleu(list(predictions), _reference_streams(references)).score)


def chrf(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus chrF (0-100) via sacrebleu; character n-grams are kinder to short outputs."""
    _check_pair(predictions, references, "reference lists")
    return float(sacrebleu.corpus_chrf(list(predictions), _reference_streams(references)).score)


# --- language modelling ---------------------------------------------------------------------


def perplexity(total_nll: float, total_tokens: int) -> float:
    """exp(mean per-token negative log-likelihood); takes sums so batches aggregate exactly.

    Not a percentage. Returns inf rather than raising when the exponent overflows a float.
    """
    if total_tokens <= 0:
        raise ValueError(f"total_tokens must be positive, got {total_tokens}")
    try:
        return math.exp(total_nll / total_tokens)
    except OverflowError:
        return math.inf
