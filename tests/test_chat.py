"""vlm.chat: streamed answers with 0, 1 and 2 pictures, placeholder handling, the interactive session."""

from __future__ import annotations

import pytest

from tests.tiny_vlm import count_runs, picture, save_tiny_vlm
from vlm import chat
from vlm.inference import GenerationSettings, add_image_tags, load_model

RED, BLUE = (220, 38, 38), (37, 84, 220)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_vision_dir):
    return save_tiny_vlm(tiny_vision_dir, tmp_path_factory.mktemp("tiny_vlm"))


@pytest.fixture(scope="module")
def vlm(tiny):
    return load_model(tiny[0])


@pytest.fixture
def prompts(vlm, monkeypatch):
    """Records the input_ids of every generate call on the tiny model."""
    seen = []
    original = vlm.generate_ids

    def spy(input_ids, *args, **kwargs):
        seen.append(input_ids[0])
        return original(input_ids, *args, **kwargs)

    monkeypatch.setattr(vlm, "generate_ids", spy)
    return seen


@pytest.mark.parametrize("n_images", [0, 1, 2])
def test_answers_stream_with_0_1_and_2_pictures(vlm, prompts, n_images):
    images = [picture(RED), picture(BLUE)][:n_images]
    conversation = chat.Conversation(vlm, images, GenerationSettings(max_new_tokens=6))
    pieces = []
    reply = conversation.ask("Describe the shapes.", pieces.append)

    assert pieces, "the streaming callback received no text"
    assert "".join(pieces) == reply
    image_id = vlm.model.config.image_token_id
    assert count_runs(prompts[0], image_id) == n_images
    assert int((prompts[0] == image_id).sum()) == n_images * vlm.image_token_len
    assert conversation.messages[-1] == {"role": "assistant", "content": reply}


def test_a_prompt_with_its_own_placeholders_keeps_them_and_counts_must_match(vlm, prompts):
    conversation = chat.Conversation(vlm, [picture(RED), picture(BLUE)], GenerationSettings(max_new_tokens=2))
    conversation.ask("Left: <image> right: <image> Which is red?")
    assert conversation.messages[0]["content"] == "Left: <image> right: <image> Which is red?"
    assert count_runs(prompts[0], vlm.model.config.image_token_id) == 2
    assert add_image_tags("Hi", 2) == "<image>\n<image>\nHi"
    with pytest.raises(ValueError, match="1 <image> placeholder"):
        add_image_tags("<image> and?", 2)


def test_pictures_belong_to_the_first_turn_of_a_session(vlm, prompts):
    conversation = chat.Conversation(vlm, [picture(RED)], GenerationSettings(max_new_tokens=3))
    first = conversation.ask("Describe the shapes.")
    conversation.ask("And its colour?")
    image_id = vlm.model.config.image_token_id
    assert count_runs(prompts[1], image_id) == 1  # still the one picture, in turn one
    assert len(prompts[1]) > len(prompts[0])
    assert [m["role"] for m in conversation.messages] == ["user", "assistant", "user", "assistant"]
    assert conversation.messages[1]["content"] == first
    conversation.reset()
    conversation.ask("Again?")
    assert count_runs(prompts[2], image_id) == 1 and len(prompts[2]) < len(prompts[1])  # history gone


def test_cli_one_shot_streams_to_stdout(tiny, tmp_path, capsys):
    files = []
    for i, colour in enumerate((RED, BLUE)):
        files += ["--image", str(tmp_path / f"{i}.png")]
        (tmp_path / f"{i}.png").write_bytes(picture(colour))
    code = chat.main(["--checkpoint", str(tiny[0]), *files, "--prompt", "Compare them.", "--max_new_tokens", "5",
                      "--temperature", "0.8", "--top_p", "0.9", "--repetition_penalty", "1.2"])
    assert code == 0
    assert capsys.readouterr().out.strip()


def test_cli_interactive_session_until_quit(tiny, tmp_path, capsys):
    (tmp_path / "a.png").write_bytes(picture(RED))
    lines = iter(["Describe the shapes.", "", "And now?", "/quit", "never read"])
    code = chat.main(["--checkpoint", str(tiny[0]), "--image", str(tmp_path / "a.png"), "--max_new_tokens", "3"],
                     read=lambda prompt: next(lines))
    assert code == 0
    out = capsys.readouterr().out
    assert out.count("vlm> ") == 2 and "1 picture(s) attached" in out
    assert next(lines) == "never read"


def test_cli_errors_name_the_problem(tiny, tmp_path, capsys):
    (tmp_path / "a.png").write_bytes(picture(RED))
    (tmp_path / "bad.png").write_bytes(b"not a picture")
    assert chat.main(["--checkpoint", str(tiny[0]), "--image", str(tmp_path / "a.png"),
                      "--prompt", "<image> vs <image>"]) == 2
    assert "2 <image> placeholder(s) but 1 --image" in capsys.readouterr().err
    assert chat.main(["--checkpoint", str(tiny[0]), "--image", str(tmp_path / "bad.png"), "--prompt", "x"]) == 2
    assert "bad.png cannot be used" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        chat.main(["--checkpoint", str(tiny[0]), "--temperature", "-1"])


def test_a_model_with_a_siglip_tower_answers_about_a_picture(tmp_path, tiny_siglip_dir):
    """SigLIP (no CLS: all 16 output tokens are image tokens; its own resize and normalisation) end to end:
    export, load, chat."""
    loaded = load_model(save_tiny_vlm(tiny_siglip_dir, tmp_path)[0])
    assert type(loaded.model.get_vision_encoder()).__name__ == "SiglipVisionModel"
    assert loaded.image_token_len == 16 and loaded.preprocess.config.output_shape == (3, 32, 32)
    assert loaded.preprocess.config.mean == (0.5, 0.5, 0.5)
    conversation = chat.Conversation(loaded, [picture(RED)], GenerationSettings(max_new_tokens=4))
    pieces = []
    reply = conversation.ask("What colour?", pieces.append)
    assert pieces and "".join(pieces) == reply


def test_a_pth_needs_only_its_training_yaml(tmp_path, tiny_siglip_dir):
    """`--config` describes a .pth (sizes, q/k norm, tower, projector, tokenizer): no size flags, same model."""
    import argparse

    import torch
    import yaml

    from vlm.build import build
    from vlm.config import load_config
    from vlm.inference import add_model_flags, load_from_args
    from vlm.model.weights import save_minimind_weights

    model_section = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                     "head_dim": 24, "intermediate_size": 256, "rms_norm_eps": 1.0e-6, "qk_norm": True,
                     "projector": "mlp", "vision_model": str(tiny_siglip_dir)}
    config = tmp_path / "mine.yaml"
    config.write_text(yaml.safe_dump({"model": model_section, "data": {"train_shards": ["unused"]}}))
    torch.manual_seed(0)
    built = build(load_config(config))
    pth = save_minimind_weights(built.model, tmp_path / "mine.pth", dtype=torch.float32)
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint")
    add_model_flags(parser)
    loaded = load_from_args(parser.parse_args(["--checkpoint", str(pth), "--config", str(config)]))
    assert loaded.model.config.qk_norm and loaded.model.config.head_dim == 24
    scaled = load_from_args(parser.parse_args(["--checkpoint", str(pth), "--config", str(config),
                                               "--rope_yarn_factor", "16"]))
    assert scaled.model.model.rotary.yarn == (16.0, 2048)  # tables reach 32768 > 2048: scaled
    assert not torch.allclose(scaled.model.model.rotary.cos, loaded.model.model.rotary.cos)
    ids = torch.randint(10, 200, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(input_ids=ids).logits, built.model.eval()(input_ids=ids).logits)
    with pytest.raises(Exception, match="give --config"):
        load_model(pth)
