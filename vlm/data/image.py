"""Image stage: decode under a pixel limit, then CLIP or SigLIP preprocessing without HF's per-call overhead.

    from vlm.data.image import ImagePreprocessConfig, ImagePreprocessor, PixelNormalizer
    preprocess = ImagePreprocessor(ImagePreprocessConfig.from_folder("model/vision_model"))
    pixels = preprocess(jpeg_bytes)          # (3, H, W) float32 (e.g. 3 x 224 x 224), or raises BadSample
    raw = preprocess.pixels(jpeg_bytes)      # (3, H, W) uint8: resized (and cropped), not yet normalised
    pixels = PixelNormalizer(preprocess.config)(raw.to(device))   # == preprocess(jpeg_bytes), bit for bit

Two layouts of `preprocessor_config.json` are understood, each matching its HF processor (PIL backend, the
same PIL calls); both composite alpha onto white first and rescale and normalise last:

- CLIP (`CLIPImageProcessor`, `size: {"shortest_edge": N}`): shortest side resized to N with the long side
  truncated by `int()`, then centre crop to `crop_size` (zero-padded when the crop is larger than the resized
  image).
- SigLIP (`SiglipImageProcessor`, also SigLIP2's fixed-resolution checkpoints, `size: {"height": H, "width":
  W}`): resized to exactly H x W, aspect ratio not kept, no crop.

Two deliberate departures from the HF processors, both shared with the sharder (`data_tools.validate`) so a
picture it keeps is one every path here accepts, seen the same way: the EXIF orientation is applied (`orient`;
HF ignores it), and 16-bit and other unusual PIL modes are scaled to 8 bits (`vlm.formats.pictures.to_8bit`) where HF's
`convert("RGB")` clips them to white. Pictures without EXIF in ordinary 8-bit modes match HF as before. The
speed comes from skipping HF's per-call work (input validation, PIL <-> numpy round trips, float64 rescale,
several transposes, BatchFeature): one PIL resize, at most one crop, one transpose, one scale-and-shift.

The training loader stops at `pixels` (uint8) and the trainer normalises on its device with
`PixelNormalizer`: a quarter of the bytes cross from the DataLoader workers (through shared memory) and the
float work runs on the accelerator. `ImagePreprocessor.__call__` is exactly `PixelNormalizer(pixels(...))`.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vlm.formats.constants import CLIP_MEAN, CLIP_STD, DEFAULT_MAX_PIXELS, IMAGE_FORMATS
from vlm.formats.errors import BadSample
from vlm.formats.pictures import orient, to_rgb

SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)
"""SiglipImageProcessor's defaults (IMAGENET_STANDARD_MEAN / _STD), for files without image_mean / _std."""
SIGLIP_TYPES = frozenset({"SiglipImageProcessor", "SiglipImageProcessorPil", "SiglipImageProcessorFast"})
"""`image_processor_type`s read with the SigLIP layout (exact resize, no crop, SigLIP defaults)."""
VIT_TYPES = frozenset({"ViTImageProcessor", "ViTImageProcessorPil", "ViTImageProcessorFast"})
"""`image_processor_type`s with the same layout as SigLIP's but bilinear by default (ViTImageProcessor)."""


class ImageConfigError(ValueError):
    """A preprocessor config that cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class ImagePreprocessConfig:
    """How pictures become vision-encoder input; the fields of a CLIP or SigLIP `preprocessor_config.json`.

    The resize is CLIP's shortest-edge one (`size` None, the default) or SigLIP's exact one (`size` set).
    Built by hand for SigLIP, pass `size=(H, W), do_center_crop=False` (`from_dict` does).
    """

    shortest_edge: int = 224
    """CLIP: the shorter side is resized to this; the longer side keeps the aspect ratio (truncated).
    Unused when `size` is set."""
    crop: tuple[int, int] = (224, 224)
    """Centre-crop size (height, width)."""
    mean: tuple[float, float, float] = CLIP_MEAN
    """Per-channel mean subtracted after rescaling."""
    std: tuple[float, float, float] = CLIP_STD
    """Per-channel standard deviation divided by after subtracting the mean."""
    resample: int = int(Image.Resampling.BICUBIC)
    """PIL resampling filter (3 = bicubic, CLIP's)."""
    do_center_crop: bool = True
    """Crop to `crop`; without it, outputs keep the resized size and cannot be batched together."""
    rescale_factor: float = 1 / 255
    """Multiplies the 0..255 pixel values before normalising."""
    size: tuple[int, int] | None = None
    """SigLIP: (height, width) every picture is resized to exactly, aspect ratio not kept; None: CLIP's
    shortest-edge resize to `shortest_edge`. A centre crop (`do_center_crop`) still follows when enabled."""

    def __post_init__(self):
        problems = []
        if self.shortest_edge < 1:
            problems.append(f"shortest_edge must be >= 1, got {self.shortest_edge}")
        if len(self.crop) != 2 or min(self.crop) < 1:
            problems.append(f"crop must be (height, width) >= 1, got {self.crop}")
        if self.size is not None and (len(self.size) != 2 or min(self.size) < 1):
            problems.append(f"size must be None or (height, width) >= 1, got {self.size}")
        if len(self.mean) != 3 or len(self.std) != 3:
            problems.append(f"mean and std need 3 values (RGB), got {self.mean} and {self.std}")
        elif min(self.std) <= 0:
            problems.append(f"std must be positive, got {self.std}")
        if self.resample not in {int(r) for r in Image.Resampling}:
            problems.append(f"resample must be a PIL filter number 0..5, got {self.resample}")
        if problems:
            raise ImageConfigError("invalid image preprocessing config: " + "; ".join(problems))

    @property
    def output_shape(self) -> tuple[int, int, int] | None:
        """(3, H, W) of every output: the crop, else SigLIP's exact `size`; None when sizes vary (no crop)."""
        if self.do_center_crop:
            return (3, *self.crop)
        return (3, *self.size) if self.size is not None else None

    @classmethod
    def from_folder(cls, path: str | Path) -> ImagePreprocessConfig:
        """Read `preprocessor_config.json` from a CLIP or SigLIP folder (e.g. openai/clip-vit-base-patch16,
        google/siglip-base-patch16-224, google/siglip2-base-patch32-256)."""
        file = Path(path) / "preprocessor_config.json"
        if not file.is_file():
            raise ImageConfigError(
                f"{file} not found; point the vision model path at a CLIP or SigLIP folder that has its "
                "preprocessor_config.json (saved by CLIP/SiglipImageProcessor.save_pretrained)"
            )
        try:
            raw = json.loads(file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ImageConfigError(f"cannot read {file}: {err}") from err
        if not isinstance(raw, dict):
            raise ImageConfigError(f"{file} must hold a JSON object, got {type(raw).__name__}")
        return cls.from_dict(raw, source=str(file))

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str = "preprocessor config") -> ImagePreprocessConfig:
        """Interpret a preprocessor-config dict the way its HF processor does.

        `image_processor_type` SiglipImageProcessor (or its Pil / Fast variant): `size` {"height", "width"},
        SigLIP's defaults for absent keys (224 x 224, mean and std 0.5, bicubic, no crop); ViTImageProcessor the
        same with bilinear. Anything else: CLIPImageProcessor's layouts (old and new) and defaults.
        """

        def fail(key: str, why: str) -> ImageConfigError:
            return ImageConfigError(f"{source}: '{key}' {why} (value {raw.get(key)!r})")

        if raw.get("do_resize", True) is not True:
            raise fail("do_resize", "must be true: pictures of any size are resized to the encoder's size")
        kind = raw.get("image_processor_type")
        if kind in SIGLIP_TYPES or kind in VIT_TYPES:
            default = Image.Resampling.BICUBIC if kind in SIGLIP_TYPES else Image.Resampling.BILINEAR
            return cls._from_siglip_dict(raw, fail, default)
        if isinstance(kind, str) and kind.lower().startswith("siglip"):
            raise fail(
                "image_processor_type",
                "is not supported: only fixed-resolution SigLIP / SigLIP2 (SiglipImageProcessor) is, "
                "not Siglip2ImageProcessor's variable-resolution NaFlex",
            )
        size = raw.get("size", 224)
        if isinstance(size, Mapping):
            if set(k for k, v in size.items() if v is not None) != {"shortest_edge"}:
                raise fail(
                    "size",
                    "must be {'shortest_edge': N} or an int (CLIP's shortest-edge resize), or {'height': H, "
                    "'width': W} with image_processor_type SiglipImageProcessor or ViTImageProcessor (exact resize)",
                )
            size = size["shortest_edge"]
        crop = raw.get("crop_size", 224)
        if isinstance(crop, Mapping):
            if crop.get("height") is None or crop.get("width") is None:
                raise fail("crop_size", "must be {'height': H, 'width': W} or an int")
            crop = (crop["height"], crop["width"])
        elif isinstance(crop, int):
            crop = (crop, crop)
        if not isinstance(size, int) or not all(isinstance(c, int) for c in crop):
            raise fail("size", f"and crop_size must be integers, got size={size!r} crop_size={crop!r}")
        normalise = raw.get("do_normalize", True)
        mean = _three(raw.get("image_mean", CLIP_MEAN)) if normalise else (0.0, 0.0, 0.0)
        std = _three(raw.get("image_std", CLIP_STD)) if normalise else (1.0, 1.0, 1.0)
        if mean is None or std is None:
            raise fail("image_mean", "and image_std must be a number or a list of 3 numbers")
        rescale = float(raw.get("rescale_factor", 1 / 255)) if raw.get("do_rescale", True) else 1.0
        return cls(
            shortest_edge=size,
            crop=tuple(crop),
            mean=mean,
            std=std,
            resample=int(raw.get("resample", Image.Resampling.BICUBIC)),
            do_center_crop=bool(raw.get("do_center_crop", True)),
            rescale_factor=rescale,
        )

    @classmethod
    def _from_siglip_dict(cls, raw: Mapping[str, Any], fail,
                          default_resample: int = Image.Resampling.BICUBIC) -> ImagePreprocessConfig:
        """SiglipImageProcessor's (and ViTImageProcessor's) reading: exact resize to `size`, their defaults for
        absent keys (224 x 224, mean and std 0.5, `default_resample`, no crop)."""
        size = raw.get("size", {"height": 224, "width": 224})
        keys = set(k for k, v in size.items() if v is not None) if isinstance(size, Mapping) else None
        if keys != {"height", "width"}:
            raise fail("size", "must be {'height': H, 'width': W} for SiglipImageProcessor (exact resize)")
        if not all(isinstance(size[k], int) and size[k] >= 1 for k in ("height", "width")):
            raise fail("size", "must hold integer height and width >= 1")
        crop_kwargs = {"do_center_crop": False}
        if raw.get("do_center_crop"):  # SiglipImageProcessor does not crop by default; HF crops when asked
            crop = raw.get("crop_size")
            if isinstance(crop, int):
                crop = {"height": crop, "width": crop}
            if not isinstance(crop, Mapping) or not all(
                isinstance(crop.get(k), int) and crop[k] >= 1 for k in ("height", "width")
            ):
                raise fail("crop_size", "must be {'height': H, 'width': W} or an int when do_center_crop")
            crop_kwargs = {"do_center_crop": True, "crop": (crop["height"], crop["width"])}
        normalise = raw.get("do_normalize", True)
        mean = _three(raw.get("image_mean", SIGLIP_MEAN)) if normalise else (0.0, 0.0, 0.0)
        std = _three(raw.get("image_std", SIGLIP_STD)) if normalise else (1.0, 1.0, 1.0)
        if mean is None or std is None:
            raise fail("image_mean", "and image_std must be a number or a list of 3 numbers")
        return cls(
            size=(size["height"], size["width"]),
            mean=mean,
            std=std,
            resample=int(raw.get("resample", default_resample)),
            rescale_factor=float(raw.get("rescale_factor", 1 / 255)) if raw.get("do_rescale", True) else 1.0,
            **crop_kwargs,
        )


def _three(value: Any) -> tuple[float, float, float] | None:
    if isinstance(value, (int, float)):
        return (float(value),) * 3
    if (
        isinstance(value, (list, tuple))
        and len(value) == 3
        and all(isinstance(v, (int, float)) for v in value)
    ):
        return tuple(float(v) for v in value)
    return None


def resized_size(width: int, height: int, shortest_edge: int) -> tuple[int, int]:
    """(width, height) after CLIP's shortest-edge resize: the long side is `int(edge * long / short)`."""
    if width <= height:
        return shortest_edge, int(shortest_edge * height / width)
    return int(shortest_edge * width / height), shortest_edge


class PixelNormalizer:
    """uint8 pixels (..., 3, H, W) on any device -> float32 `(x * rescale - mean) / std`, same shape and device.

    Computed as `x * scale - shift` in float32, with scale = rescale / std and shift = mean / std rounded
    from float64 once: the same operations, in the same order, wherever it runs, so CPU and GPU results are
    bit-identical to `ImagePreprocessor.__call__`.
    """

    def __init__(self, config: ImagePreprocessConfig):
        self.config = config
        std = torch.tensor(config.std, dtype=torch.float64)
        mean = torch.tensor(config.mean, dtype=torch.float64)
        scale = (config.rescale_factor / std).float().view(3, 1, 1)
        shift = (mean / std).float().view(3, 1, 1)
        self._on_device = {torch.device("cpu"): (scale, shift)}

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.dtype != torch.uint8:
            raise TypeError(
                f"PixelNormalizer takes the loader's uint8 pixel_values, got {pixels.dtype}: float pixels are "
                "already normalised (ImagePreprocessor.__call__), do not normalise them twice"
            )
        if pixels.dim() < 3 or pixels.shape[-3] != 3:
            raise ValueError(f"pixel_values must be (..., 3, H, W), got {tuple(pixels.shape)}")
        scale, shift = self._constants(pixels.device)
        return pixels.to(torch.float32).mul_(scale).sub_(shift)

    def _constants(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._on_device:  # moved once per device, not once per batch
            scale, shift = self._on_device[torch.device("cpu")]
            self._on_device[device] = (scale.to(device), shift.to(device))
        return self._on_device[device]


@dataclass
class ImagePreprocessor:
    """Picklable callable: encoded bytes or a PIL image -> float32 tensor (3, H, W), or `BadSample`.

    (H, W) is `config.output_shape[1:]`: the crop (CLIP), or the exact `size` (SigLIP). `pixels` stops before
    normalising: uint8 (3, H, W), what the training loader ships.

    Every picture is first made upright by its EXIF orientation (`orient`; unlike HF's processors) and read
    in 8 bits (`to_rgb`, `to_8bit`). Pictures with more than `max_pixels` pixels (width x height, the same
    product before and after orienting) are refused from their header, before any decoding; any other
    picture that decodes is accepted, long strips included (`resize_and_crop`).
    """

    config: ImagePreprocessConfig = field(default_factory=ImagePreprocessConfig)
    max_pixels: int = DEFAULT_MAX_PIXELS
    formats: tuple[str, ...] = IMAGE_FORMATS

    def __post_init__(self):
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels must be >= 1, got {self.max_pixels}")
        self.normalizer = PixelNormalizer(self.config)

    def __call__(self, image: Image.Image | bytes) -> torch.Tensor:
        """(3, H, W) float32, rescaled and normalised: what the vision encoder takes."""
        return self.normalizer(self.pixels(image))

    def pixels(self, image: Image.Image | bytes) -> torch.Tensor:
        """Encoded bytes or a PIL image -> contiguous uint8 (3, H, W): upright, resized and (if configured)
        cropped. Raises BadSample: image_too_large, image_decode, or UNSUPPORTED_MODE (see `to_8bit`)."""
        if isinstance(image, (bytes, bytearray, memoryview)):
            image = self.open(image)
        self.check_size(image)
        try:
            image.load()  # decodes a lazily opened image
            rgb = to_rgb(orient(image))  # orient after load: a PNG's eXIf chunk may follow its pixels
        except BadSample:
            raise
        except Exception as err:  # a corrupt file can raise almost anything from a PIL plugin
            raise BadSample("image_decode", repr(err)) from err
        hwc = torch.from_numpy(self.resize_and_crop(rgb))  # (H, W, 3)
        return hwc.permute(2, 0, 1).contiguous()  # (3, H, W)

    def open(self, data: bytes) -> Image.Image:
        """Open encoded bytes lazily (header only) and check the pixel limit before decoding."""
        try:
            image = Image.open(io.BytesIO(data), formats=self.formats)
        except Image.DecompressionBombError as err:
            raise BadSample("image_too_large", str(err)) from err
        except Exception as err:  # unknown format, truncated header, plugin errors
            raise BadSample("image_decode", repr(err)) from err
        self.check_size(image)
        return image

    def check_size(self, image: Image.Image) -> None:
        """Check the size read from the header, before decoding.

        Raises BadSample("image_too_large") above `max_pixels` pixels and BadSample("image_decode")
        for an image with a zero side.
        """
        width, height = image.size
        if width * height > self.max_pixels:
            raise BadSample("image_too_large", f"{width}x{height} > max_pixels={self.max_pixels}")
        if width < 1 or height < 1:
            raise BadSample("image_decode", f"empty image {width}x{height}")

    def resize_and_crop(self, rgb: Image.Image) -> np.ndarray:
        """RGB image -> writable uint8 array (H, W, 3): shortest-edge (CLIP) or exact (SigLIP) resize, then
        centre crop if `do_center_crop`.

        The whole picture is resized and then cropped, as CLIPImageProcessor does: resampling only the crop
        window (PIL's fractional `box`) changes PIL's intermediate rounding and was measured to differ by
        up to 18/255 on noisy pictures, so it is used only where the whole resize is not built: long strips.
        When CLIP's shortest-edge resize would exceed `max_pixels` (a 1 x 30000 strip resizes to 224 x
        6,720,000), then with a centre crop only the window the crop keeps is resampled, from the matching
        box of the picture (the same view, at most `crop` pixels built); without a crop the long side is
        capped at `max_pixels // shortest_edge` (aspect ratio then not kept). SigLIP's exact resize is never
        capped: its size is fixed by the config, whatever the picture.
        """
        cfg = self.config
        if cfg.size is not None:
            new_h, new_w = cfg.size  # SigLIP: exactly (H, W), aspect ratio not kept
        else:
            new_w, new_h = resized_size(*rgb.size, cfg.shortest_edge)
            if new_w * new_h > self.max_pixels:
                if cfg.do_center_crop:
                    return self._resize_crop_window(rgb, new_w, new_h)
                cap = max(cfg.shortest_edge, self.max_pixels // cfg.shortest_edge)
                new_w, new_h = (new_w, cap) if new_w == cfg.shortest_edge else (cap, new_h)
        resized = rgb.resize((new_w, new_h), cfg.resample)
        if not cfg.do_center_crop:
            return np.array(resized)
        crop_h, crop_w = cfg.crop
        top, left = (new_h - crop_h) // 2, (new_w - crop_w) // 2
        if top >= 0 and left >= 0:
            return np.array(resized.crop((left, top, left + crop_w, top + crop_h)))
        return _pad_crop(np.asarray(resized), crop_h, crop_w)

    def _resize_crop_window(self, rgb: Image.Image, new_w: int, new_h: int) -> np.ndarray:
        """(crop_h, crop_w, 3) uint8: the centre crop of a (new_w, new_h) resize, resampling only its window."""
        crop_h, crop_w = self.config.crop
        left, top = max((new_w - crop_w) // 2, 0), max((new_h - crop_h) // 2, 0)
        right, bottom = min(left + crop_w, new_w), min(top + crop_h, new_h)
        sx, sy = rgb.width / new_w, rgb.height / new_h  # resized -> source coordinates
        box = (left * sx, top * sy, right * sx, bottom * sy)
        window = rgb.resize((right - left, bottom - top), self.config.resample, box=box)
        return _pad_crop(np.asarray(window), crop_h, crop_w)  # pads where the resize is smaller than the crop


def _pad_crop(pixels: np.ndarray, crop_h: int, crop_w: int) -> np.ndarray:
    """Centre crop with zero padding where the image is smaller than the crop, placed as HF places it."""
    height, width, _ = pixels.shape
    out = np.zeros((crop_h, crop_w, 3), dtype=pixels.dtype)
    if height >= crop_h:
        src_y, dst_y, rows = (height - crop_h) // 2, 0, crop_h
    else:
        src_y, dst_y, rows = 0, math.ceil((crop_h - height) / 2), height
    if width >= crop_w:
        src_x, dst_x, cols = (width - crop_w) // 2, 0, crop_w
    else:
        src_x, dst_x, cols = 0, math.ceil((crop_w - width) / 2), width
    out[dst_y : dst_y + rows, dst_x : dst_x + cols] = pixels[src_y : src_y + rows, src_x : src_x + cols]
    return out
