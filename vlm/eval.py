"""Evaluate a trained VLM on held-out records: teacher-forced loss and perplexity, and scored greedy answers.

    python -m vlm.eval --checkpoint out/demo/sft/export --data data/demo/dataset/eval_data.jsonl \
        --images data/demo/dataset/eval_images --out out/demo/eval.json
    python -m vlm.eval --checkpoint out/demo/sft --shards data/demo/shards/eval --answers out/answers.jsonl
    python -m vlm.eval --checkpoint out/sft_vlm_512.pth --tokenizer model/tokenizer --vision_model model/vision_model \
        --dim 512 --n_layers 8 --data dataset/eval_data.jsonl --images dataset/eval_images

`--checkpoint`: an exported folder, a training out_dir or checkpoint folder, or a MiniMind-V .pth (see
`vlm.inference`). Loss: mean cross-entropy over the label tokens (the assistant replies) of every record's
whole conversation, perplexity = exp(loss). Every record with an assistant turn is also answered: the
conversation up to its last reply (earlier replies as written) is the prompt, the greedy reply is scored
against that last reply (`vlm.formats.scoring`: exact match, SQuAD-normalised match, token F1). Records
that carry `truth` (the synthetic corpus's eval split, `data_tools.synth`) are scored with
`vlm.demo.scoring` too (exact match and per attribute), split into pictures of one shape (`single`) and of
several (`multi`): `accuracy` is the share of single-shape pictures whose colour and kind are both right,
`multi_shape_accuracy` the same for every shape of a multi-shape picture. Records whose truth names a
question type (the eval_sft split: one scored SFT question each) are scored by
`vlm.demo.scoring.score_question` instead: `sft_scores` holds, per type, per group (single, pair, text)
and overall, the number of records and the shares with the value asked for right (`attribute`) and exact.

Every answer goes to a JSONL file (`--answers`; default beside `--out`, else in the checkpoint's folder),
the report without the answers to `--out` as JSON; stdout gets a summary table only, and stderr a
progress bar.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from vlm.data.collate import pad_collate
from vlm.demo.scoring import METRICS, question_report, question_table, scored_report
from vlm.formats.errors import BadSample
from vlm.formats.records import parse_record, read_image
from vlm.formats.scoring import answer_split, last_reply_index, mean_scores, question_text, score_pair
from vlm.inference import GenerationSettings, LoadedVLM, add_model_flags, load_from_args


@dataclass
class EvalRecord:
    """One held-out record: its conversation, pictures (encoded bytes), their names, and ground truth if any."""

    key: str
    conversations: list[dict]
    images: list[bytes]
    names: list[str]
    truth: dict | None = None


def records_from_jsonl(jsonl: str | Path, images: str | Path) -> tuple[list[EvalRecord], Counter]:
    """Records of a MiniMind-V JSONL file whose pictures are in `images`; bad lines skipped and counted."""
    root = os.path.realpath(images)
    records, skipped = [], Counter()
    with open(jsonl, "rb") as f:
        for line, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                record, names = parse_record(raw, first_line=line == 1)
                pictures = [read_image(root, name) for name in names]
            except BadSample as err:
                skipped[err.reason] += 1
                continue
            records.append(EvalRecord(f"{Path(jsonl).name}:{line}", record["conversations"], pictures, names,
                                      record.get("truth")))
    return records, skipped


def records_from_shards(folder: str | Path) -> tuple[list[EvalRecord], Counter]:
    """Records of a shard folder made by `data_tools.shard` (with manifest.json), in order."""
    from vlm.data.reader import ShardReader, decode_members
    from vlm.data.sources import resolve_sources

    reader = ShardReader(resolve_sources([str(folder)], label="--shards").shards)
    records, skipped = [], Counter()
    for i in range(len(reader)):
        try:
            sample = decode_members(*reader.read(i))
        except BadSample as err:
            skipped[err.reason] += 1
            continue
        doc = sample["record"]
        records.append(EvalRecord(sample["__key__"], sample["conversations"], sample["images"],
                                  list(doc.get("images") or []), doc.get("truth")))
    reader.close()
    return records, skipped


@torch.inference_mode()
def teacher_forced_loss(vlm: LoadedVLM, records: Sequence[EvalRecord], batch_size: int = 32,
                        progress: bool = True) -> dict:
    """Token-weighted mean cross-entropy over reply tokens, perplexity, and records that could not be encoded."""
    total, tokens, skipped = 0.0, 0, Counter()
    pad_id = vlm.model.config.pad_token_id
    for start in tqdm(range(0, len(records), batch_size), desc="eval loss", disable=not progress, leave=False):
        samples = []
        for record in records[start:start + batch_size]:
            try:
                sample = vlm.encoder.encode(record.conversations, len(record.images))
                sample["pixel_values"] = vlm.raw_pixels(record.images)  # uint8 (n, 3, H, W), as the loader's
            except BadSample as err:
                skipped[err.reason] += 1
                continue
            samples.append(sample)
        if not samples:
            continue
        batch = pad_collate(samples, pad_id)
        inputs = {k: batch[k].to(vlm.device) for k in ("input_ids", "labels", "attention_mask", "position_ids")}
        if batch["pixel_values"].shape[1]:  # (B, N, 3, H, W) uint8 -> normalised, the model's dtype
            pixels = vlm.preprocess.normalizer(batch["pixel_values"].to(vlm.device))
            inputs["pixel_values"] = pixels.to(vlm.model.lm_head.weight.dtype)
        n = int(batch["num_label_tokens"])
        total += float(vlm.model(**inputs).loss) * n
        tokens += n
    loss = total / tokens if tokens else float("nan")
    return {"loss": loss, "perplexity": math.exp(loss) if tokens else float("nan"), "label_tokens": tokens,
            "loss_skipped": dict(skipped)}


ANSWERS_FILE = "eval_answers.jsonl"
"""The answers file's name in a checkpoint folder when neither --answers nor --out is given."""


def answer_prompt(record: EvalRecord) -> list[dict]:
    """The conversation up to (not including) its last assistant reply (`vlm.formats.scoring.answer_split`)."""
    return answer_split(record.conversations)[0]


def greedy_answers(vlm: LoadedVLM, records: Sequence[EvalRecord], batch_size: int = 32,
                   max_new_tokens: int = 128, progress: bool = True) -> list[str | None]:
    """Greedy replies to each record's prompt, batched among prompts of equal length (so nothing is padded);
    None for a record whose prompt cannot be encoded."""
    prompts: list[torch.Tensor | None] = []
    for record in records:
        try:
            prompts.append(vlm.prompt_ids(answer_prompt(record), len(record.images)))
        except BadSample:
            prompts.append(None)
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, (ids, record) in enumerate(zip(prompts, records)):
        if ids is not None:
            groups[(len(ids), len(record.images))].append(i)
    chunks = [members[k:k + batch_size] for members in groups.values() for k in range(0, len(members), batch_size)]
    settings = GenerationSettings(max_new_tokens=max_new_tokens)
    answers: list[str | None] = [None] * len(records)
    for chunk in tqdm(chunks, desc="eval answers", disable=not progress, leave=False):
        ids = torch.stack([prompts[i] for i in chunk])  # (B, L)
        pixels = torch.stack([vlm.pixels(records[i].images) for i in chunk]) if records[chunk[0]].images else None
        for i, reply in zip(chunk, vlm.generate_ids(ids, pixels, settings)):
            answers[i] = vlm.tokenizer.decode(reply, skip_special_tokens=True)
    return answers


def answer_rows(records: Sequence[EvalRecord], answers: Sequence[str | None]) -> tuple[list[dict], dict]:
    """(rows, report part): one row per answered record (key, pictures, question, reference, answer, the
    generic scores, and for records with truth the synthetic ones), their means, the synthetic report
    (`vlm.demo.scoring.scored_report`) over the records with caption truth, and `sft_scores`
    (`vlm.demo.scoring.question_report`) over those whose truth names a question type."""
    rows, with_truth, skipped = [], [], Counter()
    for record, answer in zip(records, answers):
        prompt, reference = answer_split(record.conversations)
        if reference is None or answer is None:
            skipped["no_reply" if reference is None else "prompt_not_encoded"] += 1
            continue
        rows.append({"key": record.key, "images": record.names, "prompt": question_text(prompt),
                     "reference": reference, "answer": answer, **score_pair(answer, reference)})
        if record.truth is not None:
            with_truth.append((record, rows[-1]))
    captions = [(r, row) for r, row in with_truth if "type" not in r.truth]
    questions = [(r, row) for r, row in with_truth if "type" in r.truth]
    synthetic = scored_report([r for r, _ in captions], [row["answer"] for _, row in captions])
    asked = question_report([r for r, _ in questions], [row["answer"] for _, row in questions])
    for pairs, part in ((captions, synthetic), (questions, asked)):
        for (_, row), scored in zip(pairs, part.pop("answers")):  # shapes or type, truth, right, scores
            row.update({k: v for k, v in scored.items() if k not in row})
    means = mean_scores(rows)
    return rows, {"answered": means.pop("n"), "answer_skipped": dict(skipped), **means, **synthetic, **asked}


def evaluate(vlm: LoadedVLM, records: Sequence[EvalRecord], batch_size: int = 32, max_new_tokens: int = 128,
             answer_fn: Callable[[Sequence[EvalRecord]], list[str | None]] | None = None,
             progress: bool = True) -> dict:
    """The report: loss and perplexity over all records; exact, normalised and token-F1 scores of the greedy
    answers against each record's last reply; the synthetic scores over the records with truth; and every
    answer row under "answers"."""
    report = {"model": vlm.source, "records": len(records), **teacher_forced_loss(vlm, records, batch_size, progress)}
    if answer_fn is None:
        def answer_fn(rs):
            return greedy_answers(vlm, rs, batch_size, max_new_tokens, progress)
    answerable = [last_reply_index(r.conversations) is not None for r in records]
    given = iter(answer_fn([r for r, ok in zip(records, answerable) if ok]) if any(answerable) else [])
    rows, part = answer_rows(records, [next(given) if ok else None for ok in answerable])
    return report | part | {"answers": rows}


def default_answers_path(checkpoint: str, out: str | None) -> Path:
    """Beside the --out report (`eval.json` -> `eval.answers.jsonl`), else in the checkpoint's folder
    (`ANSWERS_FILE`; for a .pth file, `<name>.eval_answers.jsonl` beside it)."""
    if out:
        return Path(out).with_suffix(".answers.jsonl")
    path = Path(checkpoint)
    return path / ANSWERS_FILE if path.is_dir() else path.with_name(f"{path.stem}.{ANSWERS_FILE}")


def summary_lines(report: dict, answers_path: Path, out: str | None) -> list[str]:
    """The stdout summary: counts, loss, every score, where the answers (and the report) are."""
    unread, not_encoded, unanswered = (report.get(k) or {} for k in ("read_skipped", "loss_skipped", "answer_skipped"))
    lines = [f"eval: {report['model']} on {report.get('data', '?')}",
             f"  records           {report['records']:>8}" + (f"   unreadable: {_counts(unread)}" if unread else ""),
             f"  loss              {_num(report['loss'])}   over {report['label_tokens']:,} reply tokens"
             + (f"   not encoded: {_counts(not_encoded)}" if not_encoded else ""),
             f"  perplexity        {_num(report['perplexity'], spec='.4g')}",
             f"  answered          {report['answered']:>8}" + (f"   not answered: {_counts(unanswered)}" if unanswered else ""),
             f"  exact match       {_num(report['exact_match'])}",
             f"  normalized match  {_num(report['normalized_match'])}   (SQuAD normalisation)",
             f"  token F1          {_num(report['token_f1'])}"]
    scores = report["scores"]
    if scores["all"]["n"]:
        lines.append(f"  synthetic truth ({scores['all']['n']} records): accuracy {_num(report['accuracy']).strip()}"
                     f", multi_shape_accuracy {_num(report['multi_shape_accuracy']).strip()}")
        lines.append("    split       n" + "".join(f"{m:>12}" for m in METRICS))
        for split, row in scores.items():
            lines.append(f"    {split:<6} {row['n']:>6}" + "".join(f"{_num(row[m], 12)}" for m in METRICS))
    asked = report.get("sft_scores")
    if asked and asked["overall"]["n"]:
        lines.append(f"  SFT questions ({asked['overall']['n']} records; attribute: the value asked for is right):")
        lines += question_table(asked, indent="    ")
    lines.append(f"answers ({report['answered']} lines): {answers_path}")
    if out:
        lines.append(f"report: {out}")
    return lines


def _num(value: float | None, width: int = 8, spec: str = ".4f") -> str:
    return f"{'n/a':>{width}}" if value is None or math.isnan(value) else f"{value:>{width}{spec}}"


def _counts(counter: dict) -> str:
    return ", ".join(f"{reason} {n}" for reason, n in sorted(counter.items()))


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m vlm.eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="exported folder, training out_dir/checkpoint, or .pth")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="MiniMind-V JSONL file of held-out records (needs --images)")
    source.add_argument("--shards", help="shard folder with manifest.json (made by data_tools.shard)")
    p.add_argument("--images", help="folder the --data records' image names are relative to")
    p.add_argument("--out", help="also write the JSON report (every score, no answers) to this file")
    p.add_argument("--answers", help="JSONL file of every answer with its reference and scores (default: beside "
                                     f"--out as NAME.answers.jsonl, else {ANSWERS_FILE} in the checkpoint's folder)")
    p.add_argument("--batch_size", type=int, default=32, help="records per forward pass / generate call")
    p.add_argument("--max_new_tokens", type=int, default=128, help="longest generated answer")
    p.add_argument("--limit", type=int, help="evaluate only the first N records")
    add_model_flags(p)
    args = p.parse_args(argv)
    if args.data and not args.images:
        p.error("--data needs --images (the folder its image names are relative to)")
    return args


def main(argv: list[str] | None = None) -> int:
    """Evaluate, write the answers (JSONL) and with --out the JSON report, print a summary; returns the exit code."""
    args = _parse_args(argv)
    answers_path = Path(args.answers) if args.answers else default_answers_path(args.checkpoint, args.out)
    try:
        vlm = load_from_args(args)
        records, skipped = records_from_jsonl(args.data, args.images) if args.data else records_from_shards(args.shards)
        answers_path.parent.mkdir(parents=True, exist_ok=True)
        answers_file = answers_path.open("w", encoding="utf-8")  # opened first: a bad path fails before the work
    except (OSError, ValueError, RuntimeError) as err:
        if args.debug:
            raise
        print(f"error: {err} (--debug shows the traceback)", file=sys.stderr)
        return 2
    records = records[: args.limit] if args.limit else records
    with answers_file:
        report = {"data": args.data or args.shards, "read_skipped": dict(skipped),
                  **evaluate(vlm, records, args.batch_size, args.max_new_tokens)}
        for row in report.pop("answers"):
            answers_file.write(json.dumps(row, ensure_ascii=False) + "\n")
    report["answers_file"] = str(answers_path)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print("\n".join(summary_lines(report, answers_path, args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
