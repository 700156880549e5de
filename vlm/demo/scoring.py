"""Scoring answers about the synthetic pictures against the generator's own truth (`data_tools.synth`).

    from vlm.demo.scoring import score_answer, score_question
    score_answer("One shape: a large red circle in the top left.", truth)   # {"exact": ..., "kind": ...}
    score_question("There are two shapes.", truth)                            # {"exact": ..., "attribute": ...}

An eval record of the synthetic corpus carries `truth` = {"answer", "lang", "count", "grayscale",
"shapes": [{"kind", "colour", "position", "size"}, ...]}. A reply is parsed back into shapes with the
generator's own phrase grammar (`data_tools.synth_text.parse_description`), so only the generator's
wording is understood: a garbled answer parses to fewer shapes and scores lower.

An eval_sft record asks one of the 17 SFT question types and carries `truth` = {"lang", "type", "turn",
"answer", "attribute"}; the value a reply names is read with the same templates
(`data_tools.synth_text.parse_answer`) and compared with the attribute the question asks for.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from data_tools.synth_text import QUESTION_TYPES, parse_answer, parse_description

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


QUESTION_METRICS = ("exact", "attribute")
"""Per-answer scores of an eval_sft question, each a bool: see `score_question`."""


def _colour_kinds(shapes: list[dict] | None) -> Counter:
    return Counter((s["colour"], s["kind"]) for s in shapes or [])


def score_question(answer: str, truth: dict) -> dict[str, bool]:
    """Score a reply to an eval_sft question against its `truth` ({"lang", "type", "answer", "attribute"}).

    `exact`: the same string after stripping whitespace. `attribute`: the value the question asks for, read
    from the reply with the generator's own grammar (`parse_answer`), is right: for the describe questions
    the multiset of (colour, kind) pairs (as `score_answer`'s colour_kind), for text-only questions the value
    inside the expected answer (the names listed, the number of corners, the opposite), else the value itself.
    Raises ValueError for a type or language the generator does not write.
    """
    qtype, lang = truth["type"], truth["lang"]
    got = parse_answer(qtype, answer, lang)
    want = parse_answer(qtype, truth["attribute"], lang) if qtype.startswith("text/") else truth["attribute"]
    if qtype.endswith("/describe"):
        right = bool(got) and _colour_kinds(got) == _colour_kinds(want)
    else:
        right = got is not None and got == want
    return {"exact": answer.strip() == truth["answer"].strip(), "attribute": right}


def question_rows(records: Sequence[Any], answers: Sequence[str]) -> list[dict]:
    """One row per eval_sft record (each with `key`, `names` and `truth`): its type, scored turn, the expected
    reply and attribute, the answer, `right` (the attribute) and the scores."""
    rows = []
    for record, answer in zip(records, answers):
        truth = record.truth
        scores = score_question(answer, truth)
        rows.append({"key": record.key, "images": record.names, "type": truth["type"], "turn": truth["turn"],
                     "truth": truth["answer"], "attribute": truth["attribute"], "answer": answer,
                     "right": scores["attribute"], "scores": scores})
    return rows


def summarize_questions(rows: Sequence[dict]) -> dict:
    """{"by_type", "by_group" (single, pair, text), "overall"}: the number of rows and the share right for
    each metric (None if empty); types in `QUESTION_TYPES` order, only those asked."""
    def part(selected: list[dict]) -> dict:
        n = len(selected)
        return {"n": n, **{m: (sum(r["scores"][m] for r in selected) / n if n else None) for m in QUESTION_METRICS}}

    order = {t: i for i, t in enumerate(QUESTION_TYPES)}
    types = sorted({r["type"] for r in rows}, key=lambda t: (order.get(t, len(order)), t))
    groups = list(dict.fromkeys(t.split("/")[0] for t in types))
    return {"by_type": {t: part([r for r in rows if r["type"] == t]) for t in types},
            "by_group": {g: part([r for r in rows if r["type"].split("/")[0] == g]) for g in groups},
            "overall": part(list(rows))}


def question_report(records: Sequence[Any], answers: Sequence[str]) -> dict:
    """`sft_scores` (`summarize_questions`) over eval_sft records and their answers, and the answer rows."""
    rows = question_rows(records, answers)
    return {"sft_scores": summarize_questions(rows), "answers": rows}


def question_table(summary: dict, indent: str = "") -> list[str]:
    """`summarize_questions`'s result as text lines: one per type, then per group and over all."""
    def line(name: str, row: dict) -> str:
        shares = "".join(f"{'n/a' if row[m] is None else format(row[m], '.3f'):>11}" for m in ("attribute", "exact"))
        return f"{indent}{name:<18}{row['n']:>6}{shares}"

    lines = [f"{indent}{'question type':<18}{'n':>6}{'attribute':>11}{'exact':>11}"]
    lines += [line(t, row) for t, row in summary["by_type"].items()]
    lines += [line(f"{g} (all)", row) for g, row in summary["by_group"].items()]
    return lines + [line("all questions", summary["overall"])]
