"""vlm.eval: scoring against references and ground truth, the teacher-forced loss, record reading, the answers
file and the summary, every checkpoint kind."""

from __future__ import annotations

import json
import math

import pytest
import torch

from data_tools.synth import build_record
from data_tools.synth_text import QUESTION_TYPES
from tests.tiny_vlm import DIM, LAYERS, save_tiny_vlm
from vlm import eval as vlm_eval
from vlm.data.collate import pad_collate
from vlm.demo.scoring import scored_report
from vlm.eval import EvalRecord, records_from_jsonl, records_from_shards
from vlm.formats.scoring import answer_split, normalize_answer, score_pair, token_f1
from vlm.inference import load_model
from vlm.load import CheckpointKindError, checkpoint_kind


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_vision_dir):
    return save_tiny_vlm(tiny_vision_dir, tmp_path_factory.mktemp("tiny_vlm"))


@pytest.fixture(scope="module")
def vlm(tiny):
    return load_model(tiny[0])


def _record(index: int) -> EvalRecord:
    record, _ = build_record("eval", index, seed=0)
    return EvalRecord(f"r{index}", record["conversations"], [], [record["image"]], record["truth"])


def test_scoring_a_hand_made_record_counts_colour_and_kind_by_split():
    single, multi = _record(0), _record(1)
    assert single.truth["count"] == 1 and multi.truth["count"] > 1
    shape = single.truth["shapes"][0]
    other = "blue" if shape["colour"] != "blue" else "red"
    wrong_colour = single.truth["answer"].replace(f" {shape['colour']} ", f" {other} ")
    report = scored_report([single, single, multi], [single.truth["answer"], wrong_colour, "No idea."])

    assert report["accuracy"] == pytest.approx(0.5)
    assert report["multi_shape_accuracy"] == 0.0
    single_scores = report["scores"]["single"]
    assert single_scores["n"] == 2 and single_scores["kind"] == 1.0 and single_scores["colour"] == 0.5
    assert single_scores["exact"] == 0.5 and single_scores["position"] == 1.0
    assert [row["right"] for row in report["answers"]] == [True, False, False]
    assert report["answers"][1]["scores"]["kind"] and not report["answers"][1]["scores"]["colour"]
    assert report["scores"]["all"]["n"] == 3


def test_teacher_forced_loss_is_the_token_weighted_mean_over_replies(vlm, synth_shards):
    records, _ = records_from_shards(synth_shards["sft"])
    records = records[:6]  # multi-turn, one or two pictures, or none
    got = vlm_eval.teacher_forced_loss(vlm, records, batch_size=4, progress=False)

    total, tokens = 0.0, 0
    for record in records:  # one record at a time, no padding
        sample = vlm.encoder.encode(record.conversations, len(record.images))
        sample["pixel_values"] = torch.stack([vlm.preprocess.pixels(x) for x in record.images] or
                                             [torch.zeros((3, 32, 32), dtype=torch.uint8)])[: len(record.images)]
        batch = pad_collate([sample], vlm.model.config.pad_token_id, multiple_of=1)
        pixels = torch.stack([vlm.preprocess(x) for x in record.images])[None] if record.images else None
        with torch.no_grad():
            loss = vlm.model(input_ids=batch["input_ids"], labels=batch["labels"], pixel_values=pixels).loss
        n = int((batch["labels"][:, 1:] != -100).sum())
        total, tokens = total + float(loss) * n, tokens + n
    assert got["label_tokens"] == tokens
    assert got["loss"] == pytest.approx(total / tokens, rel=1e-4)
    assert got["perplexity"] == pytest.approx(math.exp(total / tokens), rel=1e-4)
    assert math.log(len(vlm.tokenizer)) - 1.5 < got["loss"] < math.log(len(vlm.tokenizer)) + 1.5  # random init


def test_jsonl_and_shards_give_the_same_records_with_truth(synth_shards):
    dataset = synth_shards["dataset"]
    from_jsonl, skipped = records_from_jsonl(dataset / "eval_data.jsonl", dataset / "eval_images")
    from_shards, _ = records_from_shards(synth_shards["eval"])
    assert not skipped and len(from_jsonl) == len(from_shards) == 24
    for a, b in zip(from_jsonl, from_shards):
        assert a.truth == b.truth and a.truth is not None
        assert a.conversations == b.conversations and a.names == b.names and a.images == b.images


def test_batched_greedy_answers_equal_one_at_a_time(vlm, synth_shards):
    records, _ = records_from_shards(synth_shards["eval"])
    records = records[:5]
    batched = vlm_eval.greedy_answers(vlm, records, batch_size=4, max_new_tokens=6, progress=False)
    from vlm.inference import GenerationSettings

    alone = [vlm.generate(vlm_eval.answer_prompt(r), r.images, GenerationSettings(max_new_tokens=6)) for r in records]
    assert batched == alone
    assert vlm_eval.answer_prompt(records[0]) == records[0].conversations[:1]


def test_generic_scores_on_hand_made_pairs():
    assert normalize_answer("  The Cat, sat on  a mat! ") == "cat sat on mat"
    assert normalize_answer("一个图形：红色。") == "一个图形红色"  # Unicode punctuation goes too
    assert score_pair("A red circle.", "A red circle.") == {"exact_match": True, "normalized_match": True,
                                                            "token_f1": 1.0}
    assert score_pair(" a red circle ", "The red circle!") == {"exact_match": False, "normalized_match": True,
                                                               "token_f1": 1.0}
    # "red circle big" vs "red circle": 2 shared tokens, precision 2/3, recall 2/2 -> F1 = 2 * (2/3) / (5/3) = 0.8
    s = score_pair("a red circle, big", "the red circle")
    assert not s["exact_match"] and not s["normalized_match"] and s["token_f1"] == pytest.approx(0.8)
    # multiset overlap: "red red blue" vs "red blue blue": 2 shared, P = R = 2/3
    assert token_f1("red red blue", "red blue blue") == pytest.approx(2 / 3)
    assert token_f1("green", "red") == 0.0 and token_f1("", "") == 1.0 and token_f1("the", "red") == 0.0
    # Chinese: one token per character; 左上角红色圆形 vs 左上角蓝色圆形: 6 of 7 shared -> F1 6/7
    assert token_f1("左上角红色圆形", "左上角蓝色圆形") == pytest.approx(6 / 7)


def test_the_reference_is_the_last_assistant_turn_given_the_true_earlier_turns():
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "<image>\nWhat is it?"},
             {"role": "assistant", "content": "A circle."}, {"role": "user", "content": "Its colour?"},
             {"role": "assistant", "content": "Red."}]
    prompt, reference = answer_split(turns)
    assert prompt == turns[:4] and reference == "Red."
    assert answer_split(turns[:2]) == (turns[:2], None)


def test_evaluate_scores_every_record_against_its_last_reply_and_truth_records_also_by_shape(vlm, synth_shards):
    records, _ = records_from_shards(synth_shards["eval"])
    records = records[:4]
    plain = EvalRecord("plain", [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi there."}],
                       [], [])
    no_reply = EvalRecord("no_reply", [{"role": "user", "content": "Say hi."}], [], [])
    right = [r.conversations[-1]["content"] for r in records]
    report = vlm_eval.evaluate(vlm, [*records, plain, no_reply], batch_size=4, progress=False,
                               answer_fn=lambda rs: [*right, "hi THERE"][: len(rs)])
    assert report["answered"] == 5 and report["answer_skipped"] == {"no_reply": 1}
    assert report["exact_match"] == pytest.approx(4 / 5) and report["normalized_match"] == 1.0
    assert report["accuracy"] == 1.0 and report["multi_shape_accuracy"] == 1.0  # records 0 (one shape), 1 (more)
    assert report["scores"]["all"]["n"] == 4 and report["scores"]["all"]["exact"] == 1.0
    rows = {row["key"]: row for row in report["answers"]}
    assert rows["plain"] == {"key": "plain", "images": [], "prompt": "Say hi.", "reference": "Hi there.",
                             "answer": "hi THERE", "exact_match": False, "normalized_match": True, "token_f1": 1.0}
    first = rows[records[0].key]
    assert first["right"] and first["truth"] == records[0].truth["answer"] and first["scores"]["exact"]


def test_cli_writes_every_answer_to_jsonl_and_prints_only_a_summary(tiny, synth_shards, tmp_path, capsys):
    dataset = synth_shards["dataset"]
    out = tmp_path / "report.json"
    code = vlm_eval.main(["--checkpoint", str(tiny[0]), "--data", str(dataset / "eval_data.jsonl"), "--images",
                          str(dataset / "eval_images"), "--out", str(out), "--limit", "12", "--max_new_tokens", "4"])
    assert code == 0
    report = json.loads(out.read_text())
    answers_file = tmp_path / "report.answers.jsonl"  # the default: beside --out
    assert report["answers_file"] == str(answers_file) and "answers" not in report
    assert report["records"] == 12 and report["answered"] == 12 and report["scores"]["all"]["n"] == 12
    assert {"loss", "perplexity", "accuracy", "multi_shape_accuracy", "exact_match", "normalized_match",
            "token_f1"} <= report.keys()
    rows = [json.loads(line) for line in answers_file.read_text().splitlines()]
    assert len(rows) == 12 and all(r["reference"] and "answer" in r and "token_f1" in r and r["truth"] for r in rows)
    printed = capsys.readouterr().out
    assert len(printed.splitlines()) < 20  # a summary, not 12 answers
    assert str(answers_file) in printed and "token F1" in printed and f"{report['loss']:.4f}" in printed


def test_cli_on_shards_answers_next_to_the_checkpoint_or_where_asked(tiny, synth_shards, tmp_path, capsys):
    asked = tmp_path / "sub" / "answers.jsonl"
    assert vlm_eval.main(["--checkpoint", str(tiny[0]), "--shards", str(synth_shards["eval"]), "--limit", "2",
                          "--max_new_tokens", "2", "--answers", str(asked)]) == 0
    assert len(asked.read_text().splitlines()) == 2 and str(asked) in capsys.readouterr().out
    assert vlm_eval.default_answers_path(str(tiny[0]), None) == tiny[0] / vlm_eval.ANSWERS_FILE
    assert vlm_eval.default_answers_path(str(tiny[1]), None) == tiny[1].with_name(f"{tiny[1].stem}.eval_answers.jsonl")
    with pytest.raises(SystemExit):
        vlm_eval.main(["--checkpoint", str(tiny[0]), "--data", "x.jsonl"])
    assert "--images" in capsys.readouterr().err


def test_a_minimind_pth_loads_with_flags_and_gives_the_same_logits(tiny, tiny_vision_dir, vlm):
    folder, pth = tiny
    assert checkpoint_kind(folder) == "hf" and checkpoint_kind(pth) == "minimind"
    with pytest.raises(CheckpointKindError, match="--vision_model"):
        load_model(pth)
    from_pth = load_model(pth, vision_model=str(tiny_vision_dir), dim=DIM, n_layers=LAYERS)
    ids = vlm.prompt_ids([{"role": "user", "content": "<image>\nDescribe the shapes."}], 1)[None]
    pixels = torch.randn(1, 1, 3, 32, 32)
    with torch.no_grad():
        a = vlm.model(input_ids=ids, pixel_values=pixels).logits
        b = from_pth.model(input_ids=ids, pixel_values=pixels).logits
    torch.testing.assert_close(a, b, atol=2e-2, rtol=0)  # the .pth holds fp16 weights


def test_an_unknown_checkpoint_is_refused_with_the_kinds_named(tmp_path, capsys):
    with pytest.raises(CheckpointKindError, match="exported folder"):
        checkpoint_kind(tmp_path)
    assert vlm_eval.main(["--checkpoint", str(tmp_path), "--shards", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "exported folder" in err and "--debug" in err and "Traceback" not in err
    with pytest.raises(CheckpointKindError):  # --debug: the error itself, with its traceback
        vlm_eval.main(["--checkpoint", str(tmp_path), "--shards", str(tmp_path), "--debug"])
    assert not list(tmp_path.iterdir())  # nothing written for a run that could not start


def _question(index: int) -> EvalRecord:
    record, pictures = build_record("eval_sft", index, seed=0)
    return EvalRecord(f"q{index}", record["conversations"], [], [name for name, _ in pictures], record["truth"])


def test_question_records_are_scored_by_type_and_caption_records_as_before():
    captions = [_record(0), _record(1)]
    questions = [_question(i) for i in range(2 * 17)]  # every type twice
    answers = [r.truth["answer"] for r in captions]
    # the first of each type right word for word, the second garbled
    answers += [r.truth["answer"] if i < 17 else "I cannot tell." for i, r in enumerate(questions)]
    rows, part = vlm_eval.answer_rows([*captions, *questions], answers)

    assert part["accuracy"] == 1.0 and part["scores"]["all"]["n"] == 2  # the caption records only
    assert part["scores"] == scored_report(captions, answers[:2])["scores"]
    asked = part["sft_scores"]
    assert len(asked["by_type"]) == 17 and all(t == {"n": 2, "exact": 0.5, "attribute": 0.5}
                                               for t in asked["by_type"].values())
    assert {g: v["n"] for g, v in asked["by_group"].items()} == {"single": 14, "pair": 8, "text": 12}
    assert asked["overall"] == {"n": 34, "exact": 0.5, "attribute": 0.5}
    row = rows[2]
    assert row["type"] == "single/describe" and row["turn"] == questions[0].truth["turn"] and row["right"]
    assert row["truth"] == row["reference"] == questions[0].truth["answer"] and "shapes" not in row
    assert "type" not in rows[0] and rows[0]["right"]

    report = {"model": "m", "records": 36, "loss": 1.0, "perplexity": math.e, "label_tokens": 10,
              **part}
    lines = vlm_eval.summary_lines(report, vlm_eval.default_answers_path("ckpt", None), None)
    table = lines[lines.index(next(line for line in lines if "SFT questions (34 records" in line)) + 1:]
    assert table[0].split() == ["question", "type", "n", "attribute", "exact"]
    assert table[1].split() == ["single/describe", "2", "0.500", "0.500"]
    assert any(line.split()[:2] == ["text", "(all)"] for line in table)


def test_cli_on_the_eval_sft_split_reports_sft_scores(tiny, tmp_path, capsys):
    from data_tools.synth import write_corpus

    write_corpus(tmp_path / "d", pretrain=0, sft=0, eval=0, eval_sft=17, progress=False, workers=1)
    out = tmp_path / "eval_sft.json"
    assert vlm_eval.main(["--checkpoint", str(tiny[0]), "--data", str(tmp_path / "d" / "eval_sft_data.jsonl"),
                          "--images", str(tmp_path / "d" / "eval_sft_images"), "--out", str(out),
                          "--max_new_tokens", "3"]) == 0
    report = json.loads(out.read_text())
    assert report["answered"] == 17 and report["scores"]["all"]["n"] == 0 and report["accuracy"] is None
    assert list(report["sft_scores"]["by_type"]) == list(QUESTION_TYPES)
    assert report["sft_scores"]["overall"]["n"] == 17
    printed = capsys.readouterr().out
    assert "SFT questions (17 records" in printed and "text/opposite" in printed
