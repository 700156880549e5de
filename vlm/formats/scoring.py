"""Which turn of a record is its reference answer, and how a generated answer is scored against it.

    from vlm.formats.scoring import answer_split, score_pair
    prompt, reference = answer_split(record["conversations"])      # turns before the last reply, that reply
    score_pair("The cat.", "a cat")    # {"exact_match": False, "normalized_match": True, "token_f1": 1.0}

One rule for eval (`vlm.eval`) and the trainer's periodic answers (`vlm.train.eval_answers`): a record is
answered once, at its last assistant turn, given every earlier turn as written (the true previous replies,
not the model's), so a multi-turn record scores only its last reply. The scores are generic (any reference
text); the synthetic corpus's per-attribute scores are `vlm.demo.scoring`.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence

SCORES = ("exact_match", "normalized_match", "token_f1")
"""Per-answer scores of `score_pair`: two bools and a float in [0, 1]."""

_ASCII_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
# One token per CJK ideograph or kana (these scripts write no spaces between words); any other run of
# non-space characters is one token.
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_TOKEN = re.compile(rf"[{_CJK}]|[^\s{_CJK}]+")


def last_reply_index(conversations: Sequence[dict]) -> int | None:
    """Index of the last assistant turn, or None when there is none."""
    return max((i for i, m in enumerate(conversations) if m.get("role") == "assistant"), default=None)


def answer_split(conversations: Sequence[dict]) -> tuple[list[dict], str | None]:
    """(prompt turns, reference): the turns before the last assistant turn and that turn's text. Without an
    assistant turn the whole conversation is the prompt and the reference is None."""
    last = last_reply_index(conversations)
    if last is None:
        return list(conversations), None
    return list(conversations[:last]), conversations[last]["content"]


def question_text(prompt: Sequence[dict]) -> str:
    """The last user turn of a prompt (what a log line shows of it), or "" when it has none."""
    return next((m["content"] for m in reversed(prompt) if m.get("role") == "user"), "")


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation, drop the articles a/an/the, collapse whitespace.

    The normalisation of SQuAD v1.1's official evaluation script (`normalize_answer` in evaluate-v1.1.py,
    Rajpurkar et al. 2016), restated: lower -> remove punctuation -> remove articles -> join on single
    spaces. One addition: punctuation is ASCII's (`string.punctuation`, SQuAD's set) and every Unicode
    punctuation character (category P*), so that Chinese answers lose their `，。：` too. A removed character
    leaves nothing behind, as in SQuAD's (so "don't" becomes "dont").
    """
    text = "".join(ch for ch in text.lower() if ch not in _ASCII_PUNCTUATION
                   and not unicodedata.category(ch).startswith("P"))
    return " ".join(_ARTICLES.sub(" ", text).split())


def answer_tokens(text: str) -> list[str]:
    """The tokens of the normalised text: whitespace-separated words, each CJK character a token of its own."""
    return _TOKEN.findall(normalize_answer(text))


def exact_match(answer: str, reference: str) -> bool:
    """The same string once leading and trailing whitespace is stripped."""
    return answer.strip() == reference.strip()


def normalized_match(answer: str, reference: str) -> bool:
    """The same string after `normalize_answer` (SQuAD's "exact match")."""
    return normalize_answer(answer) == normalize_answer(reference)


def token_f1(answer: str, reference: str) -> float:
    """Harmonic mean of token precision and recall over `answer_tokens`, counted as multisets (SQuAD's F1).

    Both empty: 1.0; one empty: 0.0.
    """
    pred, gold = answer_tokens(answer), answer_tokens(reference)
    if not pred or not gold:
        return float(pred == gold)
    same = sum((Counter(pred) & Counter(gold)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def score_pair(answer: str, reference: str) -> dict:
    """{"exact_match", "normalized_match", "token_f1"} of one answer against its reference."""
    return {"exact_match": exact_match(answer, reference), "normalized_match": normalized_match(answer, reference),
            "token_f1": token_f1(answer, reference)}


def mean_scores(rows: Iterable[dict]) -> dict:
    """{"n", and the mean of each of SCORES over rows that carry them} (None for each when there are none)."""
    rows = list(rows)
    n = len(rows)
    return {"n": n, **{s: (sum(float(r[s]) for r in rows) / n if n else None) for s in SCORES}}
