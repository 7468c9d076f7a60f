"""Finding and decoding images into 8-bit RGB, with errors that name the file.

Pillow decodes 8-bit images, exactly as it always did here. Remote sensing also delivers 16-bit, float and
multi-band files, which Pillow truncates, misreads or cannot identify; those go through rasterio (GDAL),
and :class:`ImageDecoding` says how their bands and samples become RGB.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from PIL import Image, UnidentifiedImageError

from utils.config import ConfigError, did_you_mean

_SCALES = ("depth", "percentile")
_PILLOW_BANDS = ("L", "LA", "RGB", "RGBA")
_TIFF_SAMPLES_PER_PIXEL, _TIFF_SAMPLE_FORMAT, _TIFF_UNSIGNED = 277, 339, 1
Stretch = tuple[tuple[float, float], ...]  # (low, high) per selected band: a scene's percentile limits
_SAMPLE_TYPES = frozenset({"uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64",
                           "float16", "float32", "float64"})


class ImageDecodeError(ValueError):
    """The file reads, but its samples or its bands cannot become an RGB image; the message names the file."""


@dataclass(frozen=True)
class ImageDecoding:
    """How an image's bands and samples become 8-bit RGB.

    ``bands`` (1-based, as GDAL counts them; 1 or 3 of them) are read as grey or RGB; by default one band is
    grey, two bands are grey + alpha (band 1 is used), three or more are RGB from bands 1, 2, 3. uint8
    samples are used as they are. Other samples become 0..255 by ``scale``: ``depth`` divides by
    ``value_max`` (default: the integer dtype's maximum, 1 for floats); ``percentile`` maps each band's
    ``percentiles`` (NaN ignored, numpy's linear interpolation) to 0 and 1, and a constant band to 0. Then
    the result is clipped to [0, 1], NaN becomes 0, and it is multiplied by 255 and rounded (half to even).
    """

    scale: str = "depth"
    value_max: float | None = None
    percentiles: tuple[float, float] = (2.0, 98.0)
    bands: tuple[int, ...] | None = None

    @classmethod
    def from_config(cls, section: Mapping[str, Any]) -> ImageDecoding:
        """The config's ``image_decode`` section, checked; errors name the key ``image_decode.<key>``."""
        known = [f.name for f in fields(cls)]
        for name in section:
            if name not in known:
                raise ConfigError(f"unknown key 'image_decode.{name}'{did_you_mean(str(name), known, 'image_decode.')}")
        default = cls()
        scale = section.get("scale", default.scale)
        if scale not in _SCALES:
            raise ConfigError(f"image_decode.scale: {scale!r} is not one of {list(_SCALES)}")
        value_max = section.get("value_max", default.value_max)
        if value_max is not None and not (_is_number(value_max) and 0 < value_max < float("inf")):
            raise ConfigError(f"image_decode.value_max: expected a positive number, got {value_max!r}")
        percentiles = section.get("percentiles", default.percentiles)
        if not (isinstance(percentiles, (list, tuple)) and len(percentiles) == 2
                and all(map(_is_number, percentiles)) and 0 <= percentiles[0] < percentiles[1] <= 100):
            raise ConfigError(f"image_decode.percentiles: expected [low, high] with 0 <= low < high <= 100, "
                              f"got {percentiles!r}")
        bands = section.get("bands", default.bands)
        if bands is not None and not (isinstance(bands, (list, tuple)) and len(bands) in (1, 3) and all(
                isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in bands)):
            raise ConfigError(f"image_decode.bands: expected 1 or 3 band numbers counted from 1, got {bands!r}")
        return cls(scale, None if value_max is None else float(value_max),
                   (float(percentiles[0]), float(percentiles[1])), None if bands is None else tuple(bands))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def candidate_paths(image_root: str, image: str) -> list[str]:
    """``image_root/image``, then ``image_root/basename(image)`` (public JSONs carry train/val/test prefixes
    that flat image folders do not have)."""
    first = os.path.join(image_root, image)
    second = os.path.join(image_root, os.path.basename(image))
    return [first] if first == second else [first, second]


def resolve_image_path(image_root: str, image: str) -> str | None:
    """The first existing candidate path, or ``None``."""
    return next((p for p in candidate_paths(image_root, image) if os.path.isfile(p)), None)


def load_rgb(path: str | Path, decoding: ImageDecoding | None = None) -> Image.Image:
    """Decode fully (so truncated files fail here, not later) into 8-bit RGB.

    Pillow decodes the images whose samples its mode shows as they are (8-bit); rasterio decodes the rest
    by ``decoding`` (default ``ImageDecoding()``). A file neither reads is an ``OSError``, as Pillow's are.
    """
    decoding = ImageDecoding() if decoding is None else decoding
    try:
        img = Image.open(path)
    except UnidentifiedImageError:
        return _raster_rgb(path, decoding, "Pillow cannot identify it")
    with img:
        if _pillow_shows_samples(img, path):
            img.load()
            return img.convert("RGB") if decoding.bands is None else _pillow_bands(img, decoding.bands, path)
        mode = img.mode
    return _raster_rgb(path, decoding, f"Pillow reads it as mode {mode}")


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) from the file's header, without decoding its samples (rasterio for what Pillow cannot
    identify)."""
    try:
        with Image.open(path) as img:
            return img.size
    except UnidentifiedImageError:
        import rasterio  # as in _read_raster: only for the files that need it
        from rasterio.errors import NotGeoreferencedWarning

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)  # plain images carry no georeference
            with rasterio.open(path) as source:
                return source.width, source.height


def decode_problem(path: str | Path, decoding: ImageDecoding | None = None) -> str | None:
    """Why ``path`` does not decode (``"cannot decode image PATH: ..."``), or ``None`` when it does: the one
    message every image check gives."""
    try:
        load_rgb(path, decoding)
    except Exception as err:  # Pillow and rasterio raise several types for corrupt files
        return f"cannot decode image {path}: {err}"
    return None


def _pillow_shows_samples(img: Image.Image, path: str | Path) -> bool:
    """False where Pillow's mode hides the samples: high-depth modes, 16-bit PNG colour (truncated to its high
    byte), JPEG2000 (mode RGB whatever the depth), TIFFs with extra, signed or float samples."""
    if img.mode.startswith("I") or img.mode == "F" or img.format == "JPEG2000":
        return False
    if img.format == "PNG":
        return _png_bit_depth(path) != 16
    if img.format == "TIFF":
        tags = img.tag_v2
        return (tags.get(_TIFF_SAMPLES_PER_PIXEL, 1) == len(img.getbands())
                and set(tags.get(_TIFF_SAMPLE_FORMAT, (_TIFF_UNSIGNED,))) == {_TIFF_UNSIGNED})
    return True


def _png_bit_depth(path: str | Path) -> int:
    with open(path, "rb") as handle:
        handle.seek(24)  # signature, IHDR length and type, width, height
        return handle.read(1)[0]


def _pillow_bands(img: Image.Image, bands: tuple[int, ...], path: str | Path) -> Image.Image:
    """Select ``bands`` of an 8-bit image: L, LA, RGB and RGBA count their channels as GDAL does; other modes
    (palette, CMYK, ...) are converted to RGB first, so that bands count R, G, B."""
    if img.mode not in _PILLOW_BANDS:
        img = img.convert("RGB")
    pixels = np.asarray(img).reshape(img.height, img.width, -1)
    return _rgb(pixels[..., [b - 1 for b in _band_numbers(bands, pixels.shape[2], path)]])


def _band_numbers(bands: tuple[int, ...] | None, count: int, path: str | Path) -> list[int]:
    """The 1-based bands to read: ``bands``, or band 1 of one or two bands (grey, grey + alpha), else 1, 2, 3."""
    if bands is None:
        return [1] if count < 3 else [1, 2, 3]
    beyond = [b for b in bands if b > count]
    if beyond:
        raise ImageDecodeError(f"{path}: has {count} band(s), so band {beyond[0]} of bands {list(bands)} "
                               f"does not exist")
    return list(bands)


def load_rgb_window(path: str | Path, window: tuple[int, int, int, int], decoding: ImageDecoding | None = None,
                    stretch: Stretch | None = None) -> Image.Image:
    """One ``(col_off, row_off, width, height)`` window of a raster (a tile of a large scene) as 8-bit RGB by
    the rules of :class:`ImageDecoding`; only that window is read, so a scene never has to fit in memory. A
    ``percentile`` stretch uses ``stretch`` (the scene's, from :func:`scene_stretch`, so that all its tiles
    are stretched alike) or, without it, the window's own percentiles."""
    decoding = ImageDecoding() if decoding is None else decoding
    planes = _read_raster(path, decoding.bands, "a window of a scene", window)
    return _rgb(np.moveaxis(_to_uint8(planes, decoding, stretch), 0, -1))


def scene_stretch(path: str | Path, decoding: ImageDecoding, long_side: int = 1024) -> Stretch | None:
    """Each selected band's (low, high) ``percentiles`` over the whole raster, read decimated to at most
    ``long_side`` pixels: the limits a ``percentile`` decoding applies
    to every tile of the scene. None when no stretch applies (``depth`` scale, or uint8 samples)."""
    if decoding.scale != "percentile":
        return None
    planes = _read_raster(path, decoding.bands, "a scene", long_side=long_side)
    if planes.dtype == np.uint8:
        return None
    low, high = _band_percentiles(planes.astype(np.float64), decoding.percentiles)
    return tuple((float(lo), float(hi)) for lo, hi in zip(low.ravel(), high.ravel()))


def _raster_rgb(path: str | Path, decoding: ImageDecoding, why: str) -> Image.Image:
    planes = _read_raster(path, decoding.bands, why)
    return _rgb(np.moveaxis(_to_uint8(planes, decoding), 0, -1))


def _read_raster(path: str | Path, bands: tuple[int, ...] | None, why: str,
                 window: tuple[int, int, int, int] | None = None, long_side: int | None = None) -> np.ndarray:
    """The selected bands as (bands, height, width), in the file's dtype: the whole raster, one
    ``(col_off, row_off, width, height)`` window of it, or the whole raster decimated (nearest sample) to at
    most ``long_side`` pixels."""
    import rasterio  # here, not at the top: 8-bit datasets never pay its 0.6 s import
    from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
    from rasterio.windows import Window

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)  # plain images carry no georeference
        try:
            source = rasterio.open(path)
        except RasterioIOError as err:
            raise UnidentifiedImageError(f"cannot identify image file {path}: {why}, and rasterio (GDAL) "
                                         f"cannot open it: {err}") from err
    with source:
        numbers = _band_numbers(bands, source.count, path)
        dtypes = sorted({source.dtypes[b - 1] for b in numbers})
        if not _SAMPLE_TYPES.issuperset(dtypes):
            raise ImageDecodeError(f"{path}: cannot decode {'/'.join(dtypes)} samples (only integers and floats)")
        shape = None
        if long_side is not None and max(source.width, source.height) > long_side:
            factor = max(source.width, source.height) / long_side
            shape = (len(numbers), max(1, round(source.height / factor)), max(1, round(source.width / factor)))
        try:
            return source.read(numbers, window=None if window is None else Window(*window), out_shape=shape)
        except RasterioIOError as err:
            raise OSError(f"{path}: rasterio (GDAL) cannot read its samples: {err.__cause__ or err}") from err


def _to_uint8(raw: np.ndarray, decoding: ImageDecoding, stretch: Stretch | None = None) -> np.ndarray:
    """Samples of (bands, height, width) as uint8 by the rule of :class:`ImageDecoding`; a ``percentile``
    decoding uses the (low, high) of ``stretch`` when given, else the samples' own percentiles."""
    if raw.dtype == np.uint8:
        return raw
    data = raw.astype(np.float64)
    if decoding.scale == "percentile":
        unit = _stretch(data, decoding.percentiles, stretch)
    else:
        top = decoding.value_max
        if top is None:
            top = float(np.iinfo(raw.dtype).max) if raw.dtype.kind in "iu" else 1.0
        unit = data / top
    return np.rint(np.clip(np.nan_to_num(unit, nan=0.0), 0.0, 1.0) * 255.0).astype(np.uint8)


def _band_percentiles(data: np.ndarray, percentiles: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Each band's low and high percentile (NaN ignored; an all-NaN band: 0, 0), shaped (bands, 1, 1)."""
    empty = np.isnan(data).all(axis=(1, 2), keepdims=True)
    low, high = np.nanpercentile(np.where(empty, 0.0, data), percentiles, axis=(1, 2), keepdims=True)
    return low, high


def _stretch(data: np.ndarray, percentiles: tuple[float, float], limits: Stretch | None = None) -> np.ndarray:
    """Each band's low/high percentile (NaN ignored), or its given ``limits``, to 0/1; a constant or all-NaN
    band to 0."""
    if limits is None:
        low, high = _band_percentiles(data, percentiles)
    else:
        low, high = (np.asarray(column, dtype=np.float64).reshape(-1, 1, 1) for column in zip(*limits))
    span = high - low
    return np.divide(data - low, span, out=np.zeros_like(data), where=span > 0)


def _rgb(pixels: np.ndarray) -> Image.Image:
    """(height, width, 1 or 3) uint8 to an RGB image, grey replicated."""
    if pixels.shape[2] == 1:
        pixels = np.repeat(pixels, 3, axis=2)
    return Image.fromarray(np.ascontiguousarray(pixels))
