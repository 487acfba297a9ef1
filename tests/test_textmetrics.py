"""Generation metrics on known strings, English and Chinese."""

import pytest

from tuneline.eval.textmetrics import corpus_scores, normalize, record_scores, tokens

METRICS = ("rouge_1", "rouge_2", "rouge_l", "bleu", "exact_match")


def test_tokens_split_every_cjk_character_and_stop_words_at_them():
    assert tokens("我喜欢喝咖啡") == ["我", "喜", "欢", "喝", "咖", "啡"]
    # A run of letters ends where Chinese starts: "GPU训练" is not one word.
    assert tokens("用GPU训练, Fast!") == ["用", "gpu", "训", "练", "fast"]
    assert tokens("ＦＵＬＬ　ｗｉｄｔｈ") == ["full", "width"]  # NFKC folds full-width forms


@pytest.mark.parametrize("text", ["Use water between 90 and 96 °C.", "法压壶大约浸泡四分钟，然后慢慢压下。"])
def test_identical_strings_score_one_on_every_metric(text):
    scores = record_scores(text, text)
    assert scores == {k: 1.0 for k in METRICS}


@pytest.mark.parametrize(
    ("prediction", "reference"), [("green tea leaves", "espresso machine grind"), ("绿茶", "咖啡豆")]
)
def test_disjoint_strings_score_zero(prediction, reference):
    assert record_scores(prediction, reference) == {k: 0.0 for k in METRICS}


def test_chinese_partial_overlap_matches_the_hand_computed_rouge():
    # reference 我 喜 欢 喝 咖 啡 (6 characters), prediction 我 喜 欢 喝 茶 (5): 4 shared.
    # ROUGE-1: P = 4/5, R = 4/6, F1 = 2PR / (P + R) = 8/11.
    # ROUGE-2: bigrams 我喜 喜欢 欢喝 are shared (3), P = 3/4, R = 3/5, F1 = 2/3.
    scores = record_scores("我喜欢喝茶", "我喜欢喝咖啡")
    assert scores["rouge_1"] == pytest.approx(8 / 11)
    assert scores["rouge_2"] == pytest.approx(2 / 3)
    assert scores["rouge_l"] == pytest.approx(8 / 11)  # the longest common subsequence is the 4 shared
    assert 0 < scores["bleu"] < 1
    assert scores["exact_match"] == 0.0


def test_english_partial_overlap():
    scores = record_scores("the cat sat down", "the cat ran")
    # shared unigrams: the, cat; P = 2/4, R = 2/3, F1 = 4/7
    assert scores["rouge_1"] == pytest.approx(4 / 7)
    assert scores["rouge_2"] == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))


def test_bleu_of_identical_chinese_sentences_is_one():
    sentences = ["浓缩咖啡发酸通常是萃取不足。", "水温在九十到九十六度之间。"]
    assert corpus_scores(sentences, sentences)["bleu"] == 1.0
    assert record_scores(sentences[0], sentences[0])["bleu"] == 1.0


def test_exact_match_ignores_case_punctuation_and_spacing_only():
    assert normalize("Hello,   World!") == normalize("hello world")
    assert record_scores("Hello, World!", "hello world")["exact_match"] == 1.0
    assert record_scores("Hello, World", "hello word")["exact_match"] == 0.0


def test_empty_prediction_scores_zero_and_corpus_means_the_records():
    assert record_scores("", "咖啡")["bleu"] == 0.0
    scores = corpus_scores(["我喜欢喝茶", "咖啡"], ["我喜欢喝咖啡", "咖啡"])
    assert scores["rouge_1"] == pytest.approx((8 / 11 + 1) / 2)
    assert scores["exact_match"] == 0.5
    assert corpus_scores([], []) == {}


def test_corpus_scores_refuse_predictions_and_references_of_different_lengths():
    with pytest.raises(ValueError):
        corpus_scores(["a", "b"], ["a"])
