"""SigLIP (and SigLIP2 fixed-resolution) preprocessor configs: read from HF's own files, output as HF's."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessorPil, SiglipImageProcessorPil

from vlm.data.image import ImageConfigError, ImagePreprocessConfig, ImagePreprocessor, PixelNormalizer

TOLERANCE = 0.02
MODES = ["RGB", "L", "RGBA", "P", "LA", "P+transparency"]


def picture(seed: int, width: int, height: int, mode: str) -> Image.Image:
    """Gradients plus noise in `mode`; the alpha band is random, so ignoring it would show."""
    state = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack(
        [xx * 255 / width, yy * 255 / height, (xx * 3 + yy) % 64 * 4, state.rand(height, width) * 255], -1
    )
    pixels = np.clip(base + state.randint(-30, 30, base.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGBA")
    if mode == "P+transparency":
        image = image.convert("RGB").quantize(16)
        image.info["transparency"] = 2
        return image
    return image.convert(mode)


def save_siglip(folder, **kwargs) -> SiglipImageProcessorPil:
    """Save SiglipImageProcessor's PIL flavour (the same file as SiglipImageProcessor, no torchvision)."""
    SiglipImageProcessorPil(**kwargs).save_pretrained(folder)
    return SiglipImageProcessorPil.from_pretrained(folder)


# Smaller and larger than the targets, square and not, tall and wide, tiny and extreme.
SIZES = [(1, 1), (7, 5), (31, 90), (160, 224), (224, 160), (256, 256), (300, 120), (640, 480), (90, 1000)]
TARGETS = {"256x256-bilinear": ((256, 256), 2), "224x160-bicubic": ((224, 160), 3)}


@pytest.mark.parametrize("name", list(TARGETS))
def test_matches_siglip_image_processor(tmp_path, name):
    (height, width), resample = TARGETS[name]
    reference = save_siglip(tmp_path, size={"height": height, "width": width}, resample=resample)
    cfg = ImagePreprocessConfig.from_folder(tmp_path)
    assert (cfg.size, cfg.do_center_crop, cfg.resample) == ((height, width), False, resample)
    assert cfg.mean == cfg.std == (0.5, 0.5, 0.5) and cfg.output_shape == (3, height, width)
    ours = ImagePreprocessor(cfg)
    worst = {}
    for k, (w, h) in enumerate(SIZES):
        for mode in MODES:
            image = picture(k, w, h, mode)
            expected = reference(image, return_tensors="pt")["pixel_values"][0]
            got = ours(image)
            assert got.dtype == torch.float32 and got.shape == expected.shape == (3, height, width)
            diff = (got - expected).abs().max().item()
            assert diff <= TOLERANCE, f"{w}x{h} {mode}: max abs diff {diff}"
            worst[mode] = max(worst.get(mode, 0.0), diff)
            assert torch.equal(PixelNormalizer(cfg)(ours.pixels(image)), got)  # the loader's uint8 path
    print(f"{name}: max abs diff per mode {worst}")


def test_a_crop_or_kept_aspect_ratio_would_be_caught(tmp_path):
    """The comparison above has teeth: CLIP's resize-and-crop at the same size differs from SigLIP's."""
    reference = save_siglip(tmp_path, size={"height": 256, "width": 256})
    cfg = ImagePreprocessConfig.from_folder(tmp_path)
    clip_like = ImagePreprocessConfig(
        shortest_edge=256, crop=(256, 256), mean=cfg.mean, std=cfg.std, resample=cfg.resample
    )
    image = picture(5, 300, 120, "RGB")
    expected = reference(image, return_tensors="pt")["pixel_values"][0]
    assert (ImagePreprocessor(clip_like)(image) - expected).abs().max().item() > 10 * TOLERANCE
    rgba = picture(6, 50, 40, "RGBA")
    dropped_alpha = ImagePreprocessor(cfg)(rgba.convert("RGB"))  # alpha discarded instead of composited
    expected = reference(rgba, return_tensors="pt")["pixel_values"][0]
    assert (dropped_alpha - expected).abs().max().item() > 10 * TOLERANCE


def test_absent_keys_take_siglip_defaults_like_hf(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({"image_processor_type": "SiglipImageProcessor"})
    )
    cfg = ImagePreprocessConfig.from_folder(tmp_path)
    assert cfg.size == (224, 224) and cfg.resample == 3 and not cfg.do_center_crop
    assert cfg.mean == cfg.std == (0.5, 0.5, 0.5)
    reference = SiglipImageProcessorPil.from_pretrained(tmp_path)
    for mode in ("RGB", "RGBA"):
        image = picture(8, 123, 77, mode)
        expected = reference(image, return_tensors="pt")["pixel_values"][0]
        assert (ImagePreprocessor(cfg)(image) - expected).abs().max().item() <= TOLERANCE


def test_siglip_with_a_centre_crop_matches_hf(tmp_path):
    reference = save_siglip(tmp_path, size={"height": 64, "width": 48}, do_center_crop=True, crop_size=40)
    cfg = ImagePreprocessConfig.from_folder(tmp_path)
    assert (cfg.size, cfg.crop, cfg.do_center_crop, cfg.output_shape) == (
        (64, 48),
        (40, 40),
        True,
        (3, 40, 40),
    )
    image = picture(9, 90, 31, "RGB")
    expected = reference(image, return_tensors="pt")["pixel_values"][0]
    assert (ImagePreprocessor(cfg)(image) - expected).abs().max().item() <= TOLERANCE


def test_clip_configs_read_as_before(tmp_path):
    CLIPImageProcessorPil().save_pretrained(tmp_path)
    assert ImagePreprocessConfig.from_folder(tmp_path) == ImagePreprocessConfig()  # size None: shortest edge


@pytest.mark.parametrize(
    ("content", "key"),
    [
        ({"size": {"longest_edge": 512}}, "size"),
        ({"size": {"height": 256, "width": 256}}, "size"),  # the SigLIP layout needs its processor type
        ({"image_processor_type": "SiglipImageProcessor", "size": {"shortest_edge": 256}}, "size"),
        ({"image_processor_type": "SiglipImageProcessor", "size": {"height": 256, "width": "256"}}, "size"),
        ({"image_processor_type": "SiglipImageProcessor", "do_center_crop": True}, "crop_size"),
        ({"image_processor_type": "Siglip2ImageProcessor", "max_num_patches": 256}, "image_processor_type"),
    ],
)
def test_unknown_layouts_name_the_file_and_key(tmp_path, content, key):
    file = tmp_path / "preprocessor_config.json"
    file.write_text(json.dumps(content))
    with pytest.raises(ImageConfigError, match=f"'{key}'") as caught:
        ImagePreprocessConfig.from_folder(tmp_path)
    message = str(caught.value)
    assert str(file) in message and "\n" not in message


def test_vit_image_processor_configs_read_the_same_way_with_its_own_default(tmp_path):
    """ViTImageProcessor: the exact resize of SigLIP's layout; bilinear when the file does not say."""
    from transformers import ViTImageProcessorPil

    ViTImageProcessorPil(size={"height": 48, "width": 40}).save_pretrained(tmp_path)
    reference = ViTImageProcessorPil.from_pretrained(tmp_path)
    cfg = ImagePreprocessConfig.from_folder(tmp_path)
    assert (cfg.size, cfg.do_center_crop, cfg.resample) == ((48, 40), False, 2)
    ours = ImagePreprocessor(cfg)
    for k, (w, h) in enumerate(SIZES):  # RGB: HF's ViT processor does not convert other modes itself
        image = picture(k, w, h, "RGB")
        expected = reference(image, return_tensors="pt")["pixel_values"][0]
        assert (ours(image) - expected).abs().max().item() <= TOLERANCE
    raw = json.loads((tmp_path / "preprocessor_config.json").read_text())
    del raw["resample"]
    assert ImagePreprocessConfig.from_dict(raw).resample == 2  # ViTImageProcessor's default, not SigLIP's 3
