"""Train the project's own byte-level BPE tokenizer, reproducibly, from text the project itself ships.

    python -m data_tools.train_tokenizer [--out vlm/assets/tokenizer] [--vocab-size 6400]

The text is the synthetic corpus's wording in English and Chinese (`data_tools.synth.iter_corpus_text`)
plus the general paragraphs in `data_tools.general_text`, so ordinary English and Chinese also encode
reasonably. Writes `tokenizer.json` and `tokenizer_config.json` (with a ChatML chat template), loadable
with `transformers.AutoTokenizer.from_pretrained(folder)` and no remote code. Special tokens have fixed
ids: `<|endoftext|>`=0 (pad/unk), `<|im_start|>`=1 (bos), `<|im_end|>`=2 (eos) as in MiniMind, and the
image placeholder `<|image|>`=3. The same arguments give byte-identical files. When the text has fewer
merges than asked for, the vocabulary is smaller than `--vocab-size`; the command prints the final size.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from data_tools.general_text import GENERAL_TEXT
from data_tools.synth import iter_corpus_text
from vlm.tokenizer import DEFAULT_PLACEHOLDER, builtin_tokenizer_path

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", DEFAULT_PLACEHOLDER)
# ChatML, as MiniMind: no system message unless the conversation has one.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
MODEL_MAX_LENGTH = 32768


def default_out() -> Path:
    """The built-in tokenizer folder inside the installed `vlm` package (independent of the working directory)."""
    return builtin_tokenizer_path()


def training_text(corpus_records: int = 300) -> Iterator[str]:
    """The training text, always in the same order: corpus wording (en, zh), then the general text."""
    for lang in ("en", "zh"):
        yield from iter_corpus_text(lang, records_per_split=corpus_records)
    yield from GENERAL_TEXT


def train(vocab_size: int = 6400, corpus_records: int = 300) -> Tokenizer:
    """A byte-level BPE (MiniMind's recipe: no prefix space, the full 256-byte alphabet) with our special tokens.

    Chinese characters are split apart before BPE, so a token never spans two of them. Chinese has no
    spaces: without this split the corpus's repeated phrases become single tokens ("左上角有一个大的红色圆形"
    was one token), and a small model would have to learn every (position, size, colour, kind) combination
    as its own word instead of composing them.
    """
    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"--vocab-size must be at least {len(SPECIAL_TOKENS) + 256} "
                         f"(special tokens + 256 bytes), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{Han}"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(training_text(corpus_records), trainer=trainer)
    for i, token in enumerate(SPECIAL_TOKENS):
        if tokenizer.token_to_id(token) != i:
            raise RuntimeError(f"special token {token} got id {tokenizer.token_to_id(token)}, expected {i}")
    return tokenizer


def tokenizer_config() -> dict:
    """The `tokenizer_config.json` contents: special-token roles, no automatic bos/eos, the chat template."""
    added = {
        str(i): {"content": token, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                 "special": True}
        for i, token in enumerate(SPECIAL_TOKENS)
    }
    return {
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": [DEFAULT_PLACEHOLDER],
        "bos_token": "<|im_start|>",
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": "<|endoftext|>",
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": "<|endoftext|>",
    }


def write_tokenizer(out: str | Path, vocab_size: int = 6400, corpus_records: int = 300) -> int:
    """Train and write `tokenizer.json` + `tokenizer_config.json` into `out`; returns the final vocab size."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train(vocab_size, corpus_records)
    tokenizer.save(str(out / "tokenizer.json"), pretty=True)
    config = json.dumps(tokenizer_config(), indent=2, ensure_ascii=False, sort_keys=True)
    (out / "tokenizer_config.json").write_text(config + "\n", encoding="utf-8")
    return tokenizer.get_vocab_size()


def main(argv: list[str] | None = None) -> int:
    """Train the tokenizer and write it to --out (default: the built-in tokenizer folder); returns 0."""
    p = argparse.ArgumentParser(prog="python -m data_tools.train_tokenizer", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="output folder (default: the package's vlm/assets/tokenizer)")
    p.add_argument("--vocab-size", type=int, default=6400, help="largest vocabulary, special tokens included")
    args = p.parse_args(argv)
    out = Path(args.out) if args.out else default_out()
    size = write_tokenizer(out, args.vocab_size)
    print(f"wrote {out / 'tokenizer.json'} and {out / 'tokenizer_config.json'}: vocabulary of {size} tokens")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
