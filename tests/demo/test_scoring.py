"""Answers scored against the synthetic generator's truth (vlm.demo.scoring): captions and SFT questions."""

from __future__ import annotations

import pytest

from data_tools.synth import build_record
from data_tools.synth_text import QUESTION_TYPES
from vlm.demo.scoring import question_table, score_answer, score_question, summarize_questions


def test_the_generators_own_answers_score_full_marks():
    for index in range(20):
        record, _ = build_record("eval", index, seed=1)
        truth = record["truth"]
        assert all(score_answer(truth["answer"], truth).values())


def test_score_answer_on_hand_made_answers():
    truth = {"lang": "en", "answer": "Two shapes: a large red circle in the top left and a small blue star in the center.",
             "count": 2, "grayscale": False,
             "shapes": [{"kind": "circle", "colour": "red", "position": "top left", "size": "large"},
                        {"kind": "star", "colour": "blue", "position": "center", "size": "small"}]}
    assert all(score_answer(truth["answer"] + "  \n", truth).values())
    swapped = "Two shapes: a small blue star in the center and a large red circle in the top left."
    s = score_answer(swapped, truth)
    assert not s["exact"] and s["shapes"] and s["colour_kind"]
    wrong_colour = "Two shapes: a large green circle in the top left and a small blue star in the center."
    s = score_answer(wrong_colour, truth)
    assert s["kind"] and s["count"] and s["position"] and not s["colour"] and not s["colour_kind"]
    wrong_kind = "Two shapes: a large red square in the top left and a small blue star in the center."
    s = score_answer(wrong_kind, truth)
    assert s["colour"] and not s["kind"] and not s["colour_kind"]
    s = score_answer("One shape: a large red circle in the top left.", truth)
    assert not s["count"] and not s["colour_kind"]
    assert not any(score_answer("I see nothing", truth).values())


def test_score_answer_chinese():
    truth = {"lang": "zh", "answer": "一个图形：左上角有一个大的红色圆形。", "count": 1, "grayscale": False,
             "shapes": [{"kind": "circle", "colour": "red", "position": "top left", "size": "large"}]}
    assert all(score_answer(truth["answer"], truth).values())
    s = score_answer("一个图形：左上角有一个大的蓝色圆形。", truth)
    assert s["kind"] and not s["colour"]


RED_CIRCLE = {"kind": "circle", "colour": "red", "position": "top left", "size": "large"}
BLUE_STAR = {"kind": "star", "colour": "blue", "position": "center", "size": "small"}
GREEN_SQUARE = {"kind": "square", "colour": "green", "position": "bottom right", "size": "small"}

# type: (attribute, {lang: (expected answer, right but not exact, wrong attribute, garbled)})
QUESTIONS = {
    "single/describe": ([RED_CIRCLE, BLUE_STAR], {
        "en": ("Two shapes: a large red circle in the top left and a small blue star in the center.",
               "Two shapes: a small blue star in the top right and a large red circle in the top left.",
               "Two shapes: a large green circle in the top left and a small blue star in the center.",
               "Two shapes: large red circle, blue star."),
        "zh": ("两个图形：左上角有一个大的红色圆形，正中央有一个小的蓝色五角星。",
               "两个图形：正中央有一个小的蓝色五角星，左上角有一个大的红色圆形。",
               "两个图形：左上角有一个大的绿色圆形，正中央有一个小的蓝色五角星。",
               "红色圆形和蓝色五角星")}),
    "single/count": (2, {
        "en": ("There are two shapes.", "there are two shapes", "There are three shapes.", "Two shapes there."),
        "zh": ("图中有两个图形。", "图中有两个图形", "图中有三个图形。", "两个。")}),
    "single/kind_at": ({"kind": "circle", "colour": "red", "size": "large"}, {
        "en": ("It is a large red circle.", "It is a large red circle", "It is a small red circle.",
               "It is circle red."),
        "zh": ("是一个大的红色圆形。", "是一个大的红色圆形", "是一个小的红色圆形。", "红色的圆形")}),
    "single/exists": ("yes", {
        "en": ("Yes.", "Yes, there is.", "No.", "Maybe."),
        "zh": ("有。", "有", "没有。", "不知道。")}),
    "single/colour": ("red", {
        "en": ("It is red.", "it is red", "It is blue.", "It is reddish."),
        "zh": ("它是红色的。", "它是红色的", "它是蓝色的。", "红")}),
    "single/where": ("top left", {
        "en": ("It is in the top left.", "It is in the top left", "It is in the top right.", "It is in the top."),
        "zh": ("它在左上角。", "它在左上角", "它在右上角。", "左上")}),
    "single/size": ("small", {
        "en": ("It is small.", "It is small", "It is large.", "It is smallish."),
        "zh": ("它是小的。", "它是小的", "它是大的。", "小小")}),
    "pair/counts": ([1, 3], {
        "en": ("The first picture has one shape and the second picture has three shapes.",
               "the first picture has one shape and the second picture has three shapes",
               "The first picture has three shapes and the second picture has one shape.", "One and three."),
        "zh": ("第一张图片有一个图形，第二张图片有三个图形。", "第一张图片有一个图形，第二张图片有三个图形",
               "第一张图片有三个图形，第二张图片有一个图形。", "一和三")}),
    "pair/more": ("second", {
        "en": ("The second picture.", "The second picture", "The first picture.", "The picture."),
        "zh": ("第二张图片。", "第二张图片", "第一张图片。", "图片。")}),
    "pair/describe": ([GREEN_SQUARE], {
        "en": ("One shape: a small green square in the bottom right.",
               "One shape: a large green square in the center.",
               "One shape: a small green triangle in the bottom right.", "square green"),
        "zh": ("一个图形：右下角有一个小的绿色正方形。", "一个图形：正中央有一个大的绿色正方形。",
               "一个图形：右下角有一个小的绿色三角形。", "绿色正方形")}),
    "pair/both": ("neither", {
        "en": ("Neither picture does.", "neither picture does", "Yes, both do.", "Both neither."),
        "zh": ("两张都没有。", "两张都没有", "是的，两张都有。", "没有")}),
    "text/kinds": (None, {
        "en": ("Circles, squares, triangles and stars.", "Stars, circles, squares and triangles.",
               "Circles, squares and triangles.", "Shapes."),
        "zh": ("圆形、正方形、三角形和五角星。", "五角星、圆形、正方形和三角形。", "圆形、正方形和三角形。", "图形。")}),
    "text/colours": (None, {
        "en": ("Red, green, blue, yellow, purple and orange.", "Orange, purple, yellow, blue, green and red.",
               "Red, green, blue, yellow and purple.", "Many colours."),
        "zh": ("红色、绿色、蓝色、黄色、紫色和橙色。", "橙色、紫色、黄色、蓝色、绿色和红色。",
               "红色、绿色、蓝色、黄色和紫色。", "很多颜色。")}),
    "text/positions": (None, {
        "en": ("Top left, top middle, top right, middle left, center, middle right, bottom left, bottom middle "
               "and bottom right.",
               "Center, top left, top middle, top right, middle left, middle right, bottom left, bottom middle "
               "and bottom right.",
               "Top left, top right, bottom left and bottom right.", "Anywhere."),
        "zh": ("左上角、顶部中间、右上角、左侧中间、正中央、右侧中间、左下角、底部中间和右下角。",
               "正中央、左上角、顶部中间、右上角、左侧中间、右侧中间、左下角、底部中间和右下角。",
               "左上角、右上角、左下角和右下角。", "任何地方。")}),
    "text/sizes": (None, {
        "en": ("Small and large.", "Large and small.", "Small.", "Medium."),
        "zh": ("小和大。", "大和小。", "小。", "中。")}),
    "text/corners": (None, {
        "en": ("A square has four corners.", "a square has four corners", "A square has three corners.", "Four."),
        "zh": ("正方形有四个角。", "正方形有四个角", "正方形有三个角。", "四")}),
    "text/opposite": (None, {
        "en": ("The opposite of small is large.", "the opposite of small is large", "The opposite of small is small.",
               "Large."),
        "zh": ("小的反义词是大。", "小的反义词是大", "小的反义词是小。", "大")}),
}


def test_every_question_type_is_in_the_hand_made_table():
    assert set(QUESTIONS) == set(QUESTION_TYPES)


@pytest.mark.parametrize("lang", ["en", "zh"])
@pytest.mark.parametrize("qtype", QUESTION_TYPES)
def test_score_question_on_hand_made_replies(qtype, lang):
    attribute, replies = QUESTIONS[qtype]
    expected, right, wrong, garbled = replies[lang]
    truth = {"lang": lang, "type": qtype, "turn": 1, "answer": expected,
             "attribute": expected if qtype.startswith("text/") else attribute}
    assert score_question(expected + " \n", truth) == {"exact": True, "attribute": True}
    assert score_question(right, truth) == {"exact": False, "attribute": True}
    assert score_question(wrong, truth) == {"exact": False, "attribute": False}
    assert score_question(garbled, truth) == {"exact": False, "attribute": False}
    assert score_question("", truth) == {"exact": False, "attribute": False}


def test_kind_at_an_empty_cell_wants_the_no_shape_sentence():
    truth = {"lang": "en", "type": "single/kind_at", "turn": 2, "answer": "There is no shape in the center.",
             "attribute": "none"}
    assert score_question("There is no shape in the top left.", truth) == {"exact": False, "attribute": True}
    assert not score_question("It is a large red circle.", truth)["attribute"]
    zh = {"lang": "zh", "type": "single/kind_at", "turn": 1, "answer": "正中央没有图形。", "attribute": "none"}
    assert score_question("左上角没有图形。", zh)["attribute"]
    assert not score_question("是一个大的红色圆形。", zh)["attribute"]


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_the_generators_own_replies_to_every_question_score_full_marks(lang):
    for index in range(2 * len(QUESTION_TYPES)):
        truth = build_record("eval_sft", index, seed=4, lang=lang)[0]["truth"]
        assert score_question(truth["answer"], truth) == {"exact": True, "attribute": True}, truth


def test_unknown_type_or_language_is_refused():
    truth = {"lang": "en", "type": "single/count", "turn": 1, "answer": "There is one shape.", "attribute": 1}
    with pytest.raises(ValueError, match="question type"):
        score_question("x", truth | {"type": "single/weight"})
    with pytest.raises(ValueError, match="language"):
        score_question("x", truth | {"lang": "fr"})


def test_question_summary_by_type_group_and_overall():
    def row(qtype, exact, attribute):
        return {"type": qtype, "scores": {"exact": exact, "attribute": attribute}}

    rows = [row("text/sizes", True, True), row("single/count", False, True), row("single/count", False, False),
            row("pair/more", True, True)]
    summary = summarize_questions(rows)
    assert list(summary["by_type"]) == ["single/count", "pair/more", "text/sizes"]  # QUESTION_TYPES order
    assert summary["by_type"]["single/count"] == {"n": 2, "exact": 0.0, "attribute": 0.5}
    assert list(summary["by_group"]) == ["single", "pair", "text"]
    assert summary["by_group"]["text"] == {"n": 1, "exact": 1.0, "attribute": 1.0}
    assert summary["overall"] == {"n": 4, "exact": 0.5, "attribute": 0.75}
    assert summarize_questions([])["overall"] == {"n": 0, "exact": None, "attribute": None}
    table = question_table(summary)
    assert len(table) == 1 + 3 + 3 + 1 and table[1].split() == ["single/count", "2", "0.500", "0.000"]
