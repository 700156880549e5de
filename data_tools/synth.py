"""The built-in synthetic picture corpus: MiniMind-V's data layout filled with pictures of coloured shapes.

    python -m data_tools.synth --out dataset [--pretrain 2000] [--sft 1000] [--eval 200] [--eval_sft 612] \
        [--seed 0] [--lang en|zh] [--workers 2]

Writes `pretrain_data.jsonl` + `pretrain_images/`, `sft_data.jsonl` + `sft_images/` and the held-out
`eval_data.jsonl` + `eval_images/` and `eval_sft_data.jsonl` + `eval_sft_images/`, plus `synth_info.json`
(the arguments; it marks the folder as ours so a re-run may replace it). Records follow MiniMind-V:
`{"conversations": [{"role": "user", "content": "<image>\\n..."}, {"role": "assistant", "content": "..."}],
"image": "a.jpg"}`; two-image records list `"a.png, b.jpg"`, text-only records have no `image`.
Eval records ask `EVAL_PROMPT` about pictures without grayscale (even index: one shape, odd: two or three)
and carry `truth`: `{"lang", "answer" (the exact expected reply), "count", "grayscale", "shapes":
[{"kind", "colour", "position", "size"}, ...]}`; `vlm.demo.scoring.score_answer(reply, truth)` scores
a reply.
Eval SFT records are SFT dialogues (one picture, two, or text only; pictures without grayscale) cut after
the reply that is scored, the 1st, 2nd or 3rd; record i asks `QUESTION_TYPES[i % 17]`, so every type is
asked equally often. Their `truth` is `{"lang", "type" ("single/count", "pair/more", "text/corners", ...),
"turn" (1-based), "answer" (the exact expected reply), "attribute" (the value asked for, see
`data_tools.synth_text.Asked`)}`; `vlm.demo.scoring.score_question(reply, truth)` scores a reply.

Every record draws from its own RNG seeded by (seed, split, index): the same arguments give byte-identical
files, and record i of a split does not depend on the other counts or on the language. `--workers` only
changes the speed: pictures are drawn in a process pool, records written in order.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

from tqdm import tqdm

from data_tools.shapes import Scene, encode, render, sample_scene
from data_tools.synth_text import (
    EVAL_PROMPT,
    LANGS,
    PAIR_QUESTIONS,
    QUESTION_TYPES,
    SINGLE_QUESTIONS,
    TEXT_QUESTIONS,
    WORDS,
    describe,
    pair_qa,
    parse_description,
    single_image_qa,
    text_qa,
)

__all__ = ["EVAL_PROMPT", "build_record", "iter_corpus_text", "main", "parse_description",
           "write_corpus"]

SPLITS = ("pretrain", "sft", "eval", "eval_sft")
_TOKENIZER_SPLITS = ("pretrain", "sft", "eval")  # iter_corpus_text's sample: the built-in tokenizer's text
PRETRAIN_PROMPTS = {
    "en": ("Describe the picture.\n<image>", "<image>\nWhat is in this image?", EVAL_PROMPT["en"],
           "What shapes do you see?\n<image>", "<image>\nGive a short description of the image.",
           "Look at the picture and list the shapes.\n<image>"),
    "zh": ("描述这张图片。\n<image>", "<image>\n这张图片里有什么？", EVAL_PROMPT["zh"],
           "你看到了哪些图形？\n<image>", "<image>\n简要描述这张图片。", "看图并列出其中的图形。\n<image>"),
}
INFO_FILE = "synth_info.json"
_OUR_IMAGE = re.compile(r"^(pretrain|sft|eval|eval_sft)_\d{6}(_\d)?\.(jpg|png)$")

Images = list[tuple[str, Scene]]


def _conversation(turns: list[tuple]) -> list[dict]:
    """Alternating user/assistant messages from (question, answer, ...) turns."""
    messages = []
    for question, answer, *_ in turns:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return messages


def _with_images(question: str, n_images: int, rng: random.Random) -> str:
    """Put the `<image>` placeholders before the question (mostly) or after it."""
    tags = "\n".join(["<image>"] * n_images)
    return f"{tags}\n{question}" if rng.random() < 0.7 else f"{question}\n{tags}"


def _pretrain(rng: random.Random, index: int, lang: str) -> tuple[dict, Images]:
    scene = sample_scene(rng)
    name = f"pretrain_{index:06d}.{scene.fmt}"
    prompt = rng.choice(PRETRAIN_PROMPTS[lang])
    turns = [(prompt, describe(scene.shapes, scene.grayscale, lang))]
    return {"conversations": _conversation(turns), "image": name}, [(name, scene)]


def _sft(rng: random.Random, index: int, lang: str) -> tuple[dict, Images]:
    """75% one picture, 15% two pictures compared, 10% text only; 2-3 question/answer turns each."""
    n_turns = rng.choice((2, 3))
    u = rng.random()
    if u < 0.10:
        kinds = rng.sample(TEXT_QUESTIONS, n_turns)
        return {"conversations": _conversation([text_qa(k, rng, lang) for k in kinds])}, []
    if u < 0.25:
        scenes = [sample_scene(rng), sample_scene(rng)]
        names = [f"sft_{index:06d}_{k}.{s.fmt}" for k, s in enumerate(scenes)]
        pair = [(s.shapes, s.grayscale) for s in scenes]
        turns = [pair_qa(k, *pair, rng, lang) for k in rng.sample(PAIR_QUESTIONS, n_turns)]
    else:
        scenes = [sample_scene(rng)]
        names = [f"sft_{index:06d}.{scenes[0].fmt}"]
        # The eval question opens a third of the dialogues so the SFT model keeps answering it.
        first = "describe" if rng.random() < 0.35 else rng.choice(SINGLE_QUESTIONS[1:])
        rest = rng.sample([k for k in SINGLE_QUESTIONS if k != first], n_turns - 1)
        turns = [single_image_qa(k, scenes[0].shapes, scenes[0].grayscale, rng, lang) for k in [first, *rest]]
    turns[0] = (_with_images(turns[0][0], len(scenes), rng), turns[0][1])
    return {"conversations": _conversation(turns), "image": ", ".join(names)}, list(zip(names, scenes))


def _eval(rng: random.Random, index: int, lang: str) -> tuple[dict, Images]:
    """Even index: one shape; odd: two or three. No grayscale, so colour is always scorable."""
    scene = sample_scene(rng, n_shapes=1 if index % 2 == 0 else rng.choice((2, 3)), allow_grayscale=False)
    name = f"eval_{index:06d}.{scene.fmt}"
    answer = describe(scene.shapes, scene.grayscale, lang)
    truth = {"lang": lang, "answer": answer, "count": len(scene.shapes), "grayscale": scene.grayscale,
             "shapes": [s.truth(scene.grayscale) for s in scene.shapes]}
    record = {"conversations": _conversation([(EVAL_PROMPT[lang], answer)]), "image": name, "truth": truth}
    return record, [(name, scene)]


def _eval_sft(rng: random.Random, index: int, lang: str) -> tuple[dict, Images]:
    """Type `QUESTION_TYPES[index % 17]` asked at turn 1, 2 or 3 of a dialogue drawn as in `_sft` (earlier
    questions of other types of the same group, the pictures' tags in the first question), cut after it."""
    qtype = QUESTION_TYPES[index % len(QUESTION_TYPES)]
    group, kind = qtype.split("/")
    turn = rng.choice((1, 2, 3))
    scenes = [sample_scene(rng, allow_grayscale=False) for _ in range({"single": 1, "pair": 2, "text": 0}[group])]
    pool = {"single": SINGLE_QUESTIONS, "pair": PAIR_QUESTIONS, "text": TEXT_QUESTIONS}[group]
    kinds = [*rng.sample([k for k in pool if k != kind], turn - 1), kind]
    if group == "text":
        asked = [text_qa(k, rng, lang) for k in kinds]
    elif group == "pair":
        asked = [pair_qa(k, *[(s.shapes, s.grayscale) for s in scenes], rng, lang) for k in kinds]
    else:
        asked = [single_image_qa(k, scenes[0].shapes, scenes[0].grayscale, rng, lang) for k in kinds]
    names = [f"eval_sft_{index:06d}{f'_{k}' if len(scenes) > 1 else ''}.{s.fmt}" for k, s in enumerate(scenes)]
    turns: list[tuple] = list(asked)
    if scenes:
        turns[0] = (_with_images(turns[0][0], len(scenes), rng), turns[0][1])
    truth = {"lang": lang, "type": qtype, "turn": turn, "answer": asked[-1].answer, "attribute": asked[-1].attribute}
    record = {"conversations": _conversation(turns)} | ({"image": ", ".join(names)} if names else {})
    return record | {"truth": truth}, list(zip(names, scenes))


_BUILDERS = {"pretrain": _pretrain, "sft": _sft, "eval": _eval, "eval_sft": _eval_sft}


def build_record(split: str, index: int, seed: int = 0, lang: str = "en") -> tuple[dict, Images]:
    """Record `index` of `split` and the (file name, scene) of each picture it lists, without drawing them."""
    if split not in _BUILDERS:
        raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    if lang not in LANGS:
        raise ValueError(f"unknown language {lang!r}; use one of {', '.join(LANGS)} (--lang)")
    return _BUILDERS[split](random.Random(f"{seed}:{split}:{index}"), index, lang)


def iter_corpus_text(lang: str, records_per_split: int = 300, seed: int = 0) -> Iterator[str]:
    """Every word of the corpus vocabulary, the chat roles and the text of a sample of records
    (with the `<image>` placeholders removed), for training a tokenizer."""
    if lang not in LANGS:
        raise ValueError(f"unknown language {lang!r}; use one of {', '.join(LANGS)}")
    for table in WORDS[lang].values():
        yield " ".join(str(v) for v in table.values())
    yield "system\nuser\nassistant\n"
    for split in _TOKENIZER_SPLITS:
        for index in range(records_per_split):
            record, _ = build_record(split, index, seed, lang)
            for message in record["conversations"]:
                yield message["content"].replace("<image>\n", "").replace("\n<image>", "").replace("<image>", "")


def _prepare_out(out: Path) -> None:
    """Refuse to overwrite a corpus we did not write; clear one we did (only files with our names)."""
    targets = [out / f"{s}_data.jsonl" for s in SPLITS]
    if not (out / INFO_FILE).exists():
        clash = [str(p) for p in targets if p.exists()]
        if clash:
            raise FileExistsError(f"{', '.join(clash)} already exist and were not written by data_tools.synth "
                                  f"(no {INFO_FILE}); choose another --out or move them away")
        return
    for path in targets:
        path.unlink(missing_ok=True)
    for split in SPLITS:
        folder = out / f"{split}_images"
        if folder.is_dir():
            for path in folder.iterdir():
                if _OUR_IMAGE.match(path.name):
                    path.unlink()


def _draw_records(job: tuple[str, int, str], items: list[tuple[str, int]]) -> list[tuple[str, str]]:
    """Draw the pictures of records (split, index) into `<out>/<split>_images`; their (split, JSONL line).

    `job` is (out, seed, lang). What it writes and returns depends on its arguments alone, so any process may
    draw any chunk."""
    out, seed, lang = job
    lines = []
    for split, index in items:
        record, pictures = build_record(split, index, seed, lang)
        for name, scene in pictures:
            (Path(out) / f"{split}_images" / name).write_bytes(encode(scene, render(scene)))
        lines.append((split, json.dumps(record, ensure_ascii=False) + "\n"))
    return lines


def write_corpus(out: str | Path, pretrain: int = 2000, sft: int = 1000, eval: int = 200, seed: int = 0,
                 lang: str = "en", progress: bool = True, eval_sft: int = 0,
                 workers: int | None = None) -> dict[str, int]:
    """Write the corpus into `out`; returns the number of records written per split. `workers` processes
    draw the pictures (default: up to 2); the files are the same bytes for any number."""
    from data_tools.pool import ordered_map

    out = Path(out)
    counts = {"pretrain": pretrain, "sft": sft, "eval": eval, "eval_sft": eval_sft}
    if any(n < 0 for n in counts.values()):
        raise ValueError(f"record counts must be >= 0, got {counts}")
    workers = min(2, os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers} (--workers)")
    out.mkdir(parents=True, exist_ok=True)
    _prepare_out(out)
    items = [(split, index) for split, n in counts.items() for index in range(n)]
    with ExitStack() as stack:
        files = {}
        for split in counts:
            (out / f"{split}_images").mkdir(exist_ok=True)
            files[split] = stack.enter_context(open(out / f"{split}_data.jsonl", "w", encoding="utf-8", newline="\n"))
        # The bar starts with the first record: a tqdm bar starts a thread, and the pool forks its workers
        # (rather than start new interpreters) only from a process that has just one.
        bar = None
        for split, line in ordered_map(_draw_records, (str(out), seed, lang), items, workers, batch=64):
            files[split].write(line)
            if bar is None:
                bar = tqdm(total=len(items), desc="synth corpus", unit="rec", disable=not progress)
            bar.update()
        if bar is not None:
            bar.close()
    info = {"tool": "data_tools.synth", "format_version": 1, "seed": seed, "lang": lang, "records": counts}
    (out / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return counts


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m data_tools.synth", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder (created; a previous synth corpus there is replaced)")
    p.add_argument("--pretrain", type=int, default=2000, help="pretrain records (caption pairs)")
    p.add_argument("--sft", type=int, default=1000, help="SFT records (multi-turn, some two-image, some text-only)")
    p.add_argument("--eval", type=int, default=200, help="held-out eval records with ground truth")
    p.add_argument("--eval_sft", type=int, default=612,
                   help="held-out SFT questions with ground truth, the 17 question types in turn")
    p.add_argument("--seed", type=int, default=0, help="corpus seed: same seed and counts, same bytes")
    p.add_argument("--lang", choices=LANGS, default="en", help="language of prompts and answers")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                   help="processes drawing the pictures (only the speed changes)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Write the synthetic corpus the flags describe and print its record counts; returns 0."""
    args = _parse_args(argv)
    counts = write_corpus(args.out, args.pretrain, args.sft, args.eval, args.seed, args.lang,
                          eval_sft=args.eval_sft, workers=args.workers)
    print(f"wrote {', '.join(f'{n} {s}' for s, n in counts.items())} records to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
