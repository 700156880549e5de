"""One set of rules for a conversation record, used by the sharder, the trainer's text stage, eval and chat.

A record is a JSON object in one of two styles, told apart by its turns:
- MiniMind-V: `{"conversations": [{"role", "content"}, ...], "image": "a.jpg, b.png"}` (comma-separated);
- LLaVA: `{"id", "image": "a.jpg" or ["a.jpg", "b.png"], "conversations": [{"from", "value"}, ...]}`, `from`
  being human/user, gpt/assistant or system; `normalize_record` rewrites it in the MiniMind-V style (roles
  user/assistant/system, `image` a list), which every later rule and the shards use.
The rules, each failure a `BadSample` with a stable reason code (these codes appear in manifest.json and in
the trainer's skip counts):

    no_conversations      'conversations' missing, empty or not a list
    bad_turn              a turn that is not an object with string 'role' and 'content'
    bad_roles             roles other than: an optional leading system turn, then user and assistant
                          alternating from user, ending with an assistant turn (a prompt ends with a user turn)
    empty_content         a turn whose content is empty or blank (training records)
    reserved_char         private-use characters U+E000..U+E003 (the text stage's internal markers)
    image_in_reply        an `<image>` tag inside an assistant turn
    image_count_mismatch  the number of `<image>` tags differs from the number of pictures
    bad_image_field       'image' is not a comma-separated string (or a list) of non-empty names
    not_utf8, bad_json    (JSONL lines only) the line is not UTF-8, or not one JSON object
    reserved_field        (JSONL lines only) a field the sharder writes itself: 'source' or 'images'

A record the sharder keeps is therefore one the trainer's text stage accepts. Its pictures are read with
`read_image`, confined to the images folder (unsafe_image_path, missing_image, empty_image, bad_image).
"""

from __future__ import annotations

import errno
import functools
import json
import os
from typing import Any

from vlm.formats.constants import IMAGE_TAG
from vlm.formats.errors import BadSample

ROLES = ("system", "user", "assistant")
RESERVED_CHARS = "\ue000\ue001\ue002\ue003"
"""Private-use code points the text stage uses as markers; never produced by real text."""
RESERVED_FIELDS = ("source", "images")
"""Fields the shard json writes itself; a record carrying them would be silently overwritten."""
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # 0 where the OS lacks it: every path is then fully resolved


def check_conversations(conversations: Any, num_images: int | None = None, prompt: bool = False) -> list[dict]:
    """Check a record's turns against the rules above; return them as plain {"role", "content"} dicts.

    `num_images` None skips the tag count (the caller counts later); `prompt` True expects the conversation
    to end with the user turn that is to be answered (chat, eval) instead of an assistant reply, and lets
    earlier turns be empty (a model may have answered nothing).
    Raises BadSample (no_conversations, bad_turn, bad_roles, empty_content, reserved_char, image_in_reply,
    image_count_mismatch).
    """
    if not isinstance(conversations, (list, tuple)) or not conversations:
        raise BadSample("no_conversations", "'conversations' is missing, empty or not a list")
    messages, tags = [], 0
    offset = 1 if _role(conversations[0]) == "system" else 0
    for i, turn in enumerate(conversations):
        role = _role(turn)
        content = turn.get("content") if isinstance(turn, dict) else None
        if role is None or not isinstance(content, str):
            raise BadSample("bad_turn", f"turn {i} is not an object with string 'role' and 'content'")
        expected = "system" if i < offset else ("user", "assistant")[(i - offset) % 2]
        if role != expected:
            raise BadSample("bad_roles", f"turn {i} has role {role!r}, expected {expected!r} (an optional "
                                         "system turn first, then user and assistant alternating)")
        if not prompt and not content.strip():
            raise BadSample("empty_content", f"turn {i} ({role}) has empty content")
        if any(char in content for char in RESERVED_CHARS):
            raise BadSample("reserved_char", f"turn {i} contains a private-use character U+E000..U+E003")
        count = content.count(IMAGE_TAG)
        if count and role == "assistant":
            raise BadSample("image_in_reply", f"turn {i} is an assistant reply with {IMAGE_TAG}")
        tags += count
        messages.append({"role": role, "content": content})
    last = messages[-1]["role"]
    if prompt and last != "user":
        raise BadSample("bad_roles", f"a prompt must end with the user turn to answer, not a {last} turn")
    if not prompt and last != "assistant":
        raise BadSample("bad_roles", f"the conversation ends with a {last} turn, not an assistant reply "
                                     "(nothing to learn)")
    if num_images is not None:
        check_image_count(tags, num_images)
    return messages


def check_image_count(tags: int, num_images: int) -> None:
    """Raises BadSample("image_count_mismatch") unless there is one `<image>` tag per picture."""
    if tags != num_images:
        raise BadSample("image_count_mismatch", f"{tags} {IMAGE_TAG} tag(s) for {num_images} image(s)")


def _role(turn: Any) -> str | None:
    role = turn.get("role") if isinstance(turn, dict) else None
    return role if isinstance(role, str) else None


def image_names(field: Any) -> list[str]:
    """The `image` field as a list: absent, null or "" -> []; "a.jpg, b.png" -> ["a.jpg", "b.png"];
    a list of names (LLaVA) -> the same list.

    Raises BadSample("bad_image_field") for another type or an empty name.
    """
    if field is None or field == "":
        return []
    if isinstance(field, list):
        names = [name.strip() if isinstance(name, str) else "" for name in field]
        if not all(names):
            raise BadSample("bad_image_field", f"'image' list holds an empty or non-string name: {field!r}"[:200])
        return names
    if not isinstance(field, str):
        raise BadSample("bad_image_field", f"'image' must be a comma-separated string or a list of names, "
                                           f"got {type(field).__name__}")
    names = [name.strip() for name in field.split(",")]
    if not all(names):
        raise BadSample("bad_image_field", f"empty file name in 'image': {field!r}")
    return names


def parse_record(raw: bytes, first_line: bool = False) -> tuple[dict, list[str]]:
    """One JSONL line -> (record in MiniMind-V style, image names in placeholder order), every rule checked.

    `first_line` allows a UTF-8 byte-order mark. Raises BadSample with any reason of the module docstring.
    """
    try:
        text = raw.decode("utf-8-sig" if first_line else "utf-8")
    except UnicodeDecodeError as e:
        raise BadSample("not_utf8", f"invalid UTF-8 at byte {e.start}") from e
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadSample("bad_json", f"{e.msg} at column {e.colno}") from e
    return check_record(record)


def check_record(record: Any) -> tuple[dict, list[str]]:
    """A decoded record (either style) -> (record in MiniMind-V style, image names in placeholder order).

    Raises BadSample: bad_json (not an object), reserved_field, and every rule of `check_conversations`
    and `image_names`, and image_count_mismatch.
    """
    if not isinstance(record, dict):
        raise BadSample("bad_json", f"expected a JSON object, got {type(record).__name__}")
    for field in RESERVED_FIELDS:
        if field in record:
            raise BadSample("reserved_field", f"field {field!r} is written by the sharder; rename it")
    record = normalize_record(record)
    messages = check_conversations(record.get("conversations"))
    names = image_names(record.get("image"))
    check_image_count(sum(m["content"].count(IMAGE_TAG) for m in messages), len(names))
    return record, names


LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
"""LLaVA / ShareGPT speaker names (`from`) -> roles."""


def is_llava_style(record: dict) -> bool:
    """True when the record's turns are LLaVA's `{"from", "value"}` rather than `{"role", "content"}`."""
    turns = record.get("conversations")
    return isinstance(turns, list) and any(isinstance(t, dict) and "from" in t and "role" not in t for t in turns)


def normalize_record(record: dict) -> dict:
    """A LLaVA-style record rewritten in MiniMind-V style (a new dict; other fields kept, `image` a list of
    names); a MiniMind-V record is returned as it is. Unknown speakers are kept, so `check_conversations`
    reports them as bad_roles."""
    if not is_llava_style(record):
        return record
    turns = [
        {"role": LLAVA_ROLES.get(t.get("from"), t.get("from")), "content": t.get("value")} if isinstance(t, dict)
        else t
        for t in record["conversations"]
    ]
    image = record.get("image")
    return {**record, "conversations": turns, "image": [image] if isinstance(image, str) and image else image}


def read_image(images_root: str, name: str) -> bytes:
    """Bytes of image `name` inside `images_root` (a real path); refuses paths and symlinks that leave it."""
    if "\0" in name or os.path.isabs(name):
        raise BadSample("unsafe_image_path", f"{name!r} is not a relative path inside the images folder")
    folder, base = os.path.split(name)
    if not _NOFOLLOW or base in ("", ".", ".."):
        return _read(_resolve(images_root, name), name)
    path = os.path.join(_real_folder(images_root, folder), base)
    try:
        # O_NOFOLLOW: the common case (a plain file) costs no extra system call; a symlink fails with ELOOP
        # and is then resolved in full, so one pointing outside the folder is caught.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | _NOFOLLOW)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return _read(_resolve(images_root, name), name)
        raise _unreadable(e, name) from e
    try:
        data = _read_all(fd)
    except OSError as e:
        raise _unreadable(e, name) from e
    finally:
        os.close(fd)
    if not data:
        raise BadSample("empty_image", f"{name!r} is a zero-byte file")
    return data


def _read_all(fd: int) -> bytes:
    """Everything in an open file: one read of its size (plus one to see the end), without a file object
    (the sharder reads every picture of a corpus through here)."""
    size = os.fstat(fd).st_size
    chunks = [os.read(fd, size + 1)]
    while chunks[-1]:
        chunks.append(os.read(fd, max(size + 1, 1 << 16)))
    return b"".join(chunks) if len(chunks) > 2 else chunks[0]


def _resolve(images_root: str, name: str) -> str:
    # realpath follows every symlink on the way, so links that point outside the folder are caught.
    path = os.path.realpath(os.path.join(images_root, name))
    if os.path.commonpath((images_root, path)) != images_root:
        raise BadSample("unsafe_image_path", f"{name!r} resolves outside the images folder")
    return path


@functools.lru_cache(maxsize=4096)
def _real_folder(images_root: str, folder: str) -> str:
    return _resolve(images_root, folder) if folder else images_root


def _unreadable(e: OSError, name: str) -> BadSample:
    if isinstance(e, (FileNotFoundError, NotADirectoryError, IsADirectoryError)):
        return BadSample("missing_image", f"{name!r} is not a file in the images folder")
    return BadSample("bad_image", f"{name!r} cannot be read: {e.strerror}")


def _read(source, name: str) -> bytes:
    """Read a path or an open binary file; a zero-byte file is `empty_image`."""
    try:
        if isinstance(source, str):
            with open(source, "rb", buffering=0) as f:
                data = f.read()
        else:
            data = source.read()
    except OSError as e:
        raise _unreadable(e, name) from e
    if not data:
        raise BadSample("empty_image", f"{name!r} is a zero-byte file")
    return data
