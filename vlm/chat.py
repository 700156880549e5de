"""Chat with a trained VLM about pictures, the answer streamed as it is generated.

    python -m vlm.chat --checkpoint out/demo/sft/export --image a.jpg --prompt "Describe the shapes."
    python -m vlm.chat --checkpoint out/demo/sft/export --image a.jpg --image b.png --prompt "Which has more shapes?"
    python -m vlm.chat --checkpoint out/demo/sft                       # interactive session, no picture
    python -m vlm.chat --checkpoint out/sft_vlm_512.pth --tokenizer model/tokenizer \
        --vision_model model/vision_model --dim 512 --n_layers 8 --image a.jpg

Each `--image` adds one `<image>` placeholder before the first user message, unless the prompt places its
own `<image>` tags (then their number must equal the number of --image files). Without `--prompt` the
session is interactive and multi-turn: the pictures belong to the first turn, `/quit` (or end of input)
leaves, `/reset` starts a new conversation with the same pictures. Greedy decoding unless `--temperature`
is above 0 (then `--top_p` applies too).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from vlm.formats.errors import BadSample
from vlm.inference import (
    GenerationSettings,
    LoadedVLM,
    add_generation_flags,
    add_image_tags,
    add_model_flags,
    load_from_args,
    settings_from_args,
)

QUIT, RESET = "/quit", "/reset"


class Conversation:
    """A multi-turn chat whose pictures belong to its first user message."""

    def __init__(self, vlm: LoadedVLM, images: list[bytes], settings: GenerationSettings):
        self.vlm, self.images, self.settings = vlm, images, settings
        self.messages: list[dict] = []

    def ask(self, prompt: str, on_text: Callable[[str], None] | None = None) -> str:
        """Add a user turn, generate the reply (streamed to `on_text`), keep both in the history."""
        if not self.messages:
            prompt = add_image_tags(prompt, len(self.images))
        messages = self.messages + [{"role": "user", "content": prompt}]
        reply = self.vlm.generate(messages, self.images, self.settings, on_text)
        self.messages = messages + [{"role": "assistant", "content": reply}]
        return reply

    def reset(self) -> None:
        """Forget the turns; the pictures stay attached to the next first turn."""
        self.messages = []


def _print_piece(text: str) -> None:
    print(text, end="", flush=True)


def interactive(conversation: Conversation, read: Callable[[str], str] = input) -> None:
    """Read prompts until /quit or end of input; each reply is streamed to stdout."""
    print(f"chatting with {conversation.vlm.source} ({len(conversation.images)} picture(s) attached); "
          f"{QUIT} leaves, {RESET} starts over")
    while True:
        try:
            prompt = read("you> ").strip()
        except EOFError:
            print()
            return
        if prompt == QUIT:
            return
        if prompt == RESET:
            conversation.reset()
            continue
        if prompt:
            print("vlm> ", end="", flush=True)
            conversation.ask(prompt, _print_piece)
            print()


def _check_picture(vlm: LoadedVLM, path: str, data: bytes) -> None:
    try:
        vlm.preprocess(data)
    except BadSample as err:
        raise ValueError(f"--image {path} cannot be used: {err}") from err


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m vlm.chat", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="exported folder, training out_dir/checkpoint, or .pth")
    p.add_argument("--image", action="append", default=[], help="a picture for the first turn (repeatable)")
    p.add_argument("--prompt", help="ask once and exit; without it the session is interactive")
    add_generation_flags(p)
    add_model_flags(p)
    args = p.parse_args(argv)
    args.settings = settings_from_args(p, args)
    return args


def main(argv: list[str] | None = None, read: Callable[[str], str] = input) -> int:
    """Chat once (--prompt) or interactively; returns the exit code (2: bad flags or inputs)."""
    args = _parse_args(argv)
    try:
        images = [Path(path).read_bytes() for path in args.image]
        if args.prompt is not None:
            add_image_tags(args.prompt, len(images))  # check the placeholder count before loading anything
        vlm = load_from_args(args)
        for path, data in zip(args.image, images):
            _check_picture(vlm, path, data)
    except (OSError, ValueError, RuntimeError) as err:
        if args.debug:
            raise
        print(f"error: {err} (--debug shows the traceback)", file=sys.stderr)
        return 2
    conversation = Conversation(vlm, images, args.settings)
    if args.prompt is None:
        interactive(conversation, read)
    else:
        conversation.ask(args.prompt, _print_piece)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
