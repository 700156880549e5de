"""Loading a tokenizer folder and resolving its image placeholder token.

The built-in tokenizer lives in `vlm/assets/tokenizer` (made by `python -m data_tools.train_tokenizer`):
byte-level BPE, `<|endoftext|>`=0 (pad), `<|im_start|>`=1 (bos), `<|im_end|>`=2 (eos), `<|image|>`=3,
ChatML chat template. Any local Hugging Face tokenizer folder works instead. The image placeholder is
found from the tokenizer unless `model.image_placeholder` names it: ours `<|image|>`, MiniMind-V 3v's
`<|image_pad|>` (id 12), or, for MiniMind's 6400-token tokenizer without either (MiniMind-V 623a130), '@'
(id 34).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase


class TokenizerError(ValueError):
    """A tokenizer folder that does not load, or whose image placeholder is unusable; the message names it."""

DEFAULT_PLACEHOLDER = "<|image|>"
MINIMIND_PLACEHOLDER = "@"
MINIMIND3V_PLACEHOLDER = "<|image_pad|>"
MINIMIND_VOCAB = 6400  # MiniMind's tokenizers (623a130 and 3v) have exactly this many tokens


def builtin_tokenizer_path() -> Path:
    """The tokenizer folder shipped inside the installed `vlm` package (not relative to the working directory)."""
    return Path(str(resources.files("vlm") / "assets" / "tokenizer"))


def load_tokenizer(path: str | Path | None = None) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a local folder (None: the built-in one). Never downloads, never runs remote code.

    Raises FileNotFoundError when the folder or its tokenizer files are missing and ValueError when
    they do not load (TokenizerError, a ValueError), naming the path in both cases.
    """
    folder = builtin_tokenizer_path() if path is None else Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer folder {folder} does not exist; set the tokenizer path in the config to "
                                "a folder with tokenizer.json and tokenizer_config.json (or leave it empty for "
                                "the built-in tokenizer)")
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        raise FileNotFoundError(f"tokenizer folder {folder} holds neither tokenizer.json nor tokenizer_config.json")
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except Exception as err:  # the tokenizers library raises bare Exception for a malformed tokenizer.json
        raise TokenizerError(f"could not load the tokenizer in {folder}: {err}") from err


def default_placeholder(tokenizer: PreTrainedTokenizerBase) -> str:
    """The image placeholder a tokenizer implies: `<|image|>` (ours) or `<|image_pad|>` (MiniMind-V 3v) when it
    has that special token, else '@' for MiniMind's 6400-token tokenizer (623a130), else `<|image|>` (which
    `image_placeholder_id` then reports as missing)."""
    special = set(tokenizer.all_special_tokens) | set(getattr(tokenizer, "added_tokens_encoder", {}))
    for candidate in (DEFAULT_PLACEHOLDER, MINIMIND3V_PLACEHOLDER):
        if candidate in special:
            return candidate
    if len(tokenizer) == MINIMIND_VOCAB:
        return MINIMIND_PLACEHOLDER
    return DEFAULT_PLACEHOLDER


def image_placeholder_id(tokenizer: PreTrainedTokenizerBase, placeholder: str | None = None) -> int:
    """The token id that marks one image-feature position.

    `placeholder` None finds it from the tokenizer (`default_placeholder`). The placeholder must encode to
    exactly one token, also when repeated (a run of N placeholders must be N ids), or image features could
    not be placed one per position. Raises TokenizerError naming the placeholder and what to set.
    """
    text = default_placeholder(tokenizer) if placeholder is None else placeholder
    ids = tokenizer.encode(text, add_special_tokens=False)
    hint = (f'; with MiniMind\'s tokenizer set model.image_placeholder: "{MINIMIND_PLACEHOLDER}" '
            f"(--model.image_placeholder={MINIMIND_PLACEHOLDER})" if placeholder is None else
            "; choose a placeholder that is a single token, ideally a special token")
    if len(ids) != 1:
        raise TokenizerError(f"image placeholder {text!r} is {len(ids)} tokens {ids} in this tokenizer, "
                         f"not one{hint}")
    run = tokenizer.encode(text * 4, add_special_tokens=False)
    if run != ids * 4:
        raise TokenizerError(f"image placeholder {text!r} merges with itself when repeated ({text * 4!r} -> {run}){hint}")
    return ids[0]
