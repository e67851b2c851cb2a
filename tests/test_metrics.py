"""Metrics checked against values worked out by hand (the arithmetic is in the comments)."""

import math

import pytest

from multitune.tasks.metrics import (
    accuracy,
    bleu,
    chrf,
    macro_f1,
    normalize_answer,
    perplexity,
    rouge_l,
    squad_exact_match,
    squad_f1,
    squad_scores,
)

# --- accuracy / macro-F1 ----------------------------------------------------------------------


def test_accuracy_three_of_four():
    # matches at positions 0, 1, 3 -> 3/4 = 75%
    assert accuracy(["a", "b", "c", "d"], ["a", "b", "x", "d"]) == 75.0


def test_macro_f1_three_classes_by_hand():
    golds = ["a", "a", "b", "b", "c", "c"]
    preds = ["a", "b", "b", "b", "c", "a"]
    # a: tp=1 (i0), fp=1 (i5), fn=1 (i1) -> F1 = 2*1/(2+1+1) = 1/2
    # b: tp=2 (i2,i3), fp=1 (i1), fn=0  -> F1 = 4/(4+1)     = 4/5
    # c: tp=1 (i4), fp=0, fn=1 (i5)     -> F1 = 2/(2+0+1)   = 2/3
    # mean = (1/2 + 4/5 + 2/3) / 3 = (15 + 24 + 20) / 30 / 3 = 59/90
    assert macro_f1(preds, golds, ["a", "b", "c"]) == pytest.approx(100 * 59 / 90)


def test_macro_f1_ignores_labels_absent_from_data():
    golds = ["a", "a", "b", "b", "c", "c"]
    preds = ["a", "b", "b", "b", "c", "a"]
    # "d" occurs in neither list, so it is left out of the average: still 59/90
    assert macro_f1(preds, golds, ["a", "b", "c", "d"]) == pytest.approx(100 * 59 / 90)


def test_macro_f1_prediction_outside_labels_counts_as_wrong():
    # a: tp=1 -> F1 = 1; b: tp=0, fn=1 (predicted "junk") -> F1 = 0; mean = 1/2
    assert macro_f1(["a", "junk"], ["a", "b"], ["a", "b"]) == pytest.approx(50.0)


def test_macro_f1_perfect():
    assert macro_f1(["x", "y", "x"], ["x", "y", "x"], ["x", "y"]) == pytest.approx(100.0)


# --- SQuAD ------------------------------------------------------------------------------------


def test_normalize_answer():
    # lowercase, drop "!", drop article "the", collapse the double space
    assert normalize_answer("The  Cat!") == "cat"
    # articles are removed only as whole words
    assert normalize_answer("An anthem at the theater") == "anthem at theater"


def test_squad_exact_match_after_normalisation():
    assert squad_exact_match("The  Cat!", ["cat"]) == 100.0
    assert squad_exact_match("dog", ["cat"]) == 0.0


def test_squad_exact_match_any_answer():
    # "Red dog." -> "red dog"; second answer "a red dog" -> "red dog"
    assert squad_exact_match("Red dog.", ["blue cat", "a red dog"]) == 100.0


def test_squad_f1_partial_overlap():
    # "the big red dog" -> [big, red, dog]; "red dog barks" -> [red, dog, barks]
    # common = {red, dog} = 2; P = 2/3, R = 2/3 -> F1 = 2/3
    assert squad_f1("the big red dog", ["red dog barks"]) == pytest.approx(100 * 2 / 3)


def test_squad_f1_max_over_answers():
    # vs "blue cat": no overlap -> 0
    # vs "red dog barks": common = 2, P = 2/2, R = 2/3 -> F1 = 2*1*(2/3)/(1 + 2/3) = 4/5
    assert squad_f1("red dog", ["blue cat", "red dog barks"]) == pytest.approx(80.0)


def test_squad_f1_empty_prediction_is_zero():
    assert squad_f1("", ["cat"]) == 0.0
    # a prediction that normalises to nothing (only an article) is also 0
    assert squad_f1("the", ["cat"]) == 0.0


def test_squad_scores_means():
    preds = ["cat", "the big red dog"]
    answers = [["The Cat"], ["red dog barks"]]
    # EM: (100 + 0) / 2 = 50; F1: (100 + 200/3) / 2 = 250/3
    scores = squad_scores(preds, answers)
    assert scores["exact_match"] == pytest.approx(50.0)
    assert scores["f1"] == pytest.approx(250 / 3)
    assert set(scores) == {"exact_match", "f1"}


# --- ROUGE-L ----------------------------------------------------------------------------------


def test_rouge_l_lcs_by_hand():
    # pred: the cat sat on the mat (6 tokens); ref: the cat lay on the mat (6 tokens)
    # LCS = "the cat on the mat" = 5 -> P = R = 5/6 -> F = 5/6
    score = rouge_l(["the cat sat on the mat"], [["the cat lay on the mat"]])
    assert score == pytest.approx(100 * 5 / 6)


def test_rouge_l_max_over_references_and_mean_over_examples():
    preds = ["the cat sat on the mat", "hello world"]
    refs = [["completely different words", "the cat lay on the mat"], ["hello world"]]
    # example 1: max(0, 5/6) = 5/6; example 2: identical -> 1; mean = (5/6 + 1) / 2 = 11/12
    assert rouge_l(preds, refs) == pytest.approx(100 * 11 / 12)


def test_rouge_l_uses_stemmer():
    # Porter stemming maps "cats" -> "cat" and "running" -> "run": all tokens match
    assert rouge_l(["cats running"], [["cat run"]]) == pytest.approx(100.0)


# --- BLEU / chrF ------------------------------------------------------------------------------


def test_bleu_identical_is_100():
    sents = ["the cat sat on the mat", "a dog ran in the park today"]
    assert bleu(sents, [[s] for s in sents]) == pytest.approx(100.0)


def test_bleu_disjoint_is_0():
    assert bleu(["alpha beta gamma delta epsilon"], [["one two three four five"]]) == 0.0


def test_chrf_identical_is_100():
    sents = ["the cat sat on the mat", "hello world"]
    assert chrf(sents, [[s] for s in sents]) == pytest.approx(100.0)


def test_multi_reference_with_padding():
    preds = ["the cat sat on the mat", "a dog ran in the park today"]
    # example 1 has one reference (padded by repeating it); example 2 matches its second one
    refs = [["the cat sat on the mat"], ["something else entirely here", preds[1]]]
    assert bleu(preds, refs) == pytest.approx(100.0)
    assert chrf(preds, refs) == pytest.approx(100.0)


def test_padding_does_not_change_scores():
    preds = ["the cat sat on a mat", "a dog ran in the park"]
    single = [["the cat sat on the mat"], ["the dog ran in a park"]]
    # the first example gets a second reference identical to its first; the score must not move
    padded_by_hand = [["the cat sat on the mat", "the cat sat on the mat"], single[1]]
    assert 0.0 < bleu(preds, single) < 100.0
    assert bleu(preds, padded_by_hand) == pytest.approx(bleu(preds, single))
    assert chrf(preds, padded_by_hand) == pytest.approx(chrf(preds, single))


# --- perplexity -------------------------------------------------------------------------------


def test_perplexity_exp_of_mean_nll():
    # mean NLL = 20 / 10 = 2 -> exp(2) = 7.389056...
    assert perplexity(20.0, 10) == pytest.approx(math.exp(2))
    assert perplexity(20.0, 10) == pytest.approx(7.389056, rel=1e-6)


def test_perplexity_zero_loss_is_one():
    assert perplexity(0.0, 5) == 1.0


def test_perplexity_overflow_is_inf():
    assert perplexity(1e6, 1) == math.inf


# --- errors -----------------------------------------------------------------------------------


def test_perplexity_zero_tokens_raises():
    with pytest.raises(ValueError, match="total_tokens must be positive"):
        perplexity(1.0, 0)


@pytest.mark.parametrize(
    "call",
    [
        lambda: accuracy(["a"], ["a", "b"]),
        lambda: macro_f1(["a"], ["a", "b"], ["a", "b"]),
        lambda: squad_scores(["a"], [["a"], ["b"]]),
        lambda: rouge_l(["a", "b"], [["a"]]),
        lambda: bleu(["a", "b"], [["a"]]),
        lambda: chrf(["a", "b"], [["a"]]),
    ],
)
def test_length_mismatch_raises(call):
    with pytest.raises(ValueError, match="must have the same length"):
        call()


@pytest.mark.parametrize(
    "call",
    [
        lambda: accuracy([], []),
        lambda: macro_f1([], [], ["a"]),
        lambda: squad_scores([], []),
        lambda: rouge_l([], []),
        lambda: bleu([], []),
        lambda: chrf([], []),
    ],
)
def test_empty_inputs_raise(call):
    with pytest.raises(ValueError, match="predictions is empty"):
        call()


def test_squad_empty_answers_raise():
    with pytest.raises(ValueError, match="answers is empty"):
        squad_exact_match("cat", [])
    with pytest.raises(ValueError, match="answers is empty"):
        squad_f1("cat", [])


def test_empty_reference_list_raises():
    with pytest.raises(ValueError, match=r"references\[1\] is empty"):
        bleu(["a", "b"], [["a"], []])
    with pytest.raises(ValueError, match=r"references\[0\] is empty"):
        rouge_l(["a"], [[]])


def test_bare_string_reference_raises():
    with pytest.raises(ValueError, match="is a string, not a list"):
        chrf(["hello"], ["hello"])


def test_macro_f1_label_errors():
    with pytest.raises(ValueError, match="labels must be a non-empty"):
        macro_f1(["a"], ["a"], [])
    with pytest.raises(ValueError, match="none of the labels occur"):
        macro_f1(["a"], ["a"], ["b"])
