"""Scores of generated text against one reference each: exact match, BLEU, chrF and ROUGE-L.

The numbers equal sacrebleu's defaults (BLEU: 13a tokens, exp smoothing; chrF: character
n-grams up to 6, beta 2) and rouge-score's `RougeScorer(["rougeL"])`, which stay test-only
dependencies. BLEU and chrF are corpus scores, so this module returns their sufficient
statistics as small additive dataclasses: batches and processes add theirs (`+`, `sum`, or
`to_array`/`from_array` around a cross-process sum) and the score is computed once at the end.
`text_stats` and `scores_from_stats` do the same for all four scores together.
"""

from __future__ import annotations

import dataclasses
import math
import re
import string
from collections import Counter
from collections.abc import Sequence
from typing import TypeVar

import numpy as np

BLEU_ORDER = 4  # sacrebleu's default maximum word n-gram order
CHRF_ORDER = 6  # sacrebleu's default maximum character n-gram order
CHRF_BETA = 2  # recall weighs beta times as much as precision


class _Additive:
    """Field-wise `+` and a flat float64 vector for the frozen stats dataclasses below."""

    def __add__(self, other):
        if type(other) is not type(self):
            return NotImplemented
        values = {}
        for field in dataclasses.fields(self):
            a, b = getattr(self, field.name), getattr(other, field.name)
            values[field.name] = (
                tuple(x + y for x, y in zip(a, b, strict=True)) if isinstance(a, tuple) else a + b
            )
        return type(self)(**values)

    def __radd__(self, other):
        # Lets the builtin `sum(stats)` start from its integer 0.
        return self if isinstance(other, int) and other == 0 else NotImplemented

    def to_array(self) -> np.ndarray:
        """All counts as one float64 vector (exact below 2**53), e.g. to sum across processes."""
        return np.asarray(list(_flatten(self)), np.float64)

    @classmethod
    def from_array(cls: type[_StatsT], array) -> _StatsT:
        """The stats that `to_array` flattened into `array` (possibly summed since)."""
        values = np.asarray(array, np.float64).ravel().tolist()
        size = len(cls().to_array())
        if len(values) != size:
            raise ValueError(f"{cls.__name__}.from_array needs {size} values, got {len(values)}")
        return _unflatten(cls(), iter(values))


_StatsT = TypeVar("_StatsT", bound=_Additive)


def _flatten(value):
    if isinstance(value, _Additive):
        for field in dataclasses.fields(value):
            yield from _flatten(getattr(value, field.name))
    elif isinstance(value, tuple):
        yield from value
    else:
        yield value


def _unflatten(template, values):
    # The default instance fixes the layout (tuple lengths) and the int/float type of each count.
    if isinstance(template, _Additive):
        fields = dataclasses.fields(template)
        return type(template)(
            **{f.name: _unflatten(getattr(template, f.name), values) for f in fields}
        )
    if isinstance(template, tuple):
        return tuple(_unflatten(x, values) for x in template)
    return type(template)(next(values))


@dataclasses.dataclass(frozen=True)
class BleuStats(_Additive):
    """Corpus BLEU's sufficient statistics: token lengths and clipped n-gram matches per order."""

    hyp_len: int = 0
    ref_len: int = 0
    matches: tuple[int, ...] = (0,) * BLEU_ORDER
    totals: tuple[int, ...] = (0,) * BLEU_ORDER


@dataclasses.dataclass(frozen=True)
class ChrfStats(_Additive):
    """Corpus chrF's sufficient statistics: character n-gram counts per order."""

    hyp: tuple[int, ...] = (0,) * CHRF_ORDER
    ref: tuple[int, ...] = (0,) * CHRF_ORDER
    matches: tuple[int, ...] = (0,) * CHRF_ORDER


@dataclasses.dataclass(frozen=True)
class TextStats(_Additive):
    """Everything `scores_from_stats` needs, additive over batches and processes."""

    count: int = 0
    exact: int = 0
    rouge_l_sum: float = 0.0
    bleu: BleuStats = dataclasses.field(default_factory=BleuStats)
    chrf: ChrfStats = dataclasses.field(default_factory=ChrfStats)


def _pairs(predictions: Sequence[str], references: Sequence[str]):
    if isinstance(predictions, str) or isinstance(references, str):
        raise TypeError("pass lists of strings (one reference per prediction), not a string")
    if len(predictions) != len(references):
        raise ValueError(
            f"got {len(predictions)} predictions but {len(references)} references; "
            "pass exactly one reference string per prediction"
        )
    return zip(predictions, references, strict=True)


def _nonempty(predictions: Sequence[str]) -> None:
    if not predictions:
        raise ValueError("no predictions to score; a corpus score needs at least one example")


def _ngrams(items: Sequence[str], n: int) -> Counter:
    return Counter(tuple(items[i : i + n]) for i in range(len(items) - n + 1))


def _clipped_matches(hyp: Counter, ref: Counter) -> int:
    return sum(min(count, ref[gram]) for gram, count in hyp.items() if gram in ref)


# mteval-v13a splits off every ASCII punctuation mark except these four, whose splitting
# depends on their neighbours: decimal points, thousands separators, hyphens, apostrophes.
_ALWAYS_SPLIT = "".join(c for c in string.punctuation if c not in "'-.,")
_13A_RULES = (
    (re.compile(f"([{re.escape(_ALWAYS_SPLIT)}])"), r" \1 "),
    (re.compile(r"([^0-9])([.,])"), r"\1 \2 "),  # period or comma after a non-digit
    (re.compile(r"([.,])([^0-9])"), r" \1 \2"),  # period or comma before a non-digit
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),  # dash after a digit
)
_13A_ENTITIES = (("&quot;", '"'), ("&amp;", "&"), ("&lt;", "<"), ("&gt;", ">"))


def _tokenize_13a(text: str) -> list[str]:
    """Splits a segment into tokens as sacrebleu's default `13a` BLEU tokenizer does."""
    text = text.rstrip().replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    for entity, char in _13A_ENTITIES:  # in this order: "&amp;lt;" becomes "<"
        text = text.replace(entity, char)
    # The padding lets the period/comma rules see a non-digit at both ends of the text.
    text = f" {text} "
    for pattern, replacement in _13A_RULES:
        text = pattern.sub(replacement, text)
    return text.split()


def bleu_stats(predictions: Sequence[str], references: Sequence[str]) -> BleuStats:
    """BLEU's additive statistics of these (prediction, reference) pairs."""
    hyp_len, ref_len = 0, 0
    matches, totals = [0] * BLEU_ORDER, [0] * BLEU_ORDER
    for prediction, reference in _pairs(predictions, references):
        hyp, ref = _tokenize_13a(prediction), _tokenize_13a(reference)
        hyp_len += len(hyp)
        ref_len += len(ref)
        for n in range(1, BLEU_ORDER + 1):
            hyp_grams = _ngrams(hyp, n)
            totals[n - 1] += hyp_grams.total()
            matches[n - 1] += _clipped_matches(hyp_grams, _ngrams(ref, n))
    return BleuStats(hyp_len, ref_len, tuple(matches), tuple(totals))


def bleu_from_stats(stats: BleuStats) -> float:
    """Corpus BLEU on 0-100 with sacrebleu's default exp smoothing."""
    # No match at all, or an order without any n-gram (sacrebleu floors its log), scores 0.
    if not any(stats.matches) or not all(stats.totals):
        return 0.0
    brevity = 1.0
    if stats.hyp_len < stats.ref_len:
        brevity = math.exp(1 - stats.ref_len / stats.hyp_len)
    log_sum, divisor = 0.0, 1.0
    for matched, total in zip(stats.matches, stats.totals, strict=True):
        if matched:
            precision = 100.0 * matched / total
        else:
            # mteval's smoothing: the k-th order without matches counts 1 / 2**k of a match.
            divisor *= 2
            precision = 100.0 / (divisor * total)
        log_sum += math.log(precision)
    return brevity * math.exp(log_sum / len(stats.matches))


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU on 0-100, equal to `sacrebleu.corpus_bleu(predictions, [references])`."""
    _nonempty(predictions)
    return bleu_from_stats(bleu_stats(predictions, references))


def _char_ngrams(text: str, n: int) -> Counter:
    # chrF ignores whitespace: n-grams run across word boundaries as if the spaces were gone.
    return _ngrams("".join(text.split()), n)


def chrf_stats(predictions: Sequence[str], references: Sequence[str]) -> ChrfStats:
    """chrF's additive statistics of these (prediction, reference) pairs."""
    hyp, ref, matches = [0] * CHRF_ORDER, [0] * CHRF_ORDER, [0] * CHRF_ORDER
    for prediction, reference in _pairs(predictions, references):
        for n in range(1, CHRF_ORDER + 1):
            hyp_grams, ref_grams = _char_ngrams(prediction, n), _char_ngrams(reference, n)
            # sacrebleu counts no hypothesis n-grams of an order the reference is too short for.
            hyp[n - 1] += hyp_grams.total() if ref_grams else 0
            ref[n - 1] += ref_grams.total()
            matches[n - 1] += _clipped_matches(hyp_grams, ref_grams)
    return ChrfStats(tuple(hyp), tuple(ref), tuple(matches))


def chrf_from_stats(stats: ChrfStats) -> float:
    """Corpus chrF on 0-100 as sacrebleu's default `CHRF()`: F-beta of averaged P and R."""
    # Orders with no n-grams on either side are left out of the averages (effective order).
    precisions, recalls = [], []
    for hyp, ref, matched in zip(stats.hyp, stats.ref, stats.matches, strict=True):
        if hyp > 0 and ref > 0:
            precisions.append(matched / hyp)
            recalls.append(matched / ref)
    if not precisions:
        return 0.0
    precision = sum(precisions) / len(precisions)
    recall = sum(recalls) / len(recalls)
    if not precision + recall:
        return 0.0
    factor = CHRF_BETA**2
    return 100 * ((1 + factor) * precision * recall / (factor * precision + recall))


def chrf(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus chrF on 0-100, equal to `sacrebleu.corpus_chrf(predictions, [references])`."""
    _nonempty(predictions)
    return chrf_from_stats(chrf_stats(predictions, references))


def _rouge_tokens(text: str) -> list[str]:
    # rouge-score's default tokenizer: lowercase, then only ASCII letters and digits survive.
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l_f1(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure of one pair on 0-1, as rouge-score's `RougeScorer(["rougeL"])`."""
    hyp, ref = _rouge_tokens(prediction), _rouge_tokens(reference)
    common = _lcs_length(ref, hyp) if hyp and ref else 0
    if not common:
        return 0.0
    precision, recall = common / len(hyp), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean over examples of the ROUGE-L F-measure, on 0-1."""
    _nonempty(predictions)
    pairs = list(_pairs(predictions, references))
    return sum(rouge_l_f1(p, r) for p, r in pairs) / len(pairs)


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of predictions equal to their reference after stripping surrounding whitespace."""
    _nonempty(predictions)
    pairs = list(_pairs(predictions, references))
    return sum(p.strip() == r.strip() for p, r in pairs) / len(pairs)


def text_stats(predictions: Sequence[str], references: Sequence[str]) -> TextStats:
    """The additive statistics of all four scores for these pairs."""
    pairs = list(_pairs(predictions, references))
    return TextStats(
        count=len(pairs),
        exact=sum(p.strip() == r.strip() for p, r in pairs),
        rouge_l_sum=sum(rouge_l_f1(p, r) for p, r in pairs),
        bleu=bleu_stats(predictions, references),
        chrf=chrf_stats(predictions, references),
    )


def scores_from_stats(stats: TextStats) -> dict[str, float]:
    """exact_match, bleu, chrf and rouge_l from (summed) `TextStats`."""
    if not stats.count:
        raise ValueError("no examples in these stats; a corpus score needs at least one")
    return {
        "exact_match": stats.exact / stats.count,
        "bleu": bleu_from_stats(stats.bleu),
        "chrf": chrf_from_stats(stats.chrf),
        "rouge_l": stats.rouge_l_sum / stats.count,
    }


def score_all(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """All four scores of these pairs: exact_match, bleu, chrf (0-100) and rouge_l (0-1)."""
    return scores_from_stats(text_stats(predictions, references))
