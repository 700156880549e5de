"""Corpus formats in (MiniMind-V JSONL, LLaVA JSON and JSONL, MiniMind-V 3v parquet), whole-file mistakes out:
what users report, each with its right value."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_tools import inputs, shard, verify

REPO = Path(__file__).resolve().parents[2]


def jpeg(colour: str, size=(24, 16)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, "JPEG", quality=90)
    return out.getvalue()


COLOURS = ["red", "green", "blue"]
# The same three records in every format: one picture, two pictures, text only.
TURNS = [
    [("user", "<image>\nWhat colour?"), ("assistant", "Red.")],
    [("system", "Be brief."), ("user", "<image> then <image>: same?"), ("assistant", "No.")],
    [("user", "Say hi."), ("assistant", "Hi.")],
]
PICTURES = [["red.jpg"], ["green.jpg", "blue.jpg"], []]


def images_folder(root: Path) -> Path:
    folder = root / "images"
    folder.mkdir(parents=True, exist_ok=True)
    for colour in COLOURS:
        (folder / f"{colour}.jpg").write_bytes(jpeg(colour))
    return folder


def minimind_records() -> list[dict]:
    out = []
    for turns, names in zip(TURNS, PICTURES):
        record = {"conversations": [{"role": r, "content": c} for r, c in turns]}
        if names:
            record["image"] = ", ".join(names)
        out.append(record)
    return out


def llava_records() -> list[dict]:
    speaker = {"user": "human", "assistant": "gpt", "system": "system"}
    out = []
    for i, (turns, names) in enumerate(zip(TURNS, PICTURES)):
        record = {"id": f"r{i}", "conversations": [{"from": speaker[r], "value": c} for r, c in turns]}
        if names:
            record["image"] = names[0] if len(names) == 1 else names
        out.append(record)
    return out


def parquet_file(path: Path, conversations_as_json: bool = True, row_group_size: int = 2) -> Path:
    """MiniMind-V 3v's layout: `conversations` (JSON string) and `image_bytes`; its text-only row carries an
    8 x 8 black placeholder picture and no <image> tag."""
    convs = [[{"role": r, "content": c} for r, c in turns] for turns in TURNS]
    pictures = [[jpeg(n.removesuffix(".jpg")) for n in names] for names in PICTURES]
    pictures[2] = [jpeg("black", (8, 8))]
    table = pa.table({
        "conversations": [json.dumps(c, ensure_ascii=False) for c in convs] if conversations_as_json else convs,
        "image_bytes": pa.array(pictures, type=pa.list_(pa.binary())),
    })
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def run(*argv: str) -> int:
    return shard.main([*argv])


def samples(out: Path) -> dict[str, dict]:
    """{key: {"json": doc, suffix: bytes}} of every shard in `out`."""
    found: dict[str, dict] = {}
    for tar in sorted(out.glob("*.tar")):
        with tarfile.open(tar) as t:
            for member in t.getmembers():
                key, _, suffix = member.name.partition(".")
                data = t.extractfile(member).read()
                found.setdefault(key, {})[suffix] = json.loads(data) if suffix == "json" else data
    return found


def content(found: dict[str, dict]) -> list[tuple]:
    """What the trainer sees of each sample: its turns and its pictures' bytes, in key order."""
    return [(s["json"]["conversations"], [s[k] for k in sorted(s) if k != "json"]) for _, s in sorted(found.items())]


def test_every_format_gives_the_same_samples(tmp_path):
    images = images_folder(tmp_path)
    (tmp_path / "mm.jsonl").write_text("".join(json.dumps(r) + "\n" for r in minimind_records()))
    (tmp_path / "llava.json").write_text(json.dumps(llava_records(), indent=2))
    (tmp_path / "llava.jsonl").write_text("".join(json.dumps(r) + "\n" for r in llava_records()))
    parquet_file(tmp_path / "sft_i2t.parquet")
    parquet_file(tmp_path / "lists.parquet", conversations_as_json=False)
    made = {}
    for name in ("mm.jsonl", "llava.json", "llava.jsonl", "sft_i2t.parquet", "lists.parquet"):
        flags = [] if name.endswith(".parquet") else ["--images", str(images)]
        assert run("--input", str(tmp_path / name), "--out", str(tmp_path / f"out_{name}"), *flags) == 0
        out = tmp_path / f"out_{name}"
        assert verify.main([str(out)]) == 0
        made[name] = (content(samples(out)), json.loads((out / "manifest.json").read_text()))
    reference = made["mm.jsonl"][0]
    assert [turns for turns, _ in reference] == [[{"role": r, "content": c} for r, c in t] for t in TURNS]
    assert [len(pictures) for _, pictures in reference] == [1, 2, 0]
    for name, (found, manifest) in made.items():
        assert found == reference, name
        assert manifest["source"]["format"] == {"mm.jsonl": "jsonl", "llava.jsonl": "jsonl",
                                                "llava.json": "json"}.get(name, "parquet")
        assert manifest["total_samples"] == 3 and manifest["skipped"] == []
    assert made["sft_i2t.parquet"][1]["placeholder_images_dropped"] == 1  # the text-only row's black 8 x 8
    assert made["mm.jsonl"][1]["placeholder_images_dropped"] == 0


def test_a_pretty_printed_llava_array_given_as_jsonl_is_read_as_what_it_is(tmp_path, capsys):
    """Reported: 3 records as a pretty-printed JSON array through --jsonl gave '44 records in, 44 skipped
    (bad_json)' and exit 0."""
    images = images_folder(tmp_path)
    path = tmp_path / "llava_v1_5_mix.json"
    path.write_text(json.dumps(llava_records(), indent=2))
    assert run("--jsonl", str(path), "--images", str(images), "--out", str(tmp_path / "out")) == 0
    assert "3 records in (json), 3 samples written" in capsys.readouterr().out


@pytest.mark.parametrize("fmt, name, workers", [("json", "data.json", 1), ("parquet", "data.parquet", 1),
                                                ("json", "data.json", 3), ("parquet", "data.parquet", 3)])
def test_an_interrupted_run_of_a_json_array_or_parquet_resumes_to_the_same_bytes(tmp_path, fmt, name, workers):
    """Also with 3 workers, against one: JSON runs are found by parsing ahead and re-read by their worker,
    parquet rows (row groups of 5, runs of 2) are read once by the main process and sent with their run."""
    images = images_folder(tmp_path)
    if fmt == "json":
        (tmp_path / name).write_text(json.dumps(llava_records() * 4, indent=1, ensure_ascii=False))
    else:
        table = pq.read_table(parquet_file(tmp_path / "one.parquet"))
        pq.write_table(pa.concat_tables([table] * 4), tmp_path / name, row_group_size=5)
    argv = ["--input", str(tmp_path / name), "--images", str(images), "--samples-per-shard", "2"]
    assert run(*argv, "--out", str(tmp_path / "clean")) == 0
    argv += ["--workers", str(workers)]
    opts = shard.parse_args([*argv, "--out", str(tmp_path / "cut")])

    def stop(index: int) -> None:
        if index == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        shard.shard_corpus(opts, after_shard=stop)
    assert run(*argv, "--out", str(tmp_path / "cut")) == 0
    clean = {p.name: p.read_bytes() for p in (tmp_path / "clean").iterdir() if p.name != "manifest.json"}
    cut = {p.name: p.read_bytes() for p in (tmp_path / "cut").iterdir() if p.name != "manifest.json"}
    assert clean == cut and len(clean) == 12  # 12 samples in shards of 2: 6 shards + 6 indexes


def test_whole_file_mistakes_exit_non_zero_with_one_line(tmp_path, capsys):
    images = images_folder(tmp_path)
    records = minimind_records()
    (tmp_path / "missing").mkdir()
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    # Every picture missing: two records skipped, one text-only written: 2/3 skipped > 0.1 -> exit 1.
    assert run("--input", str(tmp_path / "data.jsonl"), "--images", str(tmp_path / "missing"),
               "--out", str(tmp_path / "o1")) == 1
    err = capsys.readouterr().err
    assert "2 of 3 records skipped" in err and "missing_image" in err and "--max-skip-fraction" in err
    assert json.loads((tmp_path / "o1" / "manifest.json").read_text())["skipped_by_reason"] == {"missing_image": 2}
    # The same with a share the user allows: exit 0.
    assert run("--input", str(tmp_path / "data.jsonl"), "--images", str(tmp_path / "missing"),
               "--out", str(tmp_path / "o2"), "--max-skip-fraction", "0.7") == 0
    # Nothing usable at all: exit 1 whatever the share.
    (tmp_path / "pictures_only.jsonl").write_text(json.dumps(records[0]) + "\n")
    assert run("--input", str(tmp_path / "pictures_only.jsonl"), "--images", str(tmp_path / "missing"),
               "--out", str(tmp_path / "o3"), "--max-skip-fraction", "1") == 1
    assert "no sample was written" in capsys.readouterr().err
    (tmp_path / "empty.jsonl").write_text("")
    assert run("--input", str(tmp_path / "empty.jsonl"), "--images", str(images), "--out", str(tmp_path / "o4")) == 1
    assert "0 record(s) in the input" in capsys.readouterr().err
    # Not a corpus file at all, or one JSON object spread over lines: exit 2 before anything is written.
    (tmp_path / "pretty.jsonl").write_text(json.dumps(records[0], indent=2))
    (tmp_path / "images.zip").write_bytes(b"PK\x03\x04" + b"\0" * 40)
    (tmp_path / "broken.json").write_text(json.dumps(llava_records(), indent=1)[:-40])
    for name, message in (("pretty.jsonl", "spread over lines"), ("images.zip", "unpack it first"),
                          ("broken.json", "breaks off after element 2")):
        assert run("--input", str(tmp_path / name), "--images", str(images), "--out",
                   str(tmp_path / f"out_{name}")) == 2, name
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, err
    # A JSONL corpus without its picture folder.
    assert run("--input", str(tmp_path / "data.jsonl"), "--out", str(tmp_path / "o5")) == 2
    assert "--images" in capsys.readouterr().err


def test_a_parquet_file_without_conversations_is_named_with_its_columns(tmp_path, capsys):
    pq.write_table(pa.table({"text": ["a"], "image": [b"x"]}), tmp_path / "other.parquet")
    assert run("--input", str(tmp_path / "other.parquet"), "--out", str(tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert "no 'conversations' column" in err and "text, image" in err


def test_corpora_with_the_same_file_name_get_different_keys_and_the_trainer_refuses_shared_ones(tmp_path):
    """Reported: v1/sft_data.jsonl and v2/sft_data.jsonl both gave keys sft_data_000000001..., which the sample
    audit cannot tell apart when trained together."""
    from vlm.data.sources import SourceError, resolve_sources

    images = images_folder(tmp_path)
    outs = []
    for version, records in (("v1", minimind_records()), ("v2", minimind_records()[::-1])):
        (tmp_path / version).mkdir()
        path = tmp_path / version / "sft_data.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        outs.append(tmp_path / f"out_{version}")
        assert run("--input", str(path), "--images", str(images), "--out", str(outs[-1])) == 0
    keys = [set(samples(out)) for out in outs]
    assert not keys[0] & keys[1]
    assert all(key.startswith("sft_data-") for key in keys[0] | keys[1])
    assert len(resolve_sources([str(o) for o in outs]).sources) == 2
    same = []
    for version in ("v1", "v2"):
        same.append(tmp_path / f"same_{version}")
        assert run("--input", str(tmp_path / version / "sft_data.jsonl"), "--images", str(images),
                   "--out", str(same[-1]), "--prefix", "sft") == 0
    with pytest.raises(SourceError, match="same key prefix 'sft'"):
        resolve_sources([str(s) for s in same])
    with pytest.raises(SourceError, match="twice"):
        resolve_sources([str(outs[0]), str(outs[0])])


def test_detection_reads_only_the_start_of_the_file(tmp_path):
    (tmp_path / "a.jsonl").write_text('\n\n{"conversations": []}\n')
    (tmp_path / "b.json").write_text('\ufeff  [\n {"id": 1}]')
    assert inputs.detect_format(str(tmp_path / "a.jsonl")) == "jsonl"
    assert inputs.detect_format(str(tmp_path / "b.json")) == "json"
    assert inputs.detect_format(str(parquet_file(tmp_path / "c.parquet"))) == "parquet"
    (tmp_path / "d.txt").write_text("hello")
    with pytest.raises(inputs.InputError, match="not JSONL, a JSON array or parquet"):
        inputs.detect_format(str(tmp_path / "d.txt"))


def test_make_shard_data_takes_minimind_v_file_names_as_published(tmp_path):
    """`make shard-data` finds 623a130's pretrain_vlm_data.jsonl (+ pretrain_images/) and 3v's sft_i2t.parquet
    in DATASET without renaming."""
    dataset = tmp_path / "dataset"
    images = images_folder(dataset)
    images.rename(dataset / "pretrain_images")
    (dataset / "pretrain_vlm_data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in minimind_records()))
    parquet_file(dataset / "sft_i2t.parquet")
    result = subprocess.run(["make", "--no-print-directory", "shard-data", f"DATASET={dataset}",
                             f"SHARDS={tmp_path / 'shards'}", f"PY={sys.executable}"],
                            cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "MAKEFLAGS": ""})
    assert result.returncode == 0, result.stdout + result.stderr
    for stage, fmt in (("pretrain", "jsonl"), ("sft", "parquet")):
        manifest = json.loads((tmp_path / "shards" / stage / "manifest.json").read_text())
        assert (manifest["source"]["format"], manifest["total_samples"]) == (fmt, 3)


def test_parquet_and_llava_shards_train_together_through_the_real_trainer(tmp_path, launch_env):
    """Each sample of both corpora is trained once in the epoch (the sample audit names every key once)."""
    from vlm.train.cli import main

    images = images_folder(tmp_path)
    (tmp_path / "llava.json").write_text(json.dumps(llava_records() * 4))
    table = pq.read_table(parquet_file(tmp_path / "one.parquet"))
    pq.write_table(pa.concat_tables([table] * 4), tmp_path / "sft_i2t.parquet")
    assert run("--input", str(tmp_path / "llava.json"), "--images", str(images), "--out", str(tmp_path / "a")) == 0
    assert run("--input", str(tmp_path / "sft_i2t.parquet"), "--out", str(tmp_path / "b")) == 0
    out = tmp_path / "run"
    assert main(["--config", str(REPO / "launch/configs/debug.yaml"), "--train_shards",
                 f"{tmp_path / 'a'},{tmp_path / 'b'}", "--out_dir", str(out), "--max_steps", "6",
                 "--batch_size", "4", "--log_interval", "1", "--train.warmup_steps", "0", "--log_samples"]) == 0
    trained: dict[str, int] = {}
    for path in (out / "samples").glob("rank*.jsonl"):
        for line in path.read_text().splitlines():
            for key in json.loads(line)["keys"]:
                trained[key] = trained.get(key, 0) + 1
    assert sorted(trained) == sorted(set(samples(tmp_path / "a")) | set(samples(tmp_path / "b")))
    assert set(trained.values()) == {1} and len(trained) == 24
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) == 6 and all(loss == loss for loss in losses)


def test_a_json_array_reads_the_same_whatever_its_chunk_boundaries(tmp_path, monkeypatch):
    """Numbers, escapes and multi-byte characters cut by a read's end ("0." + "5") are read whole."""
    elements = [{"a": 1}, 0.5, -1e+20, "é漢😀 \\u00e9", {"k": [123456789, 1.25, None, True]}, "x\"y", 7]
    path = tmp_path / "a.json"
    path.write_text("\ufeff [ " + " ,\n".join(json.dumps(e, ensure_ascii=False) for e in elements) + " ]\n",
                    encoding="utf-8")
    for chunk in range(1, 48):
        monkeypatch.setattr(inputs, "_CHUNK", chunk)
        got = list(inputs.read_records(str(path), "json"))
        assert [e for _, _, e in got] == elements, chunk
        for number, position, _ in got:  # a resume from any saved position reads exactly the rest
            assert [e for _, _, e in inputs.read_records(str(path), "json", number, position)] == elements[number:]


def test_a_json_array_broken_early_fails_without_reading_the_rest(tmp_path):
    import tracemalloc

    path = tmp_path / "broken.json"
    path.write_text('[{"a": 1}, {"b" 2}, ' + ", ".join(['{"pad": "' + "x" * 1000 + '"}'] * 20000) + "]")
    tracemalloc.start()
    with pytest.raises(inputs.InputError, match="breaks off after element 1"):
        list(inputs.read_records(str(path), "json"))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 8 << 20  # a 20 MB file: one 1 MiB chunk or two, never the whole file
