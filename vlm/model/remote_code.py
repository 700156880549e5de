"""What a saved model folder needs for plain transformers to load it: `AutoModelForCausalLM.from_pretrained(folder,
trust_remote_code=True)`.

`architectures` and `auto_map` in config.json; the model code (`REMOTE_CODE`: the templates of `vlm/hf/` and flat
copies of the project modules they import, their `vlm.*` imports made relative, never a second copy of the math,
checked at export time to import only what a transformers environment has); generation_config.json (the greedy
defaults of `vlm.chat`); a tokenizer config that transformers 4.5x reads as 5.x does. `save_vlm_folder` calls
`add_transformers_files`, so every exported folder (the trainer's `out_dir/export` too) carries them.
"""

from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path

from vlm.model.config import VLMConfig
from vlm.model.generation import GenerationSettings

PACKAGE = Path(__file__).resolve().parents[1]  # vlm/
REMOTE_CODE = PACKAGE / "hf"
"""Templates shipped as they are; their relative imports (`from .vlm_model_vlm import ...`) name the project
modules copied beside them."""
ENTRY_MODULE, ARCHITECTURE = "modeling_minimind_vlm", "MiniMindVLMForCausalLM"
REMOTE_CODE_PACKAGES = frozenset({"torch", "transformers", "safetensors", "huggingface_hub", "numpy", "yaml",
                                  "PIL", "jinja2"})
"""What shipped code may import besides the standard library: torch, transformers and transformers' own
dependencies; pillow and jinja2 only for `build_inputs` (pictures and the chat template, imported when used)."""
V5_ONLY_TOKENIZER_KEYS = ("backend", "is_local", "local_files_only")
"""Keys transformers 5 writes into tokenizer_config.json that 4.5x would pass on to the tokenizer."""


class RemoteCodeError(RuntimeError):
    """The project's model code cannot be shipped as remote code (an import transformers could not follow)."""


def flat_module_name(module: str) -> str:
    """A project module's file name (without .py) in an exported folder: `vlm.model.vlm` -> `vlm_model_vlm`."""
    return module.replace(".", "_")


def auto_map() -> dict[str, str]:
    """config.json's `auto_map`: the shipped configuration and model classes, as `module.Class`."""
    return {"AutoConfig": f"{flat_module_name(VLMConfig.__module__)}.{VLMConfig.__name__}",
            "AutoModelForCausalLM": f"{ENTRY_MODULE}.{ARCHITECTURE}"}


def _project_modules() -> dict[str, Path]:
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = ("vlm", *path.relative_to(PACKAGE).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _localised(module: str, source: str, modules: dict[str, Path]) -> tuple[str, set[str], list[str]]:
    """(source with `vlm.*` imports made relative to the flat copies, project modules it imports, problems)."""
    lines = source.splitlines(keepends=True)
    deps, problems = set(), []
    for node in ast.walk(ast.parse(source)):
        where = f"{module} line {getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names = [node.module]
        elif isinstance(node, ast.ImportFrom):
            problems.append(f"{where}: relative import (use `from vlm.... import`)")
            continue
        else:
            continue
        allowed = {"vlm", *REMOTE_CODE_PACKAGES, *sys.stdlib_module_names}
        problems += [f"{where}: imports {n}, which transformers does not bring" for n in names
                     if n.split(".")[0] not in allowed]
        if not any(n.split(".")[0] == "vlm" for n in names):
            continue
        line = lines[node.lineno - 1]
        targets = [f"{node.module}.{alias.name}" for alias in node.names] if isinstance(node, ast.ImportFrom) else []
        if isinstance(node, ast.Import):
            problems.append(f"{where}: `import vlm...` (use `from vlm.... import`)")
        elif all(t in modules for t in targets) and node.lineno == node.end_lineno:  # `from vlm.model import flex`
            indent = line[: node.col_offset]
            # transformers copies the files named by `from .x import` lines only: name the module that way first.
            lines[node.lineno - 1] = "".join(
                f"{indent}from .{flat_module_name(t)} import __name__ as _{flat_module_name(t)}_name; "
                f"from . import {flat_module_name(t)} as {alias.asname or alias.name}\n"
                for t, alias in zip(targets, node.names))
            deps.update(targets)
        elif node.module in modules and not any(t in modules for t in targets):
            flat = flat_module_name(node.module)
            lines[node.lineno - 1] = re.sub(rf"\bfrom\s+{re.escape(node.module)}\s", f"from .{flat} ", line, count=1)
            deps.add(node.module)
        else:
            problems.append(f"{where}: `from {node.module} import ...` mixes modules and names, names no module, or "
                            "imports modules over several lines")
    return "".join(lines), deps, problems


def remote_code_sources(roots: list[str]) -> dict[str, str]:
    """{flat file name: source} of the project modules `roots` import, directly or not, made self-contained.

    Raises RemoteCodeError listing every import a transformers-only environment could not satisfy.
    """
    modules = _project_modules()
    sources, shipped, problems, todo = {}, {}, [], list(roots)
    while todo:
        module = todo.pop()
        if shipped.setdefault(flat_module_name(module), module) != module:
            problems.append(f"{module} and {shipped[flat_module_name(module)]} would share one file name")
        if flat_module_name(module) in sources:
            continue
        text, deps, found = _localised(module, modules[module].read_text(encoding="utf-8"), modules)
        sources[flat_module_name(module)] = (f"# Copied from {module} by vlm.export (minimind-vlm-trainer), its vlm.* "
                                             "imports made relative. Do not edit.\n" + text)
        problems += found
        todo += sorted(deps)
    if problems:
        raise RemoteCodeError("the model code cannot be shipped as remote code:\n  " + "\n  ".join(problems))
    return sources


def write_remote_code(folder: str | Path) -> list[Path]:
    """Write the templates of `REMOTE_CODE` and the project modules they import into `folder`; return the files.

    Checks that transformers' dynamic-module loader copies every one of them (it follows `from .x import`).
    """
    from transformers.dynamic_module_utils import get_relative_import_files

    folder = Path(folder)
    modules = {flat_module_name(m): m for m in _project_modules()}
    templates = {p.stem: p.read_text(encoding="utf-8") for p in sorted(REMOTE_CODE.glob("*.py")) if p.stem != "__init__"}
    roots = sorted({modules[n.module] for text in templates.values() for n in ast.walk(ast.parse(text))
                    if isinstance(n, ast.ImportFrom) and n.level == 1 and n.module in modules})
    files = {**remote_code_sources(roots), **templates}
    written = []
    for name, text in files.items():
        compile(text, name, "exec")  # a rewrite that broke the syntax fails here, not in the user's process
        (folder / f"{name}.py").write_text(text, encoding="utf-8")
        written.append(folder / f"{name}.py")
    entries = {ENTRY_MODULE, *(ref.split(".")[0] for ref in auto_map().values())}
    followed = entries | {Path(p).stem for e in entries for p in get_relative_import_files(folder / f"{e}.py")}
    if followed != set(files):
        raise RemoteCodeError(f"transformers would copy {sorted(followed)} but the export ships {sorted(files)}")
    return written


def write_portable_tokenizer_config(folder: str | Path) -> None:
    """Rewrite `folder`'s tokenizer_config.json so that transformers 4.5x reads it as 5.x does: the generic fast
    class under its 4.x name, special tokens as `additional_special_tokens`, the chat template inline too."""
    path = Path(folder) / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("tokenizer_class") == "TokenizersBackend" and (path.parent / "tokenizer.json").is_file():
        config["tokenizer_class"] = "PreTrainedTokenizerFast"  # 5.x's generic fast tokenizer; 4.x knows this name
    extra = config.get("extra_special_tokens")
    if isinstance(extra, list):  # 4.5x reads only a {name: token} mapping here
        del config["extra_special_tokens"]
        named = config.get("additional_special_tokens") or []
        config["additional_special_tokens"] = named + [t for t in extra if t not in named]
    for key in V5_ONLY_TOKENIZER_KEYS:
        config.pop(key, None)
    template = path.parent / "chat_template.jinja"
    if "chat_template" not in config and template.is_file():
        config["chat_template"] = template.read_text(encoding="utf-8")
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def add_transformers_files(folder: str | Path, model, tokenizer=None) -> Path:
    """Make a folder written by `save_vlm_folder` loadable by transformers alone (see the module docstring):
    `architectures` and `auto_map` in config.json, the remote code, generation_config.json (`vlm.chat`'s greedy
    defaults) and, when the folder has a tokenizer, its portable config. Raises RemoteCodeError."""
    folder = Path(folder)
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config.update(architectures=[ARCHITECTURE], auto_map=auto_map())
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    write_remote_code(folder)
    GenerationSettings().config(tokenizer, model).save_pretrained(folder)
    if (folder / "tokenizer_config.json").is_file():
        write_portable_tokenizer_config(folder)
    return folder
