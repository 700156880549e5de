"""A few generated answers at every evaluation, logged next to their references: a look at what the model
says, not only its loss.

At each evaluation (every `train.eval_interval` steps, and at the end) the trainer answers the first
`train.eval_answers` samples of `data.eval_shards` greedily (at most `train.eval_answer_tokens` new tokens):
each sample's last assistant turn is the reference, the turns before it the prompt
(`vlm.formats.scoring.answer_split`, the rule `vlm.eval` follows). Rank 0 writes one metrics.jsonl record

    {"step": 200, "eval_answers": [{"key", "prompt", "reference", "answer", "exact_match",
     "normalized_match", "token_f1"}, ...], "eval_answers_exact_match": ..., "eval_answers_normalized_match":
     ..., "eval_answers_token_f1": ...}

(`prompt`: the last user turn) and one console line per answer; the monitors get the three means.

Every rank generates the same answers: the same samples, decoded greedily by the same weights, one sample
at a time without padding. With several ranks, `generate` runs with `synced_gpus`, so under ZeRO-3 each
rank's forward passes gather the weights together and a rank that finished keeps taking part until all
have; no rank waits alone in a collective while another generates.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import torch
from tqdm import tqdm

from vlm.build import Built
from vlm.config import Config
from vlm.data.image import ImagePreprocessor, PixelNormalizer
from vlm.data.reader import ShardReader, decode_members
from vlm.data.sources import resolve_sources
from vlm.data.text import ChatEncoder
from vlm.formats.errors import BadSample
from vlm.formats.scoring import SCORES, answer_split, mean_scores, question_text, score_pair
from vlm.model.generation import GenerationSettings
from vlm.train import distributed

log = logging.getLogger("vlm.train")
CONSOLE_CHARS = 160  # a console line shows this much of each text; metrics.jsonl has all of it


@dataclass
class AnswerSample:
    """One eval sample ready to answer: prompt ids (L,), uint8 pictures (N, 3, H, W) or None, and the texts."""

    key: str
    prompt_ids: torch.Tensor
    pixels: torch.Tensor | None
    prompt: str
    reference: str


def read_answer_samples(cfg: Config, built: Built, count: int) -> tuple[list[AnswerSample], Counter]:
    """The first `count` samples of data.eval_shards that can be answered, and the skip reasons of those that
    cannot (no assistant turn, a bad record or picture, a prompt too long for the model)."""
    shards = resolve_sources(cfg.data.eval_shards, label="data.eval_shards").shards
    reader = ShardReader(shards)
    encoder = ChatEncoder(built.tokenizer, built.image_token_id, built.model.config.image_token_len,
                          cfg.data.max_seq_len)
    preprocess = ImagePreprocessor(built.image_config, max_pixels=cfg.data.max_pixels)
    room = built.model.config.max_position_embeddings - cfg.train.eval_answer_tokens
    samples, skipped = [], Counter()
    try:
        for i in range(min(count, len(reader))):
            try:
                sample = decode_members(*reader.read(i))
                prompt, reference = answer_split(sample["conversations"] or [])
                if reference is None:
                    raise BadSample("no_reply", "no assistant turn to answer")
                ids = encoder.encode_prompt(prompt, len(sample["images"]))  # (L,)
                if len(ids) > room:
                    raise BadSample("prompt_too_long", f"{len(ids)} prompt tokens leave no room to answer")
                pixels = torch.stack([preprocess.pixels(x) for x in sample["images"]]) if sample["images"] else None
            except BadSample as err:
                skipped[err.reason] += 1
                continue
            samples.append(AnswerSample(sample["__key__"], ids, pixels, question_text(prompt), reference))
    finally:
        reader.close()
    return samples, skipped


@torch.no_grad()
def greedy_reply(model, prompt_ids: torch.Tensor, pixels: torch.Tensor | None, max_new_tokens: int,
                 synced: bool = False) -> list[int]:
    """The new ids of a greedy answer to one prompt (L,) with normalised pictures (N, 3, H, W) or None, cut at
    eos. `synced`: every rank calls this together (transformers' `synced_gpus`)."""
    config = model.config
    device, dtype = model.lm_head.weight.device, model.lm_head.weight.dtype
    ids = prompt_ids[None].to(device)  # (1, L)
    generation = GenerationSettings(max_new_tokens=max_new_tokens).config(None, model)  # greedy, as vlm.chat
    out = model.generate(ids, pixel_values=None if pixels is None else pixels[None].to(device, dtype),
                         attention_mask=torch.ones_like(ids), generation_config=generation, synced_gpus=synced)
    reply = out[0, ids.shape[1]:].tolist()
    return reply[: reply.index(config.eos_token_id)] if config.eos_token_id in reply else reply


def answer_samples(engine, built: Built, cfg: Config, device: torch.device) -> list[dict]:
    """Collective when there are several ranks (every rank must call it): the answers to the first
    train.eval_answers eval samples, each {"key", "prompt", "reference", "answer", and the scores of
    `vlm.formats.scoring.score_pair`}. Leaves the engine in training mode."""
    samples, skipped = read_answer_samples(cfg, built, cfg.train.eval_answers)
    if skipped and distributed.rank() == 0:
        log.warning("train.eval_answers: %d of the first %d eval samples cannot be answered (%s)", sum(skipped.values()),
                    cfg.train.eval_answers, ", ".join(f"{r}: {n}" for r, n in skipped.most_common()))
    normalize = PixelNormalizer(built.image_config)
    synced = distributed.world_size() > 1
    model, rows = engine.module, []
    engine.eval()
    try:
        for sample in samples:
            pixels = None if sample.pixels is None else normalize(sample.pixels.to(device))  # (N, 3, H, W)
            reply = greedy_reply(model, sample.prompt_ids, pixels, cfg.train.eval_answer_tokens, synced)
            answer = built.tokenizer.decode(reply, skip_special_tokens=True)
            rows.append({"key": sample.key, "prompt": sample.prompt, "reference": sample.reference, "answer": answer,
                         **score_pair(answer, sample.reference)})
    finally:
        engine.train()
    return rows


def log_answers(rows: list[dict], step: int, metrics) -> None:
    """Rank 0: one metrics record for the answers of this step (with their mean scores), a console line each."""
    if not rows:
        return
    means = mean_scores(rows)
    metrics.write({"step": step, "eval_answers": rows, **{f"eval_answers_{s}": means[s] for s in SCORES}})
    for row in rows:
        tqdm.write(f"step {step} eval answer {row['key']} (F1 {row['token_f1']:.2f})\n"
                   f"  prompt:    {_short(row['prompt'])}\n  reference: {_short(row['reference'])}\n"
                   f"  answer:    {_short(row['answer'])}")


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= CONSOLE_CHARS else text[: CONSOLE_CHARS - 3] + "..."
