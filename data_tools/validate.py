"""Checks for the images of one record; each failure is a `BadSample(reason, detail)`.

Used by `python -m data_tools.shard`; the record's text is checked by `vlm.formats.records`, the same rules
the trainer applies. Reasons are stable codes that appear in manifest.json:

    unsafe_image_path missing_image empty_image bad_image truncated_image too_many_pixels
    unsupported_image_mode

Image checks at the default level are cheap and decode no pixels: JPEG and PNG headers are parsed here
(markers up to the frame header; IHDR), the pixel count is compared with the limit before anything is
decoded, a JPEG must end its last scan with an EOI marker, and a PNG must reach IEND with every chunk's CRC
correct (read, not inflated). Anything else goes to PIL restricted to `vlm.formats.constants.IMAGE_FORMATS` (so no
exotic or external-program decoder is reached), with PIL's own bomb guard, and is always fully decoded;
such files are rare in these corpora. `full_decode=True` decodes every image with PIL; bit flips inside
JPEG entropy-coded data are only found that way, if at all.

A decoded picture is also read as the trainer reads it (`vlm.formats.pictures.orient` and `to_8bit`, the one
source of both rules): a mode or range the trainer refuses is skipped here with the same reason
(unsupported_image_mode), and a re-encoded picture (`resize_max`) is stored upright and in 8 bits, as the
trainer would see the original (16-bit grey scaled, not clipped to white), without EXIF. Kept bytes keep
their EXIF: the trainer applies the orientation when it decodes them, so every path sees the same upright
picture. JPEG and PNG decode only to modes the trainer reads, so the header-only path needs no such check.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from dataclasses import dataclass

from vlm.formats.constants import IMAGE_FORMATS
from vlm.formats.errors import BadSample

_EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif"}
_JPEG_SIGNATURE = b"\xff\xd8\xff"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Start-of-frame markers (baseline, extended, progressive, lossless; Huffman or arithmetic) carry the size.
_JPEG_FRAME_MARKERS = frozenset((0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF))


@dataclass(frozen=True)
class CheckedImage:
    """An image that passed the checks: the bytes to store, their member extension, (width, height) in px."""

    data: bytes  # what goes into the shard: the original bytes, or the re-encoded ones after a resize
    ext: str  # member extension from the decoded format: jpg, png, webp, gif, bmp
    size: tuple[int, int]  # (width, height) of `data`


def check_image(data: bytes, name: str, max_pixels: int, full_decode: bool = False,
                resize_max: int | None = None) -> CheckedImage:
    """Validate image bytes (see module docstring); optionally shrink so the longer side <= resize_max."""
    if data.startswith(_JPEG_SIGNATURE):
        ext, size = "jpg", _jpeg_size(data, name)
    elif data.startswith(_PNG_SIGNATURE):
        ext, size = "png", _png_size(data, name)
    else:
        ext, size = None, (0, 0)
    _check_pixels(size, name, max_pixels)
    if ext is not None and not full_decode and not (resize_max and max(size) > resize_max):
        return CheckedImage(data, ext, size)
    image = _open(data, name)
    _check_pixels(image.size, name, max_pixels)
    _decode(image, name)
    upright = _as_the_trainer_reads(image, name)
    if resize_max and max(image.size) > resize_max:
        return _shrink(upright, image.format in ("JPEG", "MPO"), resize_max)
    return CheckedImage(data, _EXTENSIONS[image.format], image.size)


def _check_pixels(size: tuple[int, int], name: str, max_pixels: int) -> None:
    if size[0] * size[1] > max_pixels:
        raise BadSample("too_many_pixels", f"{name!r} is {size[0]}x{size[1]}, above --max-pixels {max_pixels}")


def _jpeg_size(data: bytes, name: str) -> tuple[int, int]:
    """(width, height) from the frame header, after walking the markers before it; then the end check.

    Marker bytes FF D9 (EOI) and FF DA (SOS) cannot occur inside entropy-coded data (FF is stuffed as
    FF 00), so a complete file has an EOI after its last scan; an EXIF thumbnail's EOI comes earlier.
    """
    pos, size = 2, None
    while size is None:
        if pos + 4 > len(data):
            raise BadSample("truncated_image", f"{name!r}: JPEG data ends inside its header")
        if data[pos] != 0xFF:
            raise BadSample("bad_image", f"{name!r}: corrupt JPEG header (no marker at byte {pos})")
        marker = data[pos + 1]
        if marker == 0xFF or 0xD0 <= marker <= 0xD8 or marker == 0x01:
            pos += 1 if marker == 0xFF else 2  # fill byte or a marker without a length
            continue
        if marker in (0xD9, 0xDA):
            raise BadSample("bad_image", f"{name!r}: JPEG scan or end before any frame header")
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if marker in _JPEG_FRAME_MARKERS and pos + 9 <= len(data):
            size = (int.from_bytes(data[pos + 7:pos + 9], "big"), int.from_bytes(data[pos + 5:pos + 7], "big"))
        pos += 2 + length
    if 0 in size:
        raise BadSample("bad_image", f"{name!r}: JPEG frame header gives size {size[0]}x{size[1]}")
    if data.rfind(b"\xff\xd9") < data.rfind(b"\xff\xda") or b"\xff\xda" not in data:
        raise BadSample("truncated_image", f"{name!r}: JPEG data ends before its end-of-image marker")
    return size


def _png_size(data: bytes, name: str) -> tuple[int, int]:
    """(width, height) from IHDR, after checking every chunk's CRC up to IEND (nothing is inflated)."""
    view, pos = memoryview(data), 8
    if data[12:16] != b"IHDR" or len(data) < 33:
        raise BadSample("bad_image" if len(data) >= 33 else "truncated_image", f"{name!r}: PNG without IHDR")
    width, height = struct.unpack(">II", data[16:24])
    if not width or not height:
        raise BadSample("bad_image", f"{name!r}: PNG header gives size {width}x{height}")
    while True:
        if pos + 12 > len(data):
            raise BadSample("truncated_image", f"{name!r}: PNG data ends before its IEND chunk")
        length = int.from_bytes(data[pos:pos + 4], "big")
        end = pos + 8 + length
        if end + 4 > len(data):
            raise BadSample("truncated_image", f"{name!r}: PNG data ends inside a chunk")
        if zlib.crc32(view[pos + 4:end]) != int.from_bytes(data[end:end + 4], "big"):
            kind = data[pos + 4:pos + 8].decode("latin-1")
            raise BadSample("bad_image", f"{name!r}: corrupt PNG (CRC mismatch in chunk {kind!r} at byte {pos})")
        if data[pos + 4:pos + 8] == b"IEND":
            return width, height
        pos = end + 4


def _open(data: bytes, name: str):
    from PIL import Image

    # PIL's own bomb check runs inside open(), against its global limit; turn its warning into an error and
    # report both as too_many_pixels. Our limit is checked by the caller from the header size.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            return Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise BadSample("too_many_pixels", f"{name!r}: {e}") from e
        except Image.UnidentifiedImageError as e:
            raise BadSample("bad_image", f"{name!r} is not a readable JPEG, PNG, WebP, GIF, BMP or TIFF") from e
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise BadSample("bad_image", f"{name!r}: {e}") from e


def _decode(image, name: str) -> None:
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        reason = "truncated_image" if "truncated" in str(e) else "bad_image"
        raise BadSample(reason, f"{name!r} does not decode: {e}") from e


def _as_the_trainer_reads(image, name: str):
    from vlm.formats.pictures import orient, to_8bit

    """The decoded picture upright and in 8 bits, or the trainer's BadSample (same reason), naming the file."""
    try:
        return to_8bit(orient(image))
    except BadSample as e:
        raise BadSample(e.reason, f"{name!r}: {e.detail}") from e


def _shrink(image, is_jpeg: bool, resize_max: int) -> CheckedImage:
    from PIL import Image

    """Resize an upright 8-bit picture so the longer side is resize_max; JPEG stays JPEG (quality 90), anything
    else becomes PNG (L, LA, RGB or RGBA; alpha kept for the trainer to composite). No EXIF is written."""
    if is_jpeg:
        image = image.convert("L" if image.mode == "L" else "RGB")
    elif image.mode not in ("L", "LA", "RGB", "RGBA"):
        # Before resizing: P and 1 would otherwise be resampled as nearest neighbour.
        image = image.convert("L" if image.mode == "1" else "RGBA")
    scale = resize_max / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    image = image.resize(size, Image.Resampling.BICUBIC)
    out = io.BytesIO()
    image.save(out, "JPEG" if is_jpeg else "PNG", **({"quality": 90} if is_jpeg else {}))
    return CheckedImage(out.getvalue(), "jpg" if is_jpeg else "png", image.size)
