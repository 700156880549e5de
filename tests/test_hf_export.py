"""The Hugging Face export loads with transformers alone and answers as `vlm.chat` does.

The exported folder is loaded in a subprocess that cannot import this project (its editable-install finder and
path entries removed, `import vlm` checked to fail): `AutoModelForCausalLM.from_pretrained(folder,
trust_remote_code=True)`, `AutoTokenizer`, the shipped `build_inputs`, greedy `generate`; the prompt ids, the
pixels, the logits and the generated ids are compared with the in-process `vlm.chat` conversation's.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.tiny_vlm import DIM, LAYERS, picture, save_tiny_vlm
from vlm import chat, export
from vlm.inference import GenerationSettings, load_model
from vlm.load import load_any
from vlm.model import remote_code

RED = (220, 38, 38)
PROMPT, NEW_TOKENS = "Describe the shapes.", 12
PENALTY = 3.0  # a random model repeats one token greedily; the penalty makes the reply vary

# Runs in the subprocess: argv = [exported folder, picture file, output folder, mode]. Mode "minimal" also hides
# pillow, jinja2 and torchvision, loads the model and runs it on the saved reference inputs; "full" builds its
# inputs with the shipped `build_inputs` from the tokenizer and the picture.
SCRIPT = textwrap.dedent('''
    import json, sys
    from pathlib import Path

    sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
    sys.path_hooks[:] = [h for h in sys.path_hooks if "__editable__" not in getattr(h, "__module__", "")]
    sys.path[:] = [p for p in sys.path if "__editable__" not in p and Path(p or ".").resolve() != Path(REPO)]
    sys.path_importer_cache.clear()
    try:
        import vlm
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit(f"the project is importable: {vlm}")
    folder, image_file, out, mode = sys.argv[1:]
    if mode == "minimal":
        for name in ("PIL", "jinja2", "torchvision"):
            sys.modules[name] = None  # import fails; transformers sees the package as absent

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    if mode == "minimal":
        inputs = torch.load(Path(out) / "reference_inputs.pt")
    else:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)  # 5.x reads config.json too
        inputs = model.build_inputs(tokenizer, "<image>\\n" + PROMPT, [Path(image_file).read_bytes()])
    with torch.no_grad():
        logits = model(**inputs).logits[0]
        ids = model.generate(**inputs, max_new_tokens=NEW_TOKENS,
                             repetition_penalty=PENALTY)[0, inputs["input_ids"].shape[1]:].tolist()
    eos = model.config.eos_token_id
    torch.save({"logits": logits, **inputs}, Path(out) / f"{mode}.pt")
    print(json.dumps({"ids": ids[: ids.index(eos)] if eos in ids else ids, "class": type(model).__module__,
                      "missing": [n for n in ("PIL", "jinja2") if sys.modules.get(n) is None]}))
''').replace("REPO", repr(str(Path(__file__).resolve().parents[1]))).replace(
    "PROMPT", repr(PROMPT)).replace("NEW_TOKENS", str(NEW_TOKENS)).replace("PENALTY", str(PENALTY))


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_vision_dir):
    """(hf export, project folder it came from, picture file) of the tiny model."""
    root = tmp_path_factory.mktemp("hf_export")
    source, _ = save_tiny_vlm(tiny_vision_dir, root)
    assert export.main(["--checkpoint", str(source), "--format", "hf", "--out", str(root / "hf")]) == 0
    (root / "red.png").write_bytes(picture(RED))
    return root / "hf", source, root / "red.png"


@pytest.fixture(scope="module")
def reference(exported):
    """What `vlm.chat` does in this process: {input_ids, attention_mask, pixel_values, logits, ids}."""
    folder, _, image = exported
    loaded = load_model(folder)
    seen = {}
    original = loaded.generate_ids

    def spy(input_ids, pixel_values, settings, streamer=None):
        seen.update(input_ids=input_ids, pixel_values=pixel_values)
        seen["ids"] = original(input_ids, pixel_values, settings, streamer)[0]
        return [seen["ids"]]

    loaded.generate_ids = spy
    chat.Conversation(loaded, [image.read_bytes()], GenerationSettings(NEW_TOKENS, repetition_penalty=PENALTY)).ask(PROMPT)
    with torch.no_grad():
        seen["logits"] = loaded.model(input_ids=seen["input_ids"], pixel_values=seen["pixel_values"]).logits[0]
    seen["attention_mask"] = torch.ones_like(seen["input_ids"])
    return seen


def _run_without_the_project(exported, out: Path, mode: str) -> dict:
    folder, _, image = exported
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_MODULES_CACHE=str(out / "modules"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    result = subprocess.run([sys.executable, "-I", "-c", SCRIPT, str(folder), str(image), str(out), mode],
                            cwd=out, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_config_names_the_architecture_and_ships_its_code(exported):
    folder = exported[0]
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["MiniMindVLMForCausalLM"]
    assert config["auto_map"] == {"AutoConfig": "vlm_model_config.VLMConfig",
                                  "AutoModelForCausalLM": "modeling_minimind_vlm.MiniMindVLMForCausalLM"}
    assert (folder / "model.safetensors").is_file() and (folder / "vision_model" / "model.safetensors").is_file()
    assert not list(folder.rglob("*.bin")) and not list(folder.rglob("*.pth"))
    shipped = {p.stem: p.read_text() for p in folder.glob("*.py")}
    assert {"modeling_minimind_vlm", "vlm_model_vlm", "vlm_model_language_model", "vlm_data_text"} <= set(shipped)
    for name, text in shipped.items():  # copies of the real sources, never a hand-written second model
        assert name == "modeling_minimind_vlm" or text.startswith("# Copied from vlm.")
        imported = [n.module or "" for n in ast.walk(ast.parse(text)) if isinstance(n, ast.ImportFrom)]
        imported += [a.name for n in ast.walk(ast.parse(text)) if isinstance(n, ast.Import) for a in n.names]
        assert not [m for m in imported if m.split(".")[0] == "vlm"], name
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["do_sample"] is False and generation["eos_token_id"] == config["eos_token_id"]


def test_the_tokenizer_config_reads_in_transformers_4_and_5(exported):
    folder = exported[0]
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast"  # not 5.x's TokenizersBackend
    assert not isinstance(tokenizer_config.get("extra_special_tokens", {}), list)  # 4.5x wants a mapping
    assert "<|image|>" in tokenizer_config["additional_special_tokens"]
    assert tokenizer_config["chat_template"] == (folder / "chat_template.jinja").read_text()
    assert not {"backend", "is_local", "local_files_only"} & set(tokenizer_config)


def test_transformers_alone_answers_as_vlm_chat(exported, reference, tmp_path):
    answer = _run_without_the_project(exported, tmp_path, "full")
    got = torch.load(tmp_path / "full.pt")

    assert answer["class"].startswith("transformers_modules.")  # the shipped code, not this project's
    assert torch.equal(got["input_ids"], reference["input_ids"])
    assert torch.equal(got["pixel_values"], reference["pixel_values"])
    assert torch.equal(got["logits"], reference["logits"])
    assert answer["ids"] == reference["ids"] and len(set(reference["ids"])) > 3


def test_the_model_loads_with_torch_and_transformers_only(exported, reference, tmp_path):
    """No pillow, jinja2 or torchvision: the model still loads, tower included, and gives the same answer."""
    torch.save({k: reference[k] for k in ("input_ids", "attention_mask", "pixel_values")},
               tmp_path / "reference_inputs.pt")
    answer = _run_without_the_project(exported, tmp_path, "minimal")

    assert answer["missing"] == ["PIL", "jinja2"]
    assert torch.equal(torch.load(tmp_path / "minimal.pt")["logits"], reference["logits"])
    assert answer["ids"] == reference["ids"]


def test_every_saved_folder_carries_the_transformers_files_and_an_older_one_is_completed_in_place(
        tmp_path, tiny_vision_dir):
    """`save_vlm_folder` (the trainer's `out_dir/export` too) writes them; a folder of an older version, without
    them, gains them in place; the project loads both as before."""
    folder, pth = save_tiny_vlm(tiny_vision_dir, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["MiniMindVLMForCausalLM"] and "auto_map" in config
    for path in folder.glob("*.py"):
        path.unlink()
    (folder / "config.json").write_text(json.dumps({k: v for k, v in config.items()
                                                    if k not in ("architectures", "auto_map")}))
    assert export.main(["--checkpoint", str(folder), "--format", "hf", "--out", str(folder)]) == 0
    assert "auto_map" in json.loads((folder / "config.json").read_text())
    assert (folder / "modeling_minimind_vlm.py").is_file()
    model, tokenizer, _, kind = load_any(folder)
    assert kind == "hf" and tokenizer.convert_tokens_to_ids("<|image|>") == model.config.image_token_id


def test_the_minimind_pth_export_still_works(exported, reference, tmp_path):
    folder = exported[0]
    assert export.main(["--checkpoint", str(folder), "--format", "minimind", "--out", str(tmp_path / "m.pth")]) == 0
    model, _, _, kind = load_any(tmp_path / "m.pth", tokenizer=str(folder), vision_model=str(folder / "vision_model"),
                                 dim=DIM, n_layers=LAYERS)
    with torch.no_grad():
        logits = model.eval()(input_ids=reference["input_ids"], pixel_values=reference["pixel_values"]).logits[0]
    assert kind == "minimind" and torch.allclose(logits, reference["logits"], atol=2e-2)  # fp16 weights


def test_a_pth_is_not_a_source_to_export(exported, tmp_path, capsys):
    (tmp_path / "m.pth").write_bytes(b"")
    assert export.main(["--checkpoint", str(tmp_path / "m.pth"), "--format", "hf", "--out", str(tmp_path / "x")]) == 2
    assert "training checkpoint or an exported folder" in capsys.readouterr().err


def test_code_transformers_cannot_bring_is_refused_at_export(tmp_path, monkeypatch):
    """Shipped modules are checked at export: an import a transformers-only environment lacks is named."""
    (tmp_path / "stage.py").write_text("import webdataset\nfrom vlm.model import flex\nimport vlm.config\n")
    modules = remote_code._project_modules()
    monkeypatch.setattr(remote_code, "_project_modules", lambda: {**modules, "vlm.data.stage": tmp_path / "stage.py"})
    with pytest.raises(remote_code.RemoteCodeError) as raised:
        remote_code.remote_code_sources(["vlm.data.stage"])
    assert "vlm.data.stage line 1: imports webdataset" in str(raised.value)
    assert "vlm.data.stage line 3: `import vlm...`" in str(raised.value)
    assert remote_code.flat_module_name("vlm.model.vlm") == "vlm_model_vlm"
