"""Wording of the synthetic corpus in English and Chinese: fixed templates and their parser.

Every answer is produced from a fixed template, so a model's output can be parsed back into shapes
(`parse_description`) or into the value a question asks for (`parse_answer`) and scored exactly
(`vlm.demo.scoring.score_answer`, `score_question`). Attribute values are always stored under their
canonical English names (`data_tools.shapes.KINDS`, `COLOURS`, `POSITIONS`, `SIZES`); only the
sentences change with the language.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

from data_tools.shapes import COLOURS, KINDS, POSITIONS, SIZES, Shape

LANGS = ("en", "zh")

WORDS = {
    "en": {
        "kind": {k: k for k in KINDS},
        "kinds": {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars"},
        "colour": {c: c for c in COLOURS},
        "position": {p: p for p in POSITIONS},
        "size": {s: s for s in SIZES},
        "count": {1: "one", 2: "two", 3: "three"},
    },
    "zh": {
        "kind": {"circle": "圆形", "square": "正方形", "triangle": "三角形", "star": "五角星"},
        "kinds": {"circle": "圆形", "square": "正方形", "triangle": "三角形", "star": "五角星"},
        "colour": {"red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色", "purple": "紫色",
                   "orange": "橙色"},
        "position": dict(zip(POSITIONS, ("左上角", "顶部中间", "右上角", "左侧中间", "正中央", "右侧中间",
                                         "左下角", "底部中间", "右下角"))),
        "size": {"small": "小", "large": "大"},
        "count": {1: "一", 2: "两", 3: "三"},
    },
}

# The fixed question of eval records (and one of the training prompts).
EVAL_PROMPT = {"en": "<image>\nDescribe the shapes.", "zh": "<image>\n描述图中的图形。"}


def _check_lang(lang: str) -> None:
    if lang not in LANGS:
        raise ValueError(f"unknown language {lang!r}; use one of {', '.join(LANGS)} (--lang)")


def _join(items: list[str], lang: str) -> str:
    if lang == "zh":
        return "，".join(items)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def shape_phrase(shape: Shape, grayscale: bool, lang: str) -> str:
    """'a large red circle in the top left' / '左上角有一个大的红色圆形' (no colour when grayscale)."""
    w = WORDS[lang]
    colour = "" if grayscale else w["colour"][shape.colour]
    if lang == "zh":
        return f"{w['position'][shape.position]}有一个{w['size'][shape.size]}的{colour}{w['kind'][shape.kind]}"
    return f"a {w['size'][shape.size]} {colour + ' ' if colour else ''}{w['kind'][shape.kind]} " \
           f"in the {w['position'][shape.position]}"


def describe(shapes: tuple[Shape, ...], grayscale: bool, lang: str) -> str:
    """The full caption, e.g. 'Two shapes: a large red circle in the top left and a small blue star in the center.'"""
    _check_lang(lang)
    n = len(shapes)
    items = _join([shape_phrase(s, grayscale, lang) for s in shapes], lang)
    count = WORDS[lang]["count"][n]
    if lang == "zh":
        return f"{count}个图形{'（灰度图）' if grayscale else ''}：{items}。"
    head = f"{count.capitalize()} shape{'s' if n > 1 else ''}{', in grayscale' if grayscale else ''}"
    return f"{head}: {items}."


def _alternation(names: dict) -> str:
    """Regex alternation of the words, longest first so 'top left' wins over a shorter prefix."""
    return "|".join(re.escape(v) for v in sorted(names.values(), key=len, reverse=True))


def _phrase_regex(lang: str) -> re.Pattern:
    w = WORDS[lang]
    kind, colour = _alternation(w["kind"]), _alternation(w["colour"])
    position, size = _alternation(w["position"]), _alternation(w["size"])
    if lang == "zh":
        return re.compile(f"(?P<position>{position})有一个(?P<size>{size})的(?P<colour>{colour})?(?P<kind>{kind})")
    return re.compile(f"\\ban? (?P<size>{size}) (?:(?P<colour>{colour}) )?(?P<kind>{kind}) in the (?P<position>{position})\\b")


def parse_description(text: str, lang: str) -> list[dict]:
    """Shapes named in a description, in order: [{'kind', 'colour' (None if absent), 'position', 'size'}].

    Words the templates do not use are ignored, so a garbled answer parses to fewer shapes.
    """
    _check_lang(lang)
    back = {field: {v: k for k, v in WORDS[lang][field].items()} for field in ("kind", "colour", "position", "size")}
    shapes = []
    for m in _phrase_regex(lang).finditer(text):
        shapes.append({field: back[field].get(m.group(field)) for field in ("kind", "colour", "position", "size")})
    return shapes


class Asked(NamedTuple):
    """One question/answer turn and the canonical value the question asks for (see `QUESTION_TYPES`)."""

    question: str
    answer: str
    attribute: Any


QA = {
    "en": {
        "describe": "Describe the shapes.",
        "count_q": "How many shapes are there?", "count_1": "There is one shape.", "count_n": "There are {n} shapes.",
        "kind_at_q": "What shape is in the {pos}?", "kind_at_a": "It is {obj}.",
        "kind_at_none": "There is no shape in the {pos}.",
        "colour_q": "What colour is the {ref}?", "colour_a": "It is {colour}.",
        "colour_gray": "The picture is in grayscale, so its colour cannot be told.",
        "where_q": "Where is the {ref}?", "where_a": "It is in the {pos}.",
        "size_q": "Is the {ref} large or small?", "size_a": "It is {size}.",
        "exists_q": "Is there {obj} in the picture?", "yes": "Yes.", "no": "No.",
        "obj": "{size} {colour}{kind}", "ref_pos": "{kind} in the {pos}", "ref_colour": "{colour} {kind}",
    },
    "zh": {
        "describe": "描述图中的图形。",
        "count_q": "图中有几个图形？", "count_1": "图中有一个图形。", "count_n": "图中有{n}个图形。",
        "kind_at_q": "{pos}是什么图形？", "kind_at_a": "是{obj}。", "kind_at_none": "{pos}没有图形。",
        "colour_q": "{ref}是什么颜色？", "colour_a": "它是{colour}的。", "colour_gray": "这是一张灰度图，看不出颜色。",
        "where_q": "{ref}在哪里？", "where_a": "它在{pos}。",
        "size_q": "{ref}是大还是小？", "size_a": "它是{size}的。",
        "exists_q": "图中有{obj}吗？", "yes": "有。", "no": "没有。",
        "obj": "{size}的{colour}{kind}", "ref_pos": "{pos}的{kind}", "ref_colour": "{colour}{kind}",
    },
}


def _obj(shape: Shape, grayscale: bool, lang: str) -> str:
    """'a large red circle' / '一个大的红色圆形'."""
    w = WORDS[lang]
    colour = "" if grayscale else w["colour"][shape.colour] + ("" if lang == "zh" else " ")
    text = QA[lang]["obj"].format(size=w["size"][shape.size], colour=colour, kind=w["kind"][shape.kind])
    return "一个" + text if lang == "zh" else "a " + text


def _ref(shape: Shape, shapes: tuple[Shape, ...], grayscale: bool, avoid: str, lang: str) -> str:
    """The shortest phrase naming `shape` uniquely among `shapes` without using attribute `avoid`."""
    w = WORDS[lang]
    kind = w["kind"][shape.kind]
    if sum(s.kind == shape.kind for s in shapes) == 1:
        return kind
    if avoid != "position":
        return QA[lang]["ref_pos"].format(kind=kind, pos=w["position"][shape.position])
    if grayscale:
        raise ValueError("grayscale scenes need distinct kinds to refer to a shape without colour")
    return QA[lang]["ref_colour"].format(colour=w["colour"][shape.colour], kind=kind)


def _attributes(shapes: tuple[Shape, ...], grayscale: bool) -> list[dict]:
    return [s.truth(grayscale) for s in shapes]


def single_image_qa(kind: str, shapes: tuple[Shape, ...], grayscale: bool, rng, lang: str) -> Asked:
    """One question of type `kind` about a picture, its template answer and the attribute asked for: the
    shapes (describe), the number (count), {kind, colour, size} or "none" (kind_at), "yes"/"no" (exists),
    or the colour, position or size name."""
    q, w = QA[lang], WORDS[lang]
    if kind == "describe":
        return Asked(q["describe"], describe(shapes, grayscale, lang), _attributes(shapes, grayscale))
    if kind == "count":
        n = len(shapes)
        return Asked(q["count_q"], q["count_1"] if n == 1 else q["count_n"].format(n=w["count"][n]), n)
    if kind == "kind_at":
        # Half the time ask about an occupied cell, or most answers would be "no shape there".
        pos = w["position"][rng.choice(shapes).position if rng.random() < 0.5 else rng.choice(POSITIONS)]
        at = [s for s in shapes if w["position"][s.position] == pos]
        answer = q["kind_at_a"].format(obj=_obj(at[0], grayscale, lang)) if at else q["kind_at_none"].format(pos=pos)
        attribute = {"kind": at[0].kind, "colour": None if grayscale else at[0].colour, "size": at[0].size} \
            if at else "none"
        return Asked(q["kind_at_q"].format(pos=pos), answer, attribute)
    if kind == "exists":
        present = rng.random() < 0.5
        kind_colours = {(s.kind, s.colour) for s in shapes} if not grayscale else {(s.kind, None) for s in shapes}
        options = [(k, None if grayscale else c) for k in KINDS for c in COLOURS]
        pick = rng.choice(sorted(kind_colours if present else set(options) - kind_colours, key=str))
        colour = "" if pick[1] is None else w["colour"][pick[1]] + ("" if lang == "zh" else " ")
        obj = colour + w["kind"][pick[0]]
        if lang == "en":
            obj = ("an " if obj[0] in "aeiou" else "a ") + obj
        present = pick in kind_colours
        return Asked(q["exists_q"].format(obj=obj), q["yes"] if present else q["no"], "yes" if present else "no")
    shape = rng.choice(shapes)
    if kind == "colour":
        question = q["colour_q"].format(ref=_ref(shape, shapes, grayscale, "colour", lang))
        answer = q["colour_gray"] if grayscale else q["colour_a"].format(colour=w["colour"][shape.colour])
        return Asked(question, answer, None if grayscale else shape.colour)
    if kind == "where":
        question = q["where_q"].format(ref=_ref(shape, shapes, grayscale, "position", lang))
        return Asked(question, q["where_a"].format(pos=w["position"][shape.position]), shape.position)
    if kind == "size":
        question = q["size_q"].format(ref=_ref(shape, shapes, grayscale, "size", lang))
        return Asked(question, q["size_a"].format(size=w["size"][shape.size]), shape.size)
    raise ValueError(f"unknown question type {kind!r}; known: {', '.join(SINGLE_QUESTIONS)}")


SINGLE_QUESTIONS = ("describe", "count", "kind_at", "exists", "colour", "where", "size")


PAIR_QA = {
    "en": {
        "counts_q": "How many shapes are in each picture?",
        "counts_a": "The first picture has {n1} and the second picture has {n2}.",
        "n_shapes": {1: "one shape", 2: "two shapes", 3: "three shapes"},
        "more_q": "Which picture has more shapes?",
        "more_a": ("The first picture.", "The second picture.", "Both pictures have the same number of shapes."),
        "describe_q": ("Describe the first picture.", "Describe the second picture."),
        "both_q": "Do both pictures contain a {kind}?",
        "both_a": ("Yes, both do.", "Only the first picture does.", "Only the second picture does.",
                   "Neither picture does."),
    },
    "zh": {
        "counts_q": "每张图片里各有几个图形？",
        "counts_a": "第一张图片有{n1}，第二张图片有{n2}。",
        "n_shapes": {1: "一个图形", 2: "两个图形", 3: "三个图形"},
        "more_q": "哪张图片里的图形更多？",
        "more_a": ("第一张图片。", "第二张图片。", "两张图片的图形一样多。"),
        "describe_q": ("描述第一张图片。", "描述第二张图片。"),
        "both_q": "两张图片里都有{kind}吗？",
        "both_a": ("是的，两张都有。", "只有第一张有。", "只有第二张有。", "两张都没有。"),
    },
}
PAIR_QUESTIONS = ("counts", "more", "describe", "both")


MORE = ("first", "second", "same")
"""The attribute of a pair/more answer, in the order of PAIR_QA's "more_a"."""
BOTH = ("both", "first", "second", "neither")
"""The attribute of a pair/both answer, in the order of PAIR_QA's "both_a"."""


def pair_qa(kind: str, first: tuple, second: tuple, rng, lang: str) -> Asked:
    """A question comparing two pictures, its answer and the attribute asked for: [n1, n2] (counts), one of
    `MORE` or `BOTH`, or the described picture's shapes; `first`/`second` are (shapes, grayscale) pairs."""
    q = PAIR_QA[lang]
    n1, n2 = len(first[0]), len(second[0])
    if kind == "counts":
        return Asked(q["counts_q"], q["counts_a"].format(n1=q["n_shapes"][n1], n2=q["n_shapes"][n2]), [n1, n2])
    if kind == "more":
        which = 0 if n1 > n2 else 1 if n2 > n1 else 2
        return Asked(q["more_q"], q["more_a"][which], MORE[which])
    if kind == "describe":
        which = rng.randrange(2)
        shapes, grayscale = (first, second)[which]
        return Asked(q["describe_q"][which], describe(shapes, grayscale, lang), _attributes(shapes, grayscale))
    if kind == "both":
        present = {s.kind for s in first[0]} | {s.kind for s in second[0]}
        shape_kind = rng.choice(sorted(present) if rng.random() < 0.7 else KINDS)
        in1, in2 = (any(s.kind == shape_kind for s in shapes) for shapes, _ in (first, second))
        which = 0 if in1 and in2 else 1 if in1 else 2 if in2 else 3
        return Asked(q["both_q"].format(kind=WORDS[lang]["kind"][shape_kind]), q["both_a"][which], BOTH[which])
    raise ValueError(f"unknown question type {kind!r}; known: {', '.join(PAIR_QUESTIONS)}")


TEXT_QA = {
    "en": {
        "kinds": ("What shapes can appear in the pictures?", "{items}."),
        "colours": ("What colours can the shapes have?", "{items}."),
        "positions": ("Which positions can a shape be in?", "{items}."),
        "sizes": ("Which sizes can a shape have?", "{items}."),
        "corners_q": "How many corners does a {kind} have?",
        "corners_a": "A {kind} has {corners}.",
        "corners": {0: "no corners", 3: "three corners", 4: "four corners", 10: "ten corners"},
        "opposite": ("What is the opposite of {a}?", "The opposite of {a} is {b}."),
    },
    "zh": {
        "kinds": ("图片里会出现哪些图形？", "{items}。"),
        "colours": ("图形有哪些颜色？", "{items}。"),
        "positions": ("图形可以在哪些位置？", "{items}。"),
        "sizes": ("图形有哪些大小？", "{items}。"),
        "corners_q": "{kind}有几个角？",
        "corners_a": "{kind}{corners}。",
        "corners": {0: "没有角", 3: "有三个角", 4: "有四个角", 10: "有十个角"},
        "opposite": ("{a}的反义词是什么？", "{a}的反义词是{b}。"),
    },
}
TEXT_QUESTIONS = ("kinds", "colours", "positions", "sizes", "corners", "opposite")
CORNERS = {"circle": 0, "square": 4, "triangle": 3, "star": 10}


def _list_words(words: list[str], lang: str) -> str:
    if lang == "zh":
        return "、".join(words[:-1]) + "和" + words[-1]
    text = ", ".join(words[:-1]) + " and " + words[-1]
    return text[0].upper() + text[1:]


def _list_table(kind: str, lang: str) -> dict:
    w = WORDS[lang]
    return {"kinds": w["kinds"], "colours": w["colour"], "positions": w["position"], "sizes": w["size"]}[kind]


def text_qa(kind: str, rng, lang: str) -> Asked:
    """A text-only question about the corpus vocabulary, its template answer, and as the attribute that
    answer itself (`parse_answer` reads the asked value out of it)."""
    t, w = TEXT_QA[lang], WORDS[lang]
    if kind in ("kinds", "colours", "positions", "sizes"):
        question, answer = t[kind]
        answer = answer.format(items=_list_words(list(_list_table(kind, lang).values()), lang))
        return Asked(question, answer, answer)
    if kind == "corners":
        shape_kind = rng.choice(KINDS)
        answer = t["corners_a"].format(kind=w["kind"][shape_kind], corners=t["corners"][CORNERS[shape_kind]])
        return Asked(t["corners_q"].format(kind=w["kind"][shape_kind]), answer, answer)
    if kind == "opposite":
        a, b = rng.sample(SIZES, 2)
        question, answer = t["opposite"]
        answer = answer.format(a=w["size"][a], b=w["size"][b])
        return Asked(question.format(a=w["size"][a]), answer, answer)
    raise ValueError(f"unknown question type {kind!r}; known: {', '.join(TEXT_QUESTIONS)}")


QUESTION_TYPES = tuple(f"single/{k}" for k in SINGLE_QUESTIONS) + tuple(f"pair/{k}" for k in PAIR_QUESTIONS) \
    + tuple(f"text/{k}" for k in TEXT_QUESTIONS)
"""Every question type as "group/kind": 7 about one picture, 4 comparing two, 6 text-only."""


def _named(name: str, names: dict) -> str:
    return f"(?P<{name}>{_alternation(names)})"


def _regex(template: str, **fields: str) -> str:
    """A template as regex text: its words escaped, each {field} replaced by `fields[field]`, the closing full
    stop left out (a reply may end without it)."""
    pieces = re.split(r"\{(\w+)\}", template.rstrip(".。"))
    return "".join(fields[p] if i % 2 else re.escape(p) for i, p in enumerate(pieces))


def _pattern(template: str, lang: str, **fields: str) -> re.Pattern:
    """`_regex` compiled; English case-insensitive and never inside a longer word."""
    regex = _regex(template, **fields)
    return re.compile(rf"(?<!\w){regex}(?!\w)", re.IGNORECASE) if lang == "en" else re.compile(regex)


def _key(names: dict, word: str) -> Any:
    """The canonical key of a word of `names` (English compared case-insensitively)."""
    return {v.lower(): k for k, v in names.items()}[word.lower()]


def _sentences(templates: tuple[str, ...], values: tuple, lang: str) -> list:
    return [(_pattern(t, lang), lambda m, v=v: v) for t, v in zip(templates, values)]


def _single_grammar(lang: str) -> dict[str, list]:
    q, w = QA[lang], WORDS[lang]
    optional_colour = f"(?:{_named('colour', w['colour'])} )?" if lang == "en" else f"{_named('colour', w['colour'])}?"
    obj = ("一个" if lang == "zh" else "an? ") + _regex(q["obj"], size=_named("size", w["size"]),
                                                       colour=optional_colour, kind=_named("kind", w["kind"]))
    return {
        "count": [(_pattern(q["count_1"], lang), lambda m: 1),
                  (_pattern(q["count_n"], lang, n=_named("n", w["count"])), lambda m: _key(w["count"], m["n"]))],
        "kind_at": [(_pattern(q["kind_at_a"], lang, obj=obj),
                     lambda m: {"kind": _key(w["kind"], m["kind"]), "size": _key(w["size"], m["size"]),
                                "colour": _key(w["colour"], m["colour"]) if m["colour"] else None}),
                    (_pattern(q["kind_at_none"], lang, pos=_named("pos", w["position"])), lambda m: "none")],
        "exists": _sentences((q["yes"], q["no"]), ("yes", "no"), lang),
        "colour": [(_pattern(q["colour_a"], lang, colour=_named("colour", w["colour"])),
                    lambda m: _key(w["colour"], m["colour"]))],
        "where": [(_pattern(q["where_a"], lang, pos=_named("pos", w["position"])),
                   lambda m: _key(w["position"], m["pos"]))],
        "size": [(_pattern(q["size_a"], lang, size=_named("size", w["size"])), lambda m: _key(w["size"], m["size"]))],
    }


def _pair_grammar(lang: str) -> dict[str, list]:
    q = PAIR_QA[lang]
    n = q["n_shapes"]
    return {
        "counts": [(_pattern(q["counts_a"], lang, n1=_named("n1", n), n2=_named("n2", n)),
                    lambda m: [_key(n, m["n1"]), _key(n, m["n2"])])],
        "more": _sentences(q["more_a"], MORE, lang),
        "both": _sentences(q["both_a"], BOTH, lang),
    }


def _text_grammar(lang: str) -> dict[str, list]:
    t, w = TEXT_QA[lang], WORDS[lang]
    return {
        "corners": [(_pattern(t["corners_a"], lang, kind=_named("kind", w["kind"]),
                              corners=_named("corners", t["corners"])), lambda m: _key(t["corners"], m["corners"]))],
        "opposite": [(_pattern(t["opposite"][1], lang, a=_named("a", w["size"]), b=_named("b", w["size"])),
                      lambda m: _key(w["size"], m["b"]))],
    }


_GRAMMARS: dict[str, dict[str, list]] = {}


def _grammar(lang: str) -> dict[str, list]:
    """{question type: [(regex, value of a match), ...]} for one language, compiled once."""
    if lang not in _GRAMMARS:
        _GRAMMARS[lang] = {f"{group}/{kind}": options for group, build in
                           (("single", _single_grammar), ("pair", _pair_grammar), ("text", _text_grammar))
                           for kind, options in build(lang).items()}
    return _GRAMMARS[lang]


def parse_answer(qtype: str, text: str, lang: str) -> Any:
    """The value a reply to a question of `qtype` (one of `QUESTION_TYPES`) names, read with the templates'
    own grammar, in `Asked.attribute`'s canonical form; for text-only types the value inside the answer (the
    sorted names listed, the number of corners, the opposite size). None when no template phrase is found;
    where several are, the first in the text counts."""
    _check_lang(lang)
    if qtype not in QUESTION_TYPES:
        raise ValueError(f"unknown question type {qtype!r}; known: {', '.join(QUESTION_TYPES)}")
    kind = qtype.split("/")[1]
    if kind == "describe":
        return parse_description(text, lang)
    if kind in ("kinds", "colours", "positions", "sizes"):
        table = _list_table(kind, lang)
        regex = _pattern("{w}", lang, w=_named("w", table))
        return sorted(_key(table, m["w"]) for m in regex.finditer(text)) or None
    found = [(m.start(), -len(m.group()), value(m)) for regex, value in _grammar(lang)[qtype]
             if (m := regex.search(text))]
    return min(found, key=lambda f: f[:2])[2] if found else None
