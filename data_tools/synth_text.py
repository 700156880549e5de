"""Wording of the synthetic corpus in English and Chinese: fixed templates and their parser.

Every answer is produced from a fixed template, so a model's output can be parsed back into shapes
(`parse_description`) and scored exactly (`vlm.demo.scoring.score_answer`). Attribute values are always stored under their
canonical English names (`data_tools.shapes.KINDS`, `COLOURS`, `POSITIONS`, `SIZES`); only the
sentences change with the language.
"""

from __future__ import annotations

import re

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


def single_image_qa(kind: str, shapes: tuple[Shape, ...], grayscale: bool, rng, lang: str) -> tuple[str, str]:
    """One question of type `kind` about a picture and its template answer."""
    q, w = QA[lang], WORDS[lang]
    if kind == "describe":
        return q["describe"], describe(shapes, grayscale, lang)
    if kind == "count":
        n = len(shapes)
        return q["count_q"], q["count_1"] if n == 1 else q["count_n"].format(n=w["count"][n])
    if kind == "kind_at":
        # Half the time ask about an occupied cell, or most answers would be "no shape there".
        pos = w["position"][rng.choice(shapes).position if rng.random() < 0.5 else rng.choice(POSITIONS)]
        at = [s for s in shapes if w["position"][s.position] == pos]
        answer = q["kind_at_a"].format(obj=_obj(at[0], grayscale, lang)) if at else q["kind_at_none"].format(pos=pos)
        return q["kind_at_q"].format(pos=pos), answer
    if kind == "exists":
        present = rng.random() < 0.5
        kind_colours = {(s.kind, s.colour) for s in shapes} if not grayscale else {(s.kind, None) for s in shapes}
        options = [(k, None if grayscale else c) for k in KINDS for c in COLOURS]
        pick = rng.choice(sorted(kind_colours if present else set(options) - kind_colours, key=str))
        colour = "" if pick[1] is None else w["colour"][pick[1]] + ("" if lang == "zh" else " ")
        obj = colour + w["kind"][pick[0]]
        if lang == "en":
            obj = ("an " if obj[0] in "aeiou" else "a ") + obj
        return q["exists_q"].format(obj=obj), q["yes"] if pick in kind_colours else q["no"]
    shape = rng.choice(shapes)
    if kind == "colour":
        question = q["colour_q"].format(ref=_ref(shape, shapes, grayscale, "colour", lang))
        return question, q["colour_gray"] if grayscale else q["colour_a"].format(colour=w["colour"][shape.colour])
    if kind == "where":
        question = q["where_q"].format(ref=_ref(shape, shapes, grayscale, "position", lang))
        return question, q["where_a"].format(pos=w["position"][shape.position])
    if kind == "size":
        question = q["size_q"].format(ref=_ref(shape, shapes, grayscale, "size", lang))
        return question, q["size_a"].format(size=w["size"][shape.size])
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


def pair_qa(kind: str, first: tuple, second: tuple, rng, lang: str) -> tuple[str, str]:
    """A question comparing two pictures; `first`/`second` are (shapes, grayscale) pairs."""
    q = PAIR_QA[lang]
    n1, n2 = len(first[0]), len(second[0])
    if kind == "counts":
        return q["counts_q"], q["counts_a"].format(n1=q["n_shapes"][n1], n2=q["n_shapes"][n2])
    if kind == "more":
        return q["more_q"], q["more_a"][0 if n1 > n2 else 1 if n2 > n1 else 2]
    if kind == "describe":
        which = rng.randrange(2)
        shapes, grayscale = (first, second)[which]
        return q["describe_q"][which], describe(shapes, grayscale, lang)
    if kind == "both":
        present = {s.kind for s in first[0]} | {s.kind for s in second[0]}
        shape_kind = rng.choice(sorted(present) if rng.random() < 0.7 else KINDS)
        in1, in2 = (any(s.kind == shape_kind for s in shapes) for shapes, _ in (first, second))
        answer = q["both_a"][0 if in1 and in2 else 1 if in1 else 2 if in2 else 3]
        return q["both_q"].format(kind=WORDS[lang]["kind"][shape_kind]), answer
    raise ValueError(f"unknown question type {kind!r}; known: {', '.join(PAIR_QUESTIONS)}")


TEXT_QA = {
    "en": {
        "kinds": ("What shapes can appear in the pictures?", "{items}."),
        "colours": ("What colours can the shapes have?", "{items}."),
        "positions": ("Which positions can a shape be in?", "{items}."),
        "sizes": ("Which sizes can a shape have?", "{items}."),
        "corners_q": "How many corners does a {kind} have?",
        "corners_a": {"circle": "A circle has no corners.", "square": "A square has four corners.",
                      "triangle": "A triangle has three corners.", "star": "A star has ten corners."},
        "opposite": ("What is the opposite of {a}?", "The opposite of {a} is {b}."),
    },
    "zh": {
        "kinds": ("图片里会出现哪些图形？", "{items}。"),
        "colours": ("图形有哪些颜色？", "{items}。"),
        "positions": ("图形可以在哪些位置？", "{items}。"),
        "sizes": ("图形有哪些大小？", "{items}。"),
        "corners_q": "{kind}有几个角？",
        "corners_a": {"circle": "圆形没有角。", "square": "正方形有四个角。", "triangle": "三角形有三个角。",
                      "star": "五角星有十个角。"},
        "opposite": ("{a}的反义词是什么？", "{a}的反义词是{b}。"),
    },
}
TEXT_QUESTIONS = ("kinds", "colours", "positions", "sizes", "corners", "opposite")


def _list_words(words: list[str], lang: str) -> str:
    if lang == "zh":
        return "、".join(words[:-1]) + "和" + words[-1]
    text = ", ".join(words[:-1]) + " and " + words[-1]
    return text[0].upper() + text[1:]


def text_qa(kind: str, rng, lang: str) -> tuple[str, str]:
    """A text-only question about the corpus vocabulary and its template answer."""
    t, w = TEXT_QA[lang], WORDS[lang]
    if kind in ("kinds", "colours", "positions", "sizes"):
        table = {"kinds": w["kinds"], "colours": w["colour"], "positions": w["position"], "sizes": w["size"]}[kind]
        question, answer = t[kind]
        return question, answer.format(items=_list_words(list(table.values()), lang))
    if kind == "corners":
        shape_kind = rng.choice(KINDS)
        return t["corners_q"].format(kind=w["kind"][shape_kind]), t["corners_a"][shape_kind]
    if kind == "opposite":
        a, b = rng.sample(SIZES, 2)
        question, answer = t["opposite"]
        return question.format(a=w["size"][a]), answer.format(a=w["size"][a], b=w["size"][b])
    raise ValueError(f"unknown question type {kind!r}; known: {', '.join(TEXT_QUESTIONS)}")
