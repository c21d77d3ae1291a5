"""Tests for jtrain.text_scores: parity with sacrebleu and rouge-score, live when they are
installed and through committed golden numbers when they are not; additive corpus statistics."""

import random

import pytest

from jtrain import text_scores

# Each case is a small corpus of (prediction, reference) pairs; "all" below joins them.
CASES = {
    "identical": [
        (
            "The quick brown fox jumps over the lazy dog.",
            "The quick brown fox jumps over the lazy dog.",
        )
    ],
    "empty_prediction": [("", "A reference that the model did not produce at all.")],
    "empty_both": [("", "")],
    "whitespace_only_difference": [
        ("  Paris\n", "Paris"),
        ("\tthe answer is 42 ", "the answer is 42"),
    ],
    "punctuation_numbers": [
        (
            "It costs $3.50, or 1,000 yen (approx.) -- see p. 12-14!",
            "It costs $3.50 or 1,000 yen (approximately); see pp. 12-14.",
        ),
        (
            'Well-known facts: 2+2=4 & 3*3=9; "quoted" <tags> [x] {y} a/b',
            "Well known facts: 2 + 2 = 4 &amp; 3*3=9 - &quot;quoted&quot; &lt;tags&gt;",
        ),
    ],
    "unicode_accents": [
        ("Le café était très naïve, déjà vu à Zürich.", "Le café est très naïf, déjà vu à Zurich.")
    ],
    "cjk": [
        ("我喜欢吃苹果和香蕉。", "我很喜欢吃苹果。"),
        ("東京は日本の首都です", "日本の首都は東京です"),
    ],
    "short_prediction": [("the cat sat on the mat", "the cat sat on the mat by the door today")],
    "long_prediction": [
        (
            "the cat sat on the mat by the door today and then it slept for hours",
            "the cat sat on the mat",
        )
    ],
    "no_overlap": [("alpha beta gamma delta epsilon", "one two three four five six")],
    "multiple_sentences": [
        (
            "The meeting starts at 9. Bring your notes. We will discuss the budget and the plan.",
            "The meeting begins at 9. Please bring notes. We discuss the plan and the budget.",
        ),
        (
            "Rain is expected tomorrow. Take an umbrella.",
            "Tomorrow it will rain. Take an umbrella with you.",
        ),
    ],
    "tabs_newlines": [
        (
            "first line\tsecond\tpart\nthird line-\nbroken word\r\n",
            "first line second part\nthird linebroken word",
        ),
        ("a\n\nb\tc", "a b c"),
    ],
    "smoothing": [
        ("the cat on sat the mat today", "the cat sat on the mat"),
        ("a dog barked at the mailman", "the dog barked at a mailman"),
    ],
    "short_reference": [("hello there", "hi"), ("ok", "okay then")],
    "mixed_case": [("THE Cat Sat On The Mat", "the cat sat on the mat")],
}

ALL = [pair for pairs in CASES.values() for pair in pairs]

# (exact_match, bleu, chrf, rouge_l) of each case, computed with sacrebleu 2.6.0 and
# rouge-score 0.1.2 by `_reference_scores` (regenerate with it if a case changes).
GOLDEN = {
    "identical": (1.0, 100.00000000000004, 100.0, 1.0),
    "empty_prediction": (0.0, 0.0, 0.0, 0.0),
    "empty_both": (1.0, 0.0, 0.0, 0.0),
    "whitespace_only_difference": (1.0, 100.00000000000004, 100.0, 1.0),
    "punctuation_numbers": (0.0, 49.72702162153199, 52.63086201677343, 0.7779156327543424),
    "unicode_accents": (0.0, 29.982213893423374, 59.210830718350515, 0.6956521739130435),
    "cjk": (0.0, 0.0, 41.090865510803546, 0.0),
    "short_prediction": (0.0, 51.341711903259224, 56.24554036546493, 0.7499999999999999),
    "long_prediction": (0.0, 30.130404892785695, 66.73165674052255, 0.5454545454545454),
    "no_overlap": (0.0, 0.0, 9.603535893597304, 0.0),
    "multiple_sentences": (0.0, 21.570785766540943, 55.13619966384968, 0.6048387096774193),
    "tabs_newlines": (0.0, 100.00000000000004, 92.25091151205848, 0.8999999999999999),
    "smoothing": (0.0, 22.718709780542312, 64.48469077950841, 0.7179487179487178),
    "short_reference": (0.0, 0.0, 20.376712328767123, 0.0),
    "mixed_case": (0.0, 0.0, 12.990196078431374, 1.0),
    "all": (0.18181818181818182, 46.02819844631101, 55.63762235488146, 0.545114220005843),
}
KEYS = ("exact_match", "bleu", "chrf", "rouge_l")


def _corpus(name):
    pairs = ALL if name == "all" else CASES[name]
    return [p for p, _ in pairs], [r for _, r in pairs]


def _reference_scores(predictions, references):
    """The four scores by the reference packages (skips the test when they are absent)."""
    sacrebleu = pytest.importorskip("sacrebleu")
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rouge = [
        scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references, strict=True)
    ]
    exact = [p.strip() == r.strip() for p, r in zip(predictions, references, strict=True)]
    return {
        "exact_match": sum(exact) / len(exact),
        "bleu": sacrebleu.corpus_bleu(predictions, [references]).score,
        "chrf": sacrebleu.corpus_chrf(predictions, [references]).score,
        "rouge_l": sum(rouge) / len(rouge),
    }


def _random_corpus(seed, size=40):
    """Sentences over a small vocabulary full of 13a edge cases, half sharing words."""
    rng = random.Random(seed)
    words = "the a cat dog sat on mat . , 3.5 1,000 well-known don't (hi) Café 日本語 10-20 &amp; !"
    words = words.split() + ["\t", "-\n", "<skipped>"]

    def sentence():
        return " ".join(rng.choice(words) for _ in range(rng.randint(0, 20)))

    predictions = [sentence() for _ in range(size)]
    references = [
        sentence() if rng.random() < 0.3 else " ".join(p.split()[: rng.randint(0, 20)] + ["mat"])
        for p in predictions
    ]
    return predictions, references


@pytest.mark.parametrize("name", [*CASES, "all"])
def test_matches_reference_packages(name):
    predictions, references = _corpus(name)
    expected = _reference_scores(predictions, references)
    assert text_scores.score_all(predictions, references) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("seed", range(3))
def test_matches_reference_packages_on_random_corpora(seed):
    predictions, references = _random_corpus(seed)
    expected = _reference_scores(predictions, references)
    assert text_scores.score_all(predictions, references) == pytest.approx(expected, abs=1e-9)


def test_13a_tokens_match_sacrebleu():
    tokenizer_13a = pytest.importorskip("sacrebleu.tokenizers.tokenizer_13a")
    tokenizer = tokenizer_13a.Tokenizer13a()
    rng = random.Random(0)
    pieces = [*"ab 09.,-'\"&;<>!?()[]{}/\\:@#$%^_`|~\t\n\r", "&amp;", "&lt;", "&quot;", "é", "日本"]
    for _ in range(2000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 20)))
        # sacrebleu strips trailing whitespace before it tokenizes.
        assert text_scores._tokenize_13a(text) == tokenizer(text.rstrip()).split(), repr(text)


@pytest.mark.parametrize("name", GOLDEN)
def test_golden_numbers(name):
    predictions, references = _corpus(name)
    expected = dict(zip(KEYS, GOLDEN[name], strict=True))
    assert text_scores.score_all(predictions, references) == pytest.approx(expected, abs=1e-9)


def test_single_score_functions_agree_with_score_all():
    predictions, references = _corpus("all")
    scores = text_scores.score_all(predictions, references)
    assert text_scores.exact_match(predictions, references) == scores["exact_match"]
    assert text_scores.bleu(predictions, references) == scores["bleu"]
    assert text_scores.chrf(predictions, references) == scores["chrf"]
    assert text_scores.rouge_l(predictions, references) == pytest.approx(scores["rouge_l"])


def test_stats_summed_over_halves_give_the_corpus_score():
    predictions, references = _random_corpus(7, size=30)
    first, second = slice(0, 11), slice(11, None)
    halves = [(predictions[s], references[s]) for s in (first, second)]

    bleu = sum(text_scores.bleu_stats(p, r) for p, r in halves)
    assert bleu == text_scores.bleu_stats(predictions, references)
    assert text_scores.bleu_from_stats(bleu) == text_scores.bleu(predictions, references)
    chrf = text_scores.chrf_stats(*halves[0]) + text_scores.chrf_stats(*halves[1])
    assert chrf == text_scores.chrf_stats(predictions, references)
    assert text_scores.chrf_from_stats(chrf) == text_scores.chrf(predictions, references)

    # As a cross-process reduction would: flatten, add the vectors, rebuild.
    vectors = [text_scores.text_stats(p, r).to_array() for p, r in halves]
    total = text_scores.TextStats.from_array(vectors[0] + vectors[1])
    expected = text_scores.score_all(predictions, references)
    assert text_scores.scores_from_stats(total) == pytest.approx(expected, abs=1e-12)


def test_empty_batches_add_nothing():
    stats = text_scores.text_stats(["a b c d e"], ["a b c d f"])
    empty = text_scores.text_stats([], [])
    assert stats + empty == stats
    assert text_scores.bleu_from_stats(text_scores.BleuStats()) == 0.0
    assert text_scores.chrf_from_stats(text_scores.ChrfStats()) == 0.0


def test_exact_match_strips_surrounding_whitespace_only():
    predictions = [" Paris\n", "Paris", "paris", "New  York"]
    references = ["Paris", "Paris ", "Paris", "New York"]
    assert text_scores.exact_match(predictions, references) == 0.5


def test_misuse_raises_a_message():
    with pytest.raises(ValueError, match="one reference string per prediction"):
        text_scores.bleu(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="at least one"):
        text_scores.score_all([], [])
    with pytest.raises(TypeError, match="lists of strings"):
        text_scores.chrf("a prediction", "a reference")
    with pytest.raises(ValueError, match="needs 10 values, got 2"):
        text_scores.BleuStats.from_array([1.0, 2.0])
