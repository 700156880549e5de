"""Evaluate a trained VLM on held-out records: teacher-forced loss and perplexity, and scored greedy answers.

    python -m vlm.eval --checkpoint out/demo/sft/export --data data/demo/dataset/eval_data.jsonl \
        --images data/demo/dataset/eval_images --out out/demo/eval.json
    python -m vlm.eval --checkpoint out/demo/sft --shards data/demo/shards/eval
    python -m vlm.eval --checkpoint out/sft_vlm_512.pth --tokenizer model/tokenizer --vision_model model/vision_model \
        --dim 512 --n_layers 8 --data dataset/eval_data.jsonl --images dataset/eval_images

`--checkpoint`: an exported folder, a training out_dir or checkpoint folder, or a MiniMind-V .pth (see
`vlm.inference`). Loss: mean cross-entropy over the label tokens (the assistant replies) of every record's
whole conversation, perplexity = exp(loss). Records that carry `truth` (the synthetic corpus's eval split,
`data_tools.synth`) are also answered: the conversation up to its last reply is the prompt, the greedy
reply is scored with `vlm.demo.scoring` (exact match and per attribute), split into pictures of one shape
(`single`) and of several (`multi`). `accuracy` is the share of single-shape pictures whose colour and
kind are both right; `multi_shape_accuracy` the same for every shape of a multi-shape picture.
Prints the report as JSON (and writes it with --out).
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
from vlm.demo.scoring import scored_report
from vlm.formats.errors import BadSample
from vlm.formats.records import parse_record, read_image
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


def answer_prompt(record: EvalRecord) -> list[dict]:
    """The conversation up to (not including) its last assistant reply."""
    last = max((i for i, m in enumerate(record.conversations) if m["role"] == "assistant"),
               default=len(record.conversations))
    return list(record.conversations[:last])


def greedy_answers(vlm: LoadedVLM, records: Sequence[EvalRecord], batch_size: int = 32,
                   max_new_tokens: int = 128, progress: bool = True) -> list[str]:
    """Greedy replies to each record's prompt, batched among prompts of equal length (so nothing is padded)."""
    prompts = [vlm.prompt_ids(answer_prompt(r), len(r.images)) for r in records]
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, (ids, record) in enumerate(zip(prompts, records)):
        groups[(len(ids), len(record.images))].append(i)
    chunks = [members[k:k + batch_size] for members in groups.values() for k in range(0, len(members), batch_size)]
    settings = GenerationSettings(max_new_tokens=max_new_tokens)
    answers: list[str] = [""] * len(records)
    for chunk in tqdm(chunks, desc="eval answers", disable=not progress, leave=False):
        ids = torch.stack([prompts[i] for i in chunk])  # (B, L)
        pixels = torch.stack([vlm.pixels(records[i].images) for i in chunk]) if records[chunk[0]].images else None
        for i, reply in zip(chunk, vlm.generate_ids(ids, pixels, settings)):
            answers[i] = vlm.tokenizer.decode(reply, skip_special_tokens=True)
    return answers


def evaluate(vlm: LoadedVLM, records: Sequence[EvalRecord], batch_size: int = 32, max_new_tokens: int = 128,
             answer_fn: Callable[[Sequence[EvalRecord]], list[str]] | None = None, progress: bool = True) -> dict:
    """The report: loss and perplexity over all records, answer scores over those with truth."""
    report = {"model": vlm.source, "records": len(records), **teacher_forced_loss(vlm, records, batch_size, progress)}
    with_truth = [r for r in records if r.truth is not None]
    if answer_fn is None:
        def answer_fn(rs):
            return greedy_answers(vlm, rs, batch_size, max_new_tokens, progress)
    return report | scored_report(with_truth, answer_fn(with_truth) if with_truth else [])


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m vlm.eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="exported folder, training out_dir/checkpoint, or .pth")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="MiniMind-V JSONL file of held-out records (needs --images)")
    source.add_argument("--shards", help="shard folder with manifest.json (made by data_tools.shard)")
    p.add_argument("--images", help="folder the --data records' image names are relative to")
    p.add_argument("--out", help="also write the JSON report to this file")
    p.add_argument("--batch_size", type=int, default=32, help="records per forward pass / generate call")
    p.add_argument("--max_new_tokens", type=int, default=128, help="longest generated answer")
    p.add_argument("--limit", type=int, help="evaluate only the first N records")
    add_model_flags(p)
    args = p.parse_args(argv)
    if args.data and not args.images:
        p.error("--data needs --images (the folder its image names are relative to)")
    return args


def main(argv: list[str] | None = None) -> int:
    """Evaluate and print (and with --out write) the JSON report; returns the exit code."""
    args = _parse_args(argv)
    try:
        vlm = load_from_args(args)
        records, skipped = records_from_jsonl(args.data, args.images) if args.data else records_from_shards(args.shards)
    except (OSError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    records = records[: args.limit] if args.limit else records
    report = {"data": args.data or args.shards, "read_skipped": dict(skipped),
              **evaluate(vlm, records, args.batch_size, args.max_new_tokens)}
    text = json.dumps(report, indent=1, ensure_ascii=False)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
