"""Answers scored against the synthetic generator's truth (vlm.demo.scoring)."""

from __future__ import annotations

from data_tools.synth import build_record
from vlm.demo.scoring import score_answer


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
