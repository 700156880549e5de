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

from vlm.data.image import (
    ImageConfigError,
    ImagePreprocessConfig,
    ImagePreprocessor,
    PixelNormalizer,
)
from vlm.formats.errors import BadSample
from vlm.formats.pictures import UNSUPPORTED_MODE, to_rgb

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


def strip(width: int, height: int) -> Image.Image:
    """A smooth two-colour gradient along the long side (resampling differences stay small on it)."""
    ramp = np.linspace(0, 255, max(width, height))
    line = np.stack([ramp, 255 - ramp, np.full_like(ramp, 90)], -1).astype(np.uint8)  # (N, 3)
    pixels = line[None, :, :] if width >= height else line[:, None, :]
    return Image.fromarray(np.ascontiguousarray(np.broadcast_to(pixels, (height, width, 3))))


@pytest.mark.parametrize("cfg", [ImagePreprocessConfig(shortest_edge=8, crop=(8, 8)),
                                 ImagePreprocessConfig(shortest_edge=8, crop=(10, 12))], ids=["crop", "pad"])
def test_long_strips_are_accepted_and_resample_only_the_crop_window(cfg, monkeypatch):
    whole = ImagePreprocessor(cfg, max_pixels=10**6)
    for width, height in [(6, 300), (300, 6), (1, 200)]:
        picture = strip(width, height)
        windowed = ImagePreprocessor(cfg, max_pixels=width * height)  # the full resize would be over this
        expected = whole.pixels(picture).int()
        got = windowed.pixels(picture).int()
        assert got.shape == expected.shape == (3, *cfg.crop)
        assert (got - expected).abs().max().item() <= 2, (width, height)  # PIL rounding only, same view
    built = []
    resize = Image.Image.resize

    def recording_resize(image, size, *args, **kwargs):
        built.append(size)
        return resize(image, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", recording_resize)
    default = ImagePreprocessor()
    for size in [(1, 30000), (30000, 1)]:
        assert default.pixels(Image.new("RGB", size, (10, 200, 30)))[:, 112, 112].tolist() == [10, 200, 30]
    assert max(w * h for w, h in built) <= 224 * 224  # never the 224 x 6,720,000 full resize


def test_without_a_crop_a_long_strip_has_its_long_side_capped():
    no_crop = ImagePreprocessor(ImagePreprocessConfig(shortest_edge=8, do_center_crop=False), max_pixels=1000)
    assert no_crop.pixels(png_bytes(10, 90)).shape == (3, 72, 8)  # 8 x 72 is within the limit: HF's size
    assert no_crop.pixels(png_bytes(1, 200)).shape == (3, 125, 8)  # 8 x 1600 capped to 1000 // 8
    assert no_crop.pixels(png_bytes(200, 1)).shape == (3, 8, 125)


def grey_ramp(width: int, height: int, top: int) -> np.ndarray:
    """(height, width) float64: 0 in the first column rising evenly to `top` in the last."""
    return np.tile(np.round(np.arange(width) * top / (width - 1)), (height, 1))


def test_16_and_32_bit_modes_are_scaled_to_8_bits_not_clipped():
    ramp16, ramp8 = grey_ramp(256, 4, 65535), grey_ramp(256, 4, 255).astype(np.uint8)
    same_size = ImagePreprocessor(ImagePreprocessConfig(size=(4, 256), do_center_crop=False))  # no resampling
    expected = same_size.pixels(Image.fromarray(ramp8)).int()
    pictures = {
        "I;16": Image.fromarray(ramp16.astype("<u2")),
        "I;16B": Image.frombytes("I;16B", (256, 4), ramp16.astype(">u2").tobytes()),
        "I;16L": Image.frombytes("I;16L", (256, 4), ramp16.astype("<u2").tobytes()),
        "I": Image.fromarray(ramp16.astype(np.int32)),  # 16-bit data in a 32-bit image (older Pillows' PNG)
        "F": Image.fromarray(ramp16.astype(np.float32)),
        "F unit": Image.fromarray((ramp16 / 65535).astype(np.float32)),
    }
    for name, picture in pictures.items():
        assert picture.mode == name.split()[0]
        got = same_size.pixels(picture).int()
        assert (got - expected).abs().max().item() <= 1, name  # not 255: convert("RGB") would clip
    # 8-bit data held in I or F reads as PIL and HF read it (the HF comparisons above include mode I).
    assert torch.equal(same_size.pixels(Image.fromarray(ramp8).convert("I")), expected.to(torch.uint8))
    assert torch.equal(same_size.pixels(Image.fromarray(ramp8).convert("F")), expected.to(torch.uint8))


def half_transparent(mode: str) -> Image.Image:
    """12 x 8 colour noise, transparent on the left half, opaque on the right, converted to `mode`."""
    state = np.random.RandomState(5)
    rgba = state.randint(0, 256, (8, 12, 4)).astype(np.uint8)
    rgba[:, :6, 3], rgba[:, 6:, 3] = 0, 255
    image = Image.fromarray(rgba)
    if mode in ("L", "LA", "La", "P", "PA"):
        grey_or_palette = image.convert("RGB").convert(mode[0])
        grey_or_palette.putalpha(image.getchannel("A"))  # L -> LA, P -> PA
        image = grey_or_palette
    return image.convert(mode) if image.mode != mode else image


@pytest.mark.parametrize("mode", ["RGBA", "RGBa", "LA", "La", "PA"])
def test_alpha_modes_composite_onto_white(mode):
    picture = half_transparent(mode)
    got = np.asarray(to_rgb(picture)).astype(int)
    assert (got[:, :6] == 255).all()
    opaque = np.asarray(picture.convert("RGBA" if mode != "La" else "LA").convert("RGB"))[:, 6:]
    assert np.abs(got[:, 6:] - opaque).max() <= 1


@pytest.mark.parametrize("mode", ["RGBX", "CMYK", "YCbCr", "LAB", "HSV", "1", "L", "P"])
def test_other_pil_modes_read_as_their_rgb(mode):
    # Mid-range colours: 8-bit LAB loses precision near the edges of the gamut.
    rgb = Image.fromarray(np.asarray(half_transparent("RGBA").convert("RGB")) // 2 + 64)
    picture = rgb.convert(mode)
    got = np.asarray(to_rgb(picture)).astype(int)
    assert np.abs(got - np.asarray(picture.convert("RGB"))).max() == 0  # PIL's own conversion
    if mode in ("RGBX", "CMYK", "YCbCr", "LAB", "HSV"):  # and it means the same colours
        assert np.abs(got - np.asarray(rgb)).max() <= 8, mode


def test_16_bit_transparency_and_values_without_a_reading():
    values = grey_ramp(16, 2, 65535).astype("<u2")
    keyed = Image.fromarray(values)
    keyed.info["transparency"] = int(values[0, 0])  # a 16-bit grey PNG's tRNS
    rgb = np.asarray(to_rgb(keyed))
    assert (rgb[:, 0] == 255).all() and (rgb[:, 1:] == (values[:, 1:, None] >> 8)).all()
    preprocess = ImagePreprocessor(ImagePreprocessConfig(shortest_edge=8, crop=(8, 8)))
    unreadable = [np.array([[-1, 5]], np.int32), np.array([[0, 70000]], np.int32),
                  np.array([[0, np.nan]], np.float32), np.array([[0, 1e6]], np.float32)]
    for picture in map(Image.fromarray, unreadable):
        with pytest.raises(BadSample) as caught:
            preprocess.pixels(picture)
        assert caught.value.reason == UNSUPPORTED_MODE, picture


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
