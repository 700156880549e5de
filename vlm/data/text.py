"""Text stage: conversations -> `input_ids` and `labels` through the tokenizer's own chat template.

    from vlm.data.text import ChatEncoder
    encode = ChatEncoder(tokenizer, image_token_id=3, image_token_len=196, max_seq_len=640)
    sample = encode(record["conversations"], num_images=2)   # {"input_ids": (L,), "labels": (L,)}

How labels are found. Every message content is wrapped in private-use sentinel characters before the
template is rendered (a reply in one pair, other contents in another, each `<image>` replaced by a third),
and the rendered text is split on them. Template text (role headers, `<|im_start|>`, separators) is
tokenized with special tokens active; message contents are tokenized with special tokens split into plain
bytes, so a literal "<|im_end|>" inside data cannot forge structure; each `<image>` becomes exactly
`image_token_len` copies of `image_token_id`, spliced in as ids (never left to BPE merges of "@@@@").
Labels are the reply tokens plus the first template token after each reply, which must be `<|im_end|>`,
and the newline token the template writes right after that `<|im_end|>` (both MiniMind-V generations train
on it: 623a130's loss mask runs one token past `<|im_end|>`, 3v's covers `<|im_end|>\n`), plus what the
template writes inside the assistant turn before the reply (after the `<|im_start|>assistant` header line):
MiniMind-V 3v's `<think>\n\n</think>\n\n`, which it trains on too.

Assumptions, checked when the encoder is built: the template (ChatML: `<|im_start|>{role}\\n{content}
<|im_end|>\\n`, with or without a default system prompt) copies each message's content verbatim and writes
`<|im_end|>` immediately after an assistant's content. Pieces are tokenized separately, so the ids can
differ from tokenizing the rendered string in one go at piece edges; `encode_prompt` uses the same
splitting, so training and inference agree.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from jinja2 import TemplateError

from vlm.formats.constants import IGNORE_INDEX, IMAGE_TAG
from vlm.formats.errors import BadSample
from vlm.formats.records import RESERVED_CHARS, check_conversations

IM_END = "<|im_end|>"
ASSISTANT_HEADER = "<|im_start|>assistant\n"  # ChatML: what opens an assistant turn

# Private-use code points (`RESERVED_CHARS`, refused in records): passed through verbatim by Jinja templates.
_IMAGE, _OPEN, _REPLY, _CLOSE = RESERVED_CHARS  # image; start of a system/user content; of a reply; end of any
_SENTINELS = re.compile(f"([{_IMAGE}{_OPEN}{_REPLY}{_CLOSE}])")


class ChatTemplateError(ValueError):
    """The tokenizer's chat template cannot be used to derive labels; the message says why."""


class ChatEncoder:
    """Picklable callable: (conversations, num_images) -> {"input_ids": (L,), "labels": (L,)} LongTensors.

    Raises `BadSample` with a reason of the record rules (`vlm.formats.records`: bad_roles, image_in_reply,
    image_count_mismatch, ...) or of the encoding: `image_token_in_text`, `template_mismatch`,
    `image_truncated` or `no_labels`.
    """

    def __init__(self, tokenizer: Any, image_token_id: int, image_token_len: int, max_seq_len: int):
        if not 0 <= image_token_id < len(tokenizer):
            raise ValueError(
                f"image_token_id {image_token_id} is outside the tokenizer's {len(tokenizer)} ids"
            )
        if image_token_len < 1 or max_seq_len < 1:
            raise ValueError(
                f"image_token_len ({image_token_len}) and max_seq_len ({max_seq_len}) must be >= 1"
            )
        self.tokenizer = tokenizer
        self.image_token_id = int(image_token_id)
        self.image_token_len = int(image_token_len)
        self.max_seq_len = int(max_seq_len)
        self.im_end_id = self._im_end_id()
        newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
        self.newline_id = newline[0] if len(newline) == 1 else None  # None: no newline target (no such token)
        self._check_template()

    def __call__(self, conversations: Sequence[dict], num_images: int) -> dict[str, torch.Tensor]:
        return self.encode(conversations, num_images)

    def encode(self, conversations: Sequence[dict], num_images: int) -> dict[str, torch.Tensor]:
        """Training sample: the whole conversation, labels on replies, truncated to `max_seq_len`."""
        messages = check_conversations(conversations, num_images)
        ids, labels, runs = self._tokenize(self._render(messages, generation_prompt=False), messages)
        ids, labels = ids[: self.max_seq_len], labels[: self.max_seq_len]
        if any(end > self.max_seq_len for _, end in runs):
            raise BadSample(
                "image_truncated", f"image run ends at {max(e for _, e in runs)} > {self.max_seq_len}"
            )
        # Position 0 never has a target once the model shifts labels by one.
        if all(label == IGNORE_INDEX for label in labels[1:]):
            raise BadSample("no_labels", f"no reply token within max_seq_len={self.max_seq_len}")
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
        }

    def encode_prompt(self, conversations: Sequence[dict], num_images: int) -> torch.Tensor:
        """Generation prompt (for chat and eval): the conversation plus the assistant header, not truncated."""
        messages = check_conversations(conversations, num_images, prompt=True)
        ids, _, _ = self._tokenize(self._render(messages, generation_prompt=True), messages)
        return torch.tensor(ids, dtype=torch.long)

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        marked = []
        for message in messages:
            content = message["content"].replace(IMAGE_TAG, _IMAGE)
            start = _REPLY if message["role"] == "assistant" else _OPEN
            marked.append({"role": message["role"], "content": start + content + _CLOSE})
        try:
            return self.tokenizer.apply_chat_template(
                marked, tokenize=False, add_generation_prompt=generation_prompt
            )
        except TemplateError as err:  # e.g. a template that insists on alternating roles
            raise BadSample("template_mismatch", f"chat template refused the conversation: {err}") from err

    def _tokenize(
        self, rendered: str, messages: list[dict]
    ) -> tuple[list[int], list[int], list[tuple[int, int]]]:
        """Split the rendered text on the sentinels -> ids, labels and the (start, end) of each image run."""
        ids: list[int] = []
        labels: list[int] = []
        runs: list[tuple[int, int]] = []
        inside, reply, after_reply, contents = False, False, False, 0
        pieces = _SENTINELS.split(rendered)
        for index, piece in enumerate(pieces):
            if piece == _IMAGE:
                if not inside or reply:
                    raise BadSample("template_mismatch", "image marker outside a user/system content")
                runs.append((len(ids), len(ids) + self.image_token_len))
                ids += [self.image_token_id] * self.image_token_len
                labels += [IGNORE_INDEX] * self.image_token_len
            elif piece in (_OPEN, _REPLY):
                if inside:
                    raise BadSample("template_mismatch", "nested message contents in the rendered template")
                inside, reply, contents = True, piece == _REPLY, contents + 1
            elif piece == _CLOSE:
                if not inside:
                    raise BadSample("template_mismatch", "content end without a start")
                inside, after_reply = False, reply
            elif piece:
                piece_ids = self._encode_text(piece, content=inside)
                if self.image_token_id in piece_ids:
                    raise BadSample("image_token_in_text", f"id {self.image_token_id} appears in the text")
                if after_reply and piece_ids[:1] != [self.im_end_id]:
                    raise BadSample("template_mismatch", f"a reply is not followed by {IM_END}")
                labels += piece_ids if reply and inside else [IGNORE_INDEX] * len(piece_ids)
                if after_reply:
                    labels[len(ids)] = piece_ids[0]  # the <|im_end|> closing the reply is a target
                    if self.newline_id is not None and piece_ids[1:2] == [self.newline_id]:
                        labels[len(ids) + 1] = self.newline_id  # and the newline after it, as MiniMind-V
                ids += piece_ids
                if not inside and index + 1 < len(pieces) and pieces[index + 1] == _REPLY:
                    self._label_turn_opening(piece, piece_ids, labels)
                after_reply = False
        if contents != len(messages) or inside or after_reply:
            raise BadSample("template_mismatch", f"rendered {contents} of {len(messages)} messages")
        return ids, labels, runs

    def _label_turn_opening(self, piece: str, piece_ids: list[int], labels: list[int]) -> None:
        """Make the template text between the assistant header and the reply (the end of `piece`, whose ids
        end `labels`) targets too: e.g. an empty `<think>` block the template writes into every turn."""
        start = piece.rfind(ASSISTANT_HEADER)
        opening = piece[start + len(ASSISTANT_HEADER):] if start >= 0 else ""
        if not opening:
            return
        opening_ids = self._encode_text(opening, content=False)
        if piece_ids[len(piece_ids) - len(opening_ids):] != opening_ids:
            raise BadSample("template_mismatch", "the assistant turn's opening does not tokenize on its own")
        labels[len(labels) - len(opening_ids):] = opening_ids

    def _encode_text(self, text: str, content: bool) -> list[int]:
        # Contents: special-token strings are plain text. Template text: they are the control tokens.
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=content)["input_ids"]

    def _im_end_id(self) -> int:
        ids = self.tokenizer(IM_END, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ChatTemplateError(
                f"the tokenizer has no single token for {IM_END} (got ids {ids}); a ChatML tokenizer is required"
            )
        return ids[0]

    def _check_template(self) -> None:
        """Render a probe conversation once, so a template that breaks the assumptions fails at startup."""
        name = getattr(self.tokenizer, "name_or_path", "") or type(self.tokenizer).__name__
        if not getattr(self.tokenizer, "chat_template", None):
            raise ChatTemplateError(
                f"tokenizer {name} has no chat_template; use a tokenizer with a ChatML template"
            )
        probe = [
            {"role": "system", "content": "s"},
            {"role": "user", "content": f"{IMAGE_TAG}u"},
            {"role": "assistant", "content": "a"},
        ]
        try:
            ids, labels, runs = self._tokenize(self._render(probe, generation_prompt=False), probe)
        except BadSample as err:
            raise ChatTemplateError(
                f"the chat template of {name} does not copy message contents verbatim or does not close "
                f"replies with {IM_END} ({err}); labels cannot be derived from it"
            ) from err
        if len(runs) != 1 or not any(label != IGNORE_INDEX for label in labels):
            raise ChatTemplateError(f"the chat template of {name} dropped the probe's image or reply")
