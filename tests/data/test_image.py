"""The image stage matches CLIPImageProcessor, reads CLIP preprocessor configs, and refuses bad pictures."""

from __future__ import annotations

import io
import json
import pickle
import random

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessorPil

from vlm.data.image import ImageConfigError, ImagePreprocessConfig, ImagePreprocessor, PixelNormalizer
from vlm.formats.errors import BadSample

MODES = ["RGB", "RGBA", "L", "LA", "P", "P+transparency", "CMYK", "1", "I", "RGB+transparency"]
TOLERANCE = 0.02


def random_picture(rng: random.Random, width: int, height: int, mode: str) -> Image.Image:
    """A gradient plus noise (the noise makes resampling differences visible) in the given PIL mode."""
    state = np.random.RandomState(rng.randrange(1 << 30))
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack(
        [xx * 255 / width, yy * 255 / height, (xx + yy) % 50 * 5, state.rand(height, width) * 255], -1
    )
    pixels = np.clip(base + state.randint(-40, 40, base.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGBA")
    if mode == "P+transparency":
        image = image.convert("RGB").quantize(16)
        image.info["transparency"] = 3
    elif mode == "RGB+transparency":
        image = image.convert("RGB")
        image.info["transparency"] = (10, 20, 30)
    else:
        image = image.convert(mode)
    return image


def hf_processor(cfg: ImagePreprocessConfig) -> CLIPImageProcessorPil:
    """CLIPImageProcessor's PIL backend: what `CLIPImageProcessor` is without torchvision (our pinned deps)."""
    return CLIPImageProcessorPil(
        size={"shortest_edge": cfg.shortest_edge},
        crop_size={"height": cfg.crop[0], "width": cfg.crop[1]},
        image_mean=list(cfg.mean),
        image_std=list(cfg.std),
        resample=cfg.resample,
    )


CONFIGS = {
    "clip-224": ImagePreprocessConfig(),
    "crop-larger-than-resize": ImagePreprocessConfig(shortest_edge=24, crop=(40, 30)),
    "resize-larger-than-crop": ImagePreprocessConfig(shortest_edge=48, crop=(32, 32), resample=2),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_clip_image_processor(name):
    cfg = CONFIGS[name]
    reference, ours = hf_processor(cfg), ImagePreprocessor(cfg)
    rng = random.Random(name)
    sizes = [(1, 1), (5, 3), (7, 200), (300, 11), (cfg.crop[1] - 1, cfg.crop[0] + 1)]
    sizes += [(rng.randint(2, 360), rng.randint(2, 360)) for _ in range(20)]
    for k, (width, height) in enumerate(sizes):
        mode = MODES[k % len(MODES)]
        picture = random_picture(rng, width, height, mode)
        expected = reference(picture, return_tensors="pt")["pixel_values"][0]
        got = ours(picture)
        assert got.dtype == torch.float32 and got.shape == expected.shape == (3, *cfg.crop)
        diff = (got - expected).abs().max().item()
        assert diff <= TOLERANCE, f"{width}x{height} {mode}: max abs diff {diff}"
        # The training path (uint8 from the loader, normalised later in the trainer) gives the same numbers.
        assert torch.equal(PixelNormalizer(cfg)(ours.pixels(picture)), got)


def test_loader_pixels_normalised_in_a_batch_equal_the_float_path_bit_for_bit():
    cfg = CONFIGS["clip-224"]
    ours, normalize = ImagePreprocessor(cfg), PixelNormalizer(cfg)
    rng = random.Random(7)
    pictures = [random_picture(rng, rng.randint(30, 300), rng.randint(30, 300), "RGB") for _ in range(6)]
    raw = torch.stack([ours.pixels(p) for p in pictures]).view(2, 3, 3, *cfg.crop)  # (B, N, 3, H, W) uint8
    assert raw.dtype == torch.uint8 and raw.is_contiguous()
    batch = normalize(raw)
    assert batch.dtype == torch.float32 and batch.shape == raw.shape
    assert torch.equal(batch.view(6, 3, *cfg.crop), torch.stack([ours(p) for p in pictures]))
    # Against the textbook formula in float64: float32 rounding only.
    mean, std = torch.tensor(cfg.mean).double().view(3, 1, 1), torch.tensor(cfg.std).double().view(3, 1, 1)
    reference = (raw.double() * cfg.rescale_factor - mean) / std
    assert (batch.double() - reference).abs().max().item() < 1e-5


def test_normalizer_refuses_pixels_that_are_already_float():
    normalize = PixelNormalizer(ImagePreprocessConfig())
    with pytest.raises(TypeError, match="uint8"):
        normalize(torch.zeros(1, 1, 3, 224, 224))
    with pytest.raises(ValueError, match=r"\(\.\.\., 3, H, W\)"):
        normalize(torch.zeros(1, 4, 224, 224, dtype=torch.uint8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_normalizing_on_the_gpu_matches_the_cpu_bit_for_bit():
    raw = torch.randint(0, 256, (2, 3, 3, 32, 32), dtype=torch.uint8)
    normalize = PixelNormalizer(ImagePreprocessConfig(shortest_edge=32, crop=(32, 32)))
    assert torch.equal(normalize(raw.cuda()).cpu(), normalize(raw))


def test_encoded_bytes_match_decoded_pictures():
    cfg = CONFIGS["resize-larger-than-crop"]
    reference, ours = hf_processor(cfg), ImagePreprocessor(cfg)
    rng = random.Random(1)
    for fmt, mode in [("PNG", "RGBA"), ("JPEG", "RGB"), ("GIF", "P"), ("WEBP", "RGB"), ("PNG", "LA")]:
        buffer = io.BytesIO()
        random_picture(rng, rng.randint(20, 90), rng.randint(20, 90), mode).save(buffer, fmt)
        expected = reference(Image.open(io.BytesIO(buffer.getvalue())), return_tensors="pt")["pixel_values"][
            0
        ]
        assert (ours(buffer.getvalue()) - expected).abs().max().item() <= TOLERANCE, fmt


def test_without_center_crop_keeps_the_resized_size():
    ours = ImagePreprocessor(ImagePreprocessConfig(shortest_edge=20, do_center_crop=False))
    assert ours(Image.new("RGB", (50, 100))).shape == ours.pixels(Image.new("RGB", (50, 100))).shape == (3, 40, 20)
    assert ours.config.output_shape is None


def test_old_and_new_config_layouts_read_like_hf(tmp_path):
    new = tmp_path / "new"
    CLIPImageProcessorPil(size={"shortest_edge": 40}, crop_size={"height": 36, "width": 32}).save_pretrained(
        new
    )
    old = tmp_path / "old"
    old.mkdir()
    (old / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "crop_size": 28,
                "do_center_crop": True,
                "do_normalize": True,
                "do_resize": True,
                "feature_extractor_type": "CLIPFeatureExtractor",
                "image_mean": [0.5, 0.4, 0.3],
                "image_std": [0.2, 0.25, 0.3],
                "resample": 3,
                "size": 30,
            }
        )
    )
    picture = random_picture(random.Random(2), 70, 45, "RGB")
    for folder in (new, old):
        cfg = ImagePreprocessConfig.from_folder(folder)
        expected = CLIPImageProcessorPil.from_pretrained(folder)(picture, return_tensors="pt")[
            "pixel_values"
        ][0]
        assert (ImagePreprocessor(cfg)(picture) - expected).abs().max().item() <= TOLERANCE
    assert ImagePreprocessConfig.from_folder(old) == ImagePreprocessConfig(
        shortest_edge=30, crop=(28, 28), mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3)
    )
    assert ImagePreprocessConfig.from_folder(new).crop == (36, 32)


def test_config_errors_name_the_file_and_key(tmp_path):
    with pytest.raises(ImageConfigError, match="preprocessor_config.json not found"):
        ImagePreprocessConfig.from_folder(tmp_path / "nowhere")
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(ImageConfigError, match=str(tmp_path)):
        ImagePreprocessConfig.from_folder(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": {"height": 224, "width": 224}}))
    with pytest.raises(ImageConfigError, match="'size'"):
        ImagePreprocessConfig.from_folder(tmp_path)
    with pytest.raises(ImageConfigError, match="std"):
        ImagePreprocessConfig(std=(0.2, 0.0, 0.2))


def png_bytes(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 10, 10)).save(buffer, "PNG")
    return buffer.getvalue()


def test_pixel_limit_refuses_before_decoding():
    data = png_bytes(100, 80)
    truncated = data[:60]  # header intact, pixel data missing: decoding would fail
    limited = ImagePreprocessor(ImagePreprocessConfig(shortest_edge=8, crop=(8, 8)), max_pixels=100 * 80 - 1)
    with pytest.raises(BadSample) as refused:
        limited(truncated)
    assert refused.value.reason == "image_too_large"
    with pytest.raises(BadSample) as too_big:
        limited(Image.open(io.BytesIO(data)))
    assert too_big.value.reason == "image_too_large"
    allowed = ImagePreprocessor(limited.config, max_pixels=100 * 80)
    assert allowed(data).shape == (3, 8, 8)
    with pytest.raises(BadSample) as broken:
        allowed(truncated)
    assert broken.value.reason == "image_decode"


def test_extreme_aspect_ratio_is_refused_before_resizing():
    preprocess = ImagePreprocessor(ImagePreprocessConfig(shortest_edge=8, crop=(8, 8)), max_pixels=1000)
    assert preprocess(png_bytes(10, 90)).shape == (3, 8, 8)  # resizes to 8 x 72
    with pytest.raises(BadSample) as caught:
        preprocess(png_bytes(1, 200))  # would resize to 8 x 1600
    assert caught.value.reason == "image_too_large"


def test_corrupt_or_unlisted_formats_are_bad_samples():
    preprocess = ImagePreprocessor(ImagePreprocessConfig(shortest_edge=8, crop=(8, 8)))
    buffer = io.BytesIO()
    Image.new("RGB", (10, 10)).save(buffer, "PPM")
    for data in (b"not an image at all", buffer.getvalue()):
        with pytest.raises(BadSample) as caught:
            preprocess(data)
        assert caught.value.reason == "image_decode"


def test_preprocessor_and_bad_sample_pickle():
    preprocess = ImagePreprocessor(CONFIGS["resize-larger-than-crop"], max_pixels=12345)
    again = pickle.loads(pickle.dumps(preprocess))
    picture = random_picture(random.Random(3), 50, 60, "RGB")
    assert again.max_pixels == 12345 and torch.equal(again(picture), preprocess(picture))
    error = pickle.loads(pickle.dumps(BadSample("image_decode", "truncated")))
    assert (error.reason, error.detail) == ("image_decode", "truncated")
