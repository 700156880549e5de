"""Scoring answers about the synthetic pictures against the generator's own truth (`data_tools.synth`).

    from vlm.demo.scoring import score_answer, scored_report
    score_answer("One shape: a large red circle in the top left.", truth)   # {"exact": ..., "kind": ...}

An eval record of the synthetic corpus carries `truth` = {"answer", "lang", "count", "grayscale",
"shapes": [{"kind", "colour", "position", "size"}, ...]}. A reply is parsed back into shapes with the
generator's own phrase grammar (`data_tools.synth_text.parse_description`), so only the generator's
wording is understood: a garbled answer parses to fewer shapes and scores lower.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from data_tools.synth_text import parse_description

METRICS = ("exact", "count", "kind", "colour", "position", "size", "colour_kind", "shapes")
"""Per-answer scores, each a bool: see `score_answer`."""


def score_answer(answer: str, truth: dict) -> dict[str, bool]:
    """Score a model's description against an eval record's `truth`.

    Keys: `exact` (same string after stripping whitespace), `count`, and per attribute whether the
    multiset of values matches (`kind`, `colour`, `position`, `size`), `colour_kind` (the multiset of
    (colour, kind) pairs, the demo's accuracy) and `shapes` (every attribute of every shape).
    Raises ValueError for a `truth["lang"]` the generator does not write.
    """
    pred = parse_description(answer, truth["lang"])
    want = truth["shapes"]

    def same(*fields: str) -> bool:
        return Counter(tuple(s[f] for f in fields) for s in pred) == Counter(tuple(s[f] for f in fields) for s in want)

    return {
        "exact": answer.strip() == truth["answer"].strip(),
        "count": len(pred) == len(want),
        "kind": same("kind"),
        "colour": same("colour"),
        "position": same("position"),
        "size": same("size"),
        "colour_kind": same("colour", "kind"),
        "shapes": same("kind", "colour", "position", "size"),
    }


def score_records(records: Sequence[Any], answers: Sequence[str]) -> list[dict]:
    """One row per record (each with `key`, `names` and `truth`): names, truth, answer, `right` (colour and
    kind of every shape) and the scores."""
    rows = []
    for record, answer in zip(records, answers):
        scores = score_answer(answer, record.truth)
        rows.append({"key": record.key, "images": record.names, "shapes": len(record.truth["shapes"]),
                     "truth": record.truth["answer"], "answer": answer, "right": scores["colour_kind"],
                     "scores": scores})
    return rows


def summarize(rows: Sequence[dict]) -> dict:
    """Per split (all, single, multi): the number of records and the share right for each metric (None if empty)."""
    splits = {"all": rows, "single": [r for r in rows if r["shapes"] == 1],
              "multi": [r for r in rows if r["shapes"] > 1]}
    return {name: {"n": len(part), **{m: (sum(r["scores"][m] for r in part) / len(part) if part else None)
                                      for m in METRICS}}
            for name, part in splits.items()}


def scored_report(records: Sequence[Any], answers: Sequence[str]) -> dict:
    """accuracy / multi_shape_accuracy (colour and kind right), every metric by split, and the answers."""
    rows = score_records(records, answers)
    summary = summarize(rows)
    return {"accuracy": summary["single"]["colour_kind"], "multi_shape_accuracy": summary["multi"]["colour_kind"],
            "scores": summary, "answers": rows}
