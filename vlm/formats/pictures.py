"""How a decoded picture is read, the same by every path (sharder, training, eval, chat): upright by its EXIF
orientation, in 8 bits, then RGB with transparency on white. Pillow and numpy only (no torch), so the
sharder's workers can apply the trainer's rules without loading torch.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from vlm.formats.errors import BadSample

UNSUPPORTED_MODE = "unsupported_image_mode"
"""BadSample reason for a picture with no 8-bit reading (`to_8bit`); the sharder skips it with this reason."""
_TRANSPOSE = {  # EXIF orientation -> the transpose that makes the picture upright (as in ImageOps)
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_METADATA = ("exif", "Raw profile type exif", "XML:com.adobe.xmp", "xmp")  # where PIL finds an orientation
_PLAIN_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"})
_PREMULTIPLIED = {"La": "LA", "RGBa": "RGBA"}


def orient(image: Image.Image) -> Image.Image:
    """The picture upright: its EXIF orientation (tag 274, or XMP's, as PIL and `ImageOps.exif_transpose` read
    it) applied; width and height swap for orientations 5..8, so the pixel count (and limit) is unchanged.

    Returns `image` itself when there is nothing to do (no tag, 1, an unknown value, or an EXIF block PIL
    cannot parse), else a new image without EXIF or XMP, so applying `orient` twice does not turn it twice.
    HF's CLIP and SigLIP processors ignore EXIF; every path here (sharder, training, eval, chat) applies it.
    A PNG's eXIf chunk may follow its pixel data: PIL then decodes the picture to read it, so call after load().
    """
    try:
        method = _TRANSPOSE.get(image.getexif().get(0x0112, 1))
    except Exception:  # a malformed EXIF block: read as no orientation, by every path alike
        return image
    if method is None:
        return image
    upright = image.transpose(method)
    for key in _METADATA:
        upright.info.pop(key, None)
    return upright


def to_8bit(image: Image.Image) -> Image.Image:
    """The picture in a mode PIL converts to RGB(A) without loss of meaning; ordinary modes come back as they are.

    - I;16, I;16L, I;16B, I;16N (16-bit grey: PNG, TIFF): the high byte `v >> 8`, which is how PIL reads 48-bit
      RGB PNGs, so grey and colour 16-bit pictures agree; a `transparency` value becomes an alpha band (LA).
    - I (32-bit integers): all values in 0..255 are 8-bit data, kept as they are (as PIL and HF read them);
      values in 0..65535 with one above 255 are 16-bit data (as older Pillows load 16-bit PNGs): `v >> 8`.
      The values alone decide, so a 16-bit picture darker than 256/65536 everywhere reads as 8-bit data.
    - F (32-bit float): values in 0..1 are the unit range (times 255, rounded); otherwise as I (PIL's reading
      for 0..255, the whole part of v / 256 for 0..65535).
    - La, RGBa (premultiplied alpha): LA, RGBA. 1, L, LA, P, PA, RGB, RGBA, RGBX, CMYK, YCbCr, LAB, HSV: as is.

    Raises BadSample(UNSUPPORTED_MODE) for I or F values outside 0..65535 (or not finite) and other modes.
    """
    mode = image.mode
    if mode in _PLAIN_MODES:
        return image
    if mode in _PREMULTIPLIED:
        return image.convert(_PREMULTIPLIED[mode])
    if mode.startswith("I;16"):
        values = np.asarray(image)  # (H, W) uint16, in the mode's byte order
        grey = Image.fromarray((values >> 8).astype(np.uint8))
        key = image.info.get("transparency")
        if isinstance(key, int):  # tRNS of a 16-bit grey PNG: the 16-bit value that is see-through
            grey.putalpha(Image.fromarray(np.where(values == key, 0, 255).astype(np.uint8)))
        return grey
    if mode not in ("I", "F"):
        raise BadSample(UNSUPPORTED_MODE, f"PIL mode {mode!r} has no 8-bit RGB reading")
    values = np.asarray(image)  # (H, W) int32 or float32
    low, high = values.min(), values.max()
    if not (np.isfinite(low) and np.isfinite(high) and 0 <= low and high <= 65535):
        raise BadSample(UNSUPPORTED_MODE, f"mode {mode} values {low}..{high} fit neither 0..255 nor 0..65535")
    if mode == "F":  # PIL's F -> L keeps the whole part, clipped to 0..255
        scaled = values * 255 + 0.5 if high <= 1 else values if high <= 255 else values / 256
        return Image.fromarray(scaled.astype(np.float32)).convert("L")
    return Image.fromarray((values if high <= 255 else values >> 8).astype(np.uint8))


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB: `to_8bit`, then transparency composited onto white as the HF processors (CLIP and SigLIP
    alike) do it. Raises BadSample(UNSUPPORTED_MODE) as `to_8bit` does."""
    image = to_8bit(image)
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")
