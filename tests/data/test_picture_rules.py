"""One reading of every picture on every path: the sharder (kept or re-encoded bytes), training, eval and chat.

The sharder runs for real (`data_tools.shard.main`, in-process); training, eval and chat all decode through
`ImagePreprocessor` (chat and eval build one in `vlm.inference`), checked here with CLIP's and SigLIP's layouts.
"""

from __future__ import annotations

import io
import json
import math
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from data_tools import shard
from vlm.data.image import ImagePreprocessConfig, ImagePreprocessor
from vlm.formats import manifest as mf
from vlm.formats.constants import DEFAULT_MAX_PIXELS
from vlm.formats.errors import BadSample
from vlm.formats.pictures import UNSUPPORTED_MODE

LAYOUTS = {
    "clip": ImagePreprocessConfig(),  # shortest edge 224, centre crop 224 x 224
    "siglip": ImagePreprocessConfig.from_dict({"image_processor_type": "SiglipImageProcessor",
                                               "size": {"height": 224, "width": 224}}),
}
REPO = Path(__file__).resolve().parents[2]


def shard_pictures(root: Path, pictures: dict[str, bytes], *flags: str) -> dict[str, bytes | str]:
    """Run the sharder on one record per picture: name -> the bytes it stored, or the reason it skipped it."""
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    turn = [{"role": "user", "content": "<image>\nWhat is it?"}, {"role": "assistant", "content": "A picture."}]
    lines = []
    for name, data in pictures.items():
        (images / name).write_bytes(data)
        lines.append(json.dumps({"conversations": turn, "image": name}))
    (root / "d.jsonl").write_text("\n".join(lines) + "\n")
    out = root / "out"
    assert shard.main(["--jsonl", str(root / "d.jsonl"), "--images", str(images), "--out", str(out),
                       "--prefix", "p", "--max-skip-fraction", "1", *flags]) == 0
    manifest = mf.load_manifest(out)
    members = {}
    for entry in manifest["shards"]:
        with tarfile.open(out / entry["name"]) as tar:
            members.update({info.name: tar.extractfile(info).read() for info in tar})
    names = list(pictures)
    result = {names[skip["line"] - 1]: skip["reason"] for skip in manifest["skipped"]}
    for member, data in members.items():
        key, _, rest = member.partition(".")
        if rest != "json":
            result[names[int(key.removeprefix("p_")) - 1]] = data
    assert sorted(result) == sorted(names)
    return result


def model_view(data: bytes | Image.Image, layout: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """(224, 224, 3) uint8: what the vision encoder is given, before normalising."""
    return ImagePreprocessor(LAYOUTS[layout], max_pixels=max_pixels).pixels(data).permute(1, 2, 0).numpy()


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **params)
    return out.getvalue()


def png(width: int, height: int, colour_type: int, depth: int, pixels: bytes, *chunks: tuple[bytes, bytes]
        ) -> bytes:
    """A PNG written by hand (PIL writes neither 48-bit RGB nor every depth); `pixels`: the unfiltered rows."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    row = len(pixels) // height
    rows = b"".join(b"\0" + pixels[y * row:(y + 1) * row] for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + b"".join(chunk(k, d) for k, d in chunks)
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


# 1. 16-bit pictures: the ramp, not white.

RAMP_AT = {0.25: 64, 0.375: 96, 0.5: 128, 0.625: 160, 0.75: 191}  # column (fraction of width) -> 8-bit value


def ramp_pictures(size: int = 256) -> dict[str, bytes]:
    """The same horizontal grey ramp, 0 to full scale across the width, stored five ways."""
    ramp16 = np.tile(np.round(np.arange(size) * 65535 / (size - 1)), (size, 1)).astype(np.uint16)
    ramp8 = np.tile(np.round(np.arange(size) * 255 / (size - 1)), (size, 1)).astype(np.uint8)
    rgb48 = np.repeat(ramp16[:, :, None], 3, axis=2).astype(">u2").tobytes()
    return {
        "grey16.png": encode(Image.fromarray(ramp16), "PNG"),  # opens as I;16
        "grey16b.tif": encode(Image.frombytes("I;16B", (size, size), ramp16.astype(">u2").tobytes()), "TIFF"),
        "rgb48.png": png(size, size, 2, 16, rgb48),
        "grey8.png": encode(Image.fromarray(ramp8), "PNG"),
        "rgb8.png": encode(Image.fromarray(ramp8).convert("RGB"), "PNG"),
    }


def test_a_16_bit_ramp_reads_as_its_8_bit_ramp_on_every_path(tmp_path):
    pictures = ramp_pictures()
    assert Image.open(io.BytesIO(pictures["grey16.png"])).mode == "I;16"
    kept = shard_pictures(tmp_path / "kept", pictures)
    shrunk = shard_pictures(tmp_path / "shrunk", pictures, "--resize-max", "128")
    assert kept["grey16.png"] == pictures["grey16.png"]  # header-only check, stored as is
    assert Image.open(io.BytesIO(shrunk["grey16.png"])).size == (128, 128)  # re-encoded in 8 bits
    for name, original in pictures.items():
        for path, data in {"chat/eval": original, "kept": kept[name], "re-encoded": shrunk[name]}.items():
            for layout in LAYOUTS:
                view = model_view(data, layout).astype(int)
                assert (view == view[:, :, :1]).all(), (name, path, layout)  # grey stays grey
                got = [view[112, int(f * 224), 0] for f in RAMP_AT]
                assert np.abs(np.array(got) - list(RAMP_AT.values())).max() <= 2, (name, path, layout, got)


# 2. EXIF orientation: upright on every path, whatever the size.

COLOURS = {"red": (230, 20, 20), "green": (20, 200, 40), "blue": (20, 40, 230), "yellow": (240, 220, 30)}
INVERSE = {  # how to store an upright picture so that EXIF orientation N shows it upright
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def colour_at(view: np.ndarray, y: int, x: int) -> str:
    return min(COLOURS, key=lambda c: sum((int(a) - b) ** 2 for a, b in zip(view[y, x], COLOURS[c])))


def with_orientation(upright: Image.Image, orientation: int, fmt: str) -> bytes:
    stored = upright.transpose(INVERSE[orientation]) if orientation in INVERSE else upright
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(stored, fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))
    check = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))  # PIL's reading
    assert colour_at(check, 0, 0) == colour_at(np.asarray(upright), 0, 0)  # the test's own construction
    return data


def test_orientation_6_red_left_blue_right_reaches_the_model_upright_at_any_size(tmp_path):
    def sideways(width: int, height: int) -> bytes:
        stored = Image.new("RGB", (width, height), COLOURS["blue"])
        stored.paste(COLOURS["red"], (0, 0, width // 2, height))  # stored: red left, blue right
        exif = Image.Exif()
        exif[0x0112] = 6  # "rotate 90 degrees clockwise to view": red on top, blue below
        return encode(stored, "JPEG", exif=exif.tobytes(), quality=95)

    pictures = {"large.jpg": sideways(600, 300), "small.jpg": sideways(200, 100)}
    stored = shard_pictures(tmp_path, pictures, "--resize-max", "300")
    assert stored["small.jpg"] == pictures["small.jpg"]  # kept as is, EXIF and all
    assert Image.open(io.BytesIO(stored["large.jpg"])).size == (150, 300)  # re-encoded upright
    for name in pictures:
        for data in (pictures[name], stored[name], Image.open(io.BytesIO(pictures[name]))):
            for layout in LAYOUTS:
                view = model_view(data, layout)
                assert [colour_at(view, 56, 112), colour_at(view, 168, 112)] == ["red", "blue"], (name, layout)


def test_every_exif_orientation_gives_the_same_upright_picture_on_every_path(tmp_path):
    pictures = {}
    for width, height in ((600, 300), (200, 100)):  # re-encoded by --resize-max 300, and kept as is
        upright = Image.new("RGB", (width, height))
        for (left, top), colour in zip([(0, 0), (1, 0), (0, 1), (1, 1)], COLOURS):
            upright.paste(COLOURS[colour], (left * width // 2, top * height // 2,
                                            (left + 1) * width // 2, (top + 1) * height // 2))
        for fmt in ("JPEG", "PNG"):
            for orientation in range(1, 9):
                name = f"{width}-{orientation}.{fmt.lower()}"
                pictures[name] = with_orientation(upright, orientation, fmt)
    stored = shard_pictures(tmp_path, pictures, "--resize-max", "300")
    for name, original in pictures.items():
        if name.startswith("600"):
            assert Image.open(io.BytesIO(stored[name])).size == (300, 150), name
        else:
            assert stored[name] == original, name
        for data in (original, stored[name], Image.open(io.BytesIO(original))):
            for layout in LAYOUTS:
                view = model_view(data, layout)
                seen = [colour_at(view, y, x) for y in (56, 168) for x in (56, 168)]
                assert seen == list(COLOURS), (name, layout, seen)  # red green / blue yellow


# 3. Pixel limits: what the sharder keeps, the trainer accepts.

def test_the_pixel_limit_and_long_strips_agree_between_sharder_and_trainer(tmp_path):
    grey = {f"{w}x{h}.jpg": encode(Image.new("L", (w, h), 128), "JPEG")
            for w, h in [(9000, 8100), (6000, 6000), (1, 30000), (30000, 1)]}
    stored = shard_pictures(tmp_path / "default", grey)
    assert stored["9000x8100.jpg"] == "too_many_pixels"
    for layout in LAYOUTS:
        with pytest.raises(BadSample) as refused:
            model_view(grey["9000x8100.jpg"], layout)
        assert refused.value.reason == "image_too_large"
        for name in ("6000x6000.jpg", "1x30000.jpg", "30000x1.jpg"):
            assert stored[name] == grey[name]
            assert (model_view(stored[name], layout).astype(int) - 128).max() <= 1, (name, layout)

    limit = 100 * 50
    exif = Image.Exif()
    exif[0x0112] = 6
    edge = {"at.png": encode(Image.new("RGB", (100, 50)), "PNG"),
            "over.png": encode(Image.new("RGB", (101, 50)), "PNG"),
            "turned.jpg": encode(Image.new("RGB", (100, 50)), "JPEG", exif=exif.tobytes()),  # 50 x 100 upright
            "strip.png": encode(Image.new("RGB", (1, limit)), "PNG")}
    for flags in ((), ("--full-decode",), ("--resize-max", "64")):
        stored = shard_pictures(tmp_path / "-".join(("edge", *flags)), edge, "--max-pixels", str(limit), *flags)
        assert stored["over.png"] == "too_many_pixels"
        for layout in LAYOUTS:
            with pytest.raises(BadSample):
                model_view(edge["over.png"], layout, limit)
            for name in ("at.png", "turned.jpg", "strip.png"):
                assert model_view(stored[name], layout, limit).shape == (224, 224, 3)


# Every mode a decoder can produce: kept by the sharder means accepted by the trainer; refused means by both.

def png_variants() -> dict[str, bytes]:
    """Every PNG colour type and bit depth (12 x 9, random pixels), and each tRNS form of transparency."""
    state, found = np.random.RandomState(0), {}
    depths = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}  # colour type -> depths
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
    for colour_type, allowed in depths.items():
        for depth in allowed:
            row_bytes = math.ceil(12 * channels[colour_type] * depth / 8)
            pixels = state.randint(0, 256, 9 * row_bytes, np.uint8).tobytes()
            colours = state.randint(0, 256, 3 << depth, np.uint8).tobytes()  # a full palette for this depth
            palette = [(b"PLTE", colours)] if colour_type == 3 else []
            found[f"png-{colour_type}-{depth}.png"] = png(12, 9, colour_type, depth, pixels, *palette)
            sample = 2 if depth == 16 else 1  # bytes per sample; tRNS holds 2-byte samples
            key = {0: pixels[:sample], 2: pixels[:3 * sample], 3: bytes(range(0, 250, 20))}.get(colour_type)
            if key is not None and depth >= 8:
                if depth == 8 and colour_type != 3:  # 8-bit samples are written as 2 bytes in tRNS
                    key = b"".join(b"\0" + key[i:i + 1] for i in range(len(key)))
                found[f"png-{colour_type}-{depth}-trns.png"] = png(12, 9, colour_type, depth, pixels, *palette,
                                                                   (b"tRNS", key))
    return found


def mode_variants() -> dict[str, bytes]:
    """Pictures in the modes TIFF, GIF, WebP, BMP and JPEG decode to, plus two with no 8-bit reading."""
    rgba = Image.fromarray(np.random.RandomState(1).randint(0, 256, (9, 12, 4), np.uint8))
    ramp = np.tile(np.arange(12, dtype=np.float64) * 5000, (9, 1))  # 0..55000
    tiffs = {
        "I16": Image.fromarray(ramp.astype(np.uint16)),
        "I16B": Image.frombytes("I;16B", (12, 9), ramp.astype(">u2").tobytes()),
        "I-16-bit": Image.fromarray(ramp.astype(np.int32)),
        "I-8-bit": Image.fromarray((ramp / 300).astype(np.int32)),
        "F-unit": Image.fromarray((ramp / 6e4).astype(np.float32)),
        "F-16-bit": Image.fromarray(ramp.astype(np.float32)),
        "negative": Image.fromarray((ramp - 1).astype(np.int32)),  # no 8-bit reading: refused
        "nan": Image.fromarray(np.where(ramp > 0, np.nan, 0).astype(np.float32)),  # refused too
        "PA": rgba.convert("P").convert("PA"),
        **{mode: rgba.convert(mode) for mode in ("LAB", "CMYK", "YCbCr", "LA", "RGBA", "RGB", "1")},
    }
    found = {f"{name}.tif": encode(image, "TIFF") for name, image in tiffs.items()}
    found.update({f"{mode}.jpg": encode(rgba.convert(mode), "JPEG") for mode in ("L", "RGB", "CMYK")})
    found.update({"p.gif": encode(rgba.convert("P"), "GIF", transparency=3), "rgba.webp": encode(rgba, "WEBP"),
                  "rgb.bmp": encode(rgba.convert("RGB"), "BMP")})
    return found


def test_the_variants_cover_the_modes_decoders_produce():
    modes = {Image.open(io.BytesIO(data)).mode for data in {**png_variants(), **mode_variants()}.values()}
    assert modes >= {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "I;16", "I;16B", "I",
                     "F"}


@pytest.mark.parametrize("flags", [(), ("--full-decode",), ("--resize-max", "8")],
                         ids=["header-only", "full-decode", "resize-max"])
def test_whatever_the_sharder_keeps_the_trainer_accepts(tmp_path, flags):
    pictures = {**png_variants(), **mode_variants()}
    stored = shard_pictures(tmp_path, pictures, "--max-pixels", "200", *flags)
    refused = {name: reason for name, reason in stored.items() if isinstance(reason, str)}
    assert refused == {"negative.tif": UNSUPPORTED_MODE, "nan.tif": UNSUPPORTED_MODE}
    for name, data in pictures.items():
        for layout in LAYOUTS:
            if name in refused:
                with pytest.raises(BadSample) as caught:
                    model_view(data, layout, 200)
                assert caught.value.reason == refused[name]
            else:
                view = model_view(stored[name], layout, 200)
                assert view.shape == (224, 224, 3), (name, layout)


def test_header_only_checks_do_not_import_torch():
    code = ("import io, sys; from PIL import Image; from data_tools.validate import check_image\n"
            "for fmt in ('JPEG', 'PNG'):\n"
            "    out = io.BytesIO(); Image.new('RGB', (8, 8)).save(out, fmt)\n"
            "    check_image(out.getvalue(), 'x', max_pixels=100)\n"
            "assert 'torch' not in sys.modules, 'the header-only path imported torch'")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
