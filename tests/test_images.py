"""Image decoding as remote sensing delivers it: 16-bit, float and multi-band files become 8-bit RGB by the
documented rule, and 8-bit files decode exactly as Pillow always decoded them here.

Every file is real, written by rasterio (GDAL) or Pillow into ``tmp_path``; every expected image is the
rule computed here with numpy.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
from PIL import Image
from rasterio.errors import NotGeoreferencedWarning

from conftest import MINIMAL_CONFIG
from dataset.images import ImageDecodeError, ImageDecoding, load_rgb
from utils.config import ConfigError, load_config

H, W = 7, 9
DRIVERS = {".png": "PNG", ".tif": "GTiff", ".jpg": "JPEG", ".jp2": "JP2OpenJPEG"}


# ----------------------------------------------------------------------------- helpers


def write_raster(path: Path, planes: np.ndarray, **options: object) -> Path:
    """A real file of (bands, height, width) samples; the driver follows the extension."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path, "w", driver=DRIVERS[path.suffix], width=planes.shape[2], height=planes.shape[1],
                           count=planes.shape[0], dtype=planes.dtype, **options) as out:
            out.write(planes)
    return path


def gradients(bands: int, dtype: str, top: int) -> np.ndarray:
    """Bands of distinct gradients over 0..top (each band shifted and flipped differently)."""
    ramp = np.linspace(0, top, H * W).reshape(H, W)
    planes = [np.roll(ramp, 5 * k, axis=1)[:, ::-1] if k % 2 else np.roll(ramp, 5 * k, axis=0) for k in range(bands)]
    return np.rint(np.stack(planes)).astype(dtype)


def to_255(unit: np.ndarray) -> np.ndarray:
    """The rule's last step: clip to [0, 1], NaN to 0, x 255, round half to even."""
    return np.rint(np.clip(np.nan_to_num(unit, nan=0.0), 0, 1) * 255).astype(np.uint8)


def depth(planes: np.ndarray, top: float) -> np.ndarray:
    return to_255(planes.astype(np.float64) / top)


def stretch(planes: np.ndarray, low: float, high: float) -> np.ndarray:
    out = []
    for band in planes.astype(np.float64):
        lo, hi = np.nanpercentile(band, [low, high]) if not np.isnan(band).all() else (0.0, 0.0)
        out.append(to_255((band - lo) / (hi - lo)) if hi > lo else np.zeros(band.shape, np.uint8))
    return np.stack(out)


def rgb(planes: np.ndarray) -> np.ndarray:
    """(1 or 3, h, w) uint8 as the (h, w, 3) RGB the loader returns, grey replicated."""
    return np.moveaxis(np.repeat(planes, 3, axis=0) if len(planes) == 1 else planes, 0, -1)


def decoded(path: Path, **decoding: object) -> np.ndarray:
    image = load_rgb(path, ImageDecoding(**decoding)) if decoding else load_rgb(path)
    assert image.mode == "RGB" and image.size == (W, H)
    return np.asarray(image)


# ----------------------------------------------------------------------------- 16-bit and float: depth rule


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16bit_grey_is_divided_by_65535(tmp_path: Path, suffix: str) -> None:
    planes = gradients(1, "uint16", 65535)
    path = write_raster(tmp_path / f"grey16{suffix}", planes)
    with Image.open(path) as img:
        assert img.mode == "I;16"  # Pillow's convert("RGB") of this is all white
    assert np.array_equal(decoded(path), rgb(depth(planes, 65535)))


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16bit_rgb_keeps_every_band(tmp_path: Path, suffix: str) -> None:
    planes = gradients(3, "uint16", 65535)
    path = write_raster(tmp_path / f"rgb16{suffix}", planes)
    assert np.array_equal(decoded(path), rgb(depth(planes, 65535)))


def test_16bit_rgb_jpeg2000(tmp_path: Path) -> None:
    planes = gradients(3, "uint16", 65535)
    path = write_raster(tmp_path / "rgb16.jp2", planes, QUALITY=100, REVERSIBLE="YES")
    assert np.array_equal(decoded(path), rgb(depth(planes, 65535)))


def test_value_max_sets_the_white_point(tmp_path: Path) -> None:
    planes = gradients(3, "uint16", 5000)  # 12-bit sensor data in uint16, and values above 4095
    path = write_raster(tmp_path / "sensor12.tif", planes)
    pixels = decoded(path, value_max=4095.0)
    assert np.array_equal(pixels, rgb(depth(planes, 4095)))
    assert (pixels[np.moveaxis(planes, 0, -1) >= 4095] == 255).all()


def test_signed_integers_clip_negatives_to_0(tmp_path: Path) -> None:
    planes = gradients(1, "int16", 32767) - np.int16(9000)
    path = write_raster(tmp_path / "signed.tif", planes)
    pixels = decoded(path)
    assert np.array_equal(pixels, rgb(depth(planes, 32767)))
    assert (pixels[planes[0] < 0] == 0).all() and (planes < 0).any()


@pytest.mark.parametrize("bands", [1, 3])
def test_floats_are_taken_in_0_1_and_nan_is_0(tmp_path: Path, bands: int) -> None:
    planes = (gradients(bands, "float64", 1000) / 1000 * 1.4 - 0.2).astype(np.float32)  # -0.2 .. 1.2
    planes[0, 0, :3] = np.nan
    path = write_raster(tmp_path / f"float{bands}.tif", planes)
    pixels = decoded(path)
    assert np.array_equal(pixels, rgb(depth(planes, 1.0)))
    assert (pixels[0, :3, 0] == 0).all() and (pixels == 255).any() and (pixels == 0).sum() > 3
    assert np.array_equal(decoded(path, value_max=2.0), rgb(depth(planes, 2.0)))


# ----------------------------------------------------------------------------- bands


@pytest.mark.parametrize("name", ["four16.tif", "rgba16.png"])
def test_four_bands_default_to_bands_1_2_3(tmp_path: Path, name: str) -> None:
    planes = gradients(4, "uint16", 65535)
    path = write_raster(tmp_path / name, planes)
    assert np.array_equal(decoded(path), rgb(depth(planes[:3], 65535)))


def test_bands_select_and_reorder(tmp_path: Path) -> None:
    planes = gradients(4, "uint16", 65535)
    path = write_raster(tmp_path / "four16.tif", planes)
    assert np.array_equal(decoded(path, bands=(3, 2, 1)), rgb(depth(planes[[2, 1, 0]], 65535)))
    assert np.array_equal(decoded(path, bands=(4,)), rgb(depth(planes[[3]], 65535)))


def test_two_bands_are_grey_and_alpha(tmp_path: Path) -> None:
    planes = gradients(2, "uint16", 65535)
    path = write_raster(tmp_path / "grey_alpha16.png", planes)
    assert np.array_equal(decoded(path), rgb(depth(planes[:1], 65535)))


# ----------------------------------------------------------------------------- percentile rule


def test_percentile_stretch_per_band(tmp_path: Path) -> None:
    planes = gradients(4, "uint16", 65535)
    planes[3] = 1234  # a constant band
    path = write_raster(tmp_path / "four16.tif", planes)
    pixels = decoded(path, scale="percentile", percentiles=(2.0, 98.0))
    assert np.array_equal(pixels, rgb(stretch(planes[:3], 2, 98)))
    assert pixels.min() == 0 and pixels.max() == 255
    assert np.array_equal(decoded(path, scale="percentile", percentiles=(10.0, 60.0), bands=(2, 4, 1)),
                          rgb(stretch(planes[[1, 3, 0]], 10, 60)))
    assert (decoded(path, scale="percentile", bands=(4,)) == 0).all()


def test_percentile_full_range_is_a_linear_map(tmp_path: Path) -> None:
    planes = np.arange(H * W, dtype=np.uint16).reshape(1, H, W) * 100 + 300
    path = write_raster(tmp_path / "ramp.png", planes)
    expected = to_255((planes.astype(np.float64) - 300) / ((H * W - 1) * 100))
    assert np.array_equal(decoded(path, scale="percentile", percentiles=(0.0, 100.0)), rgb(expected))


def test_percentile_ignores_nan(tmp_path: Path) -> None:
    planes = gradients(3, "float64", 1000).astype(np.float32) + 50.0
    planes[0, :, :2] = np.nan
    planes[1] = np.nan  # a band of nodata only
    path = write_raster(tmp_path / "float_nodata.tif", planes)
    pixels = decoded(path, scale="percentile", percentiles=(0.0, 100.0))
    band = planes[0].astype(np.float64)
    valid = band[~np.isnan(band)]
    assert np.array_equal(pixels[..., 0], to_255((band - valid.min()) / (valid.max() - valid.min())))
    assert (pixels[:, :2, 0] == 0).all() and pixels[..., 0].max() == 255
    assert (pixels[..., 1] == 0).all()
    assert np.array_equal(pixels, rgb(stretch(planes, 0, 100)))


# ----------------------------------------------------------------------------- 8-bit files: Pillow, as before


def write_pillow(path: Path, mode: str) -> Path:
    pixels = np.moveaxis(gradients(len(mode), "uint8", 255), 0, -1)
    Image.fromarray(pixels.squeeze(-1) if mode == "L" else pixels, mode).save(path)
    return path


def eight_bit_files(tmp_path: Path) -> list[Path]:
    rgb_planes = gradients(3, "uint8", 255)
    palette = Image.fromarray(np.moveaxis(rgb_planes, 0, -1)).quantize(16)
    palette.save(tmp_path / "palette.png")
    return [write_raster(tmp_path / f"rgb8{suffix}", rgb_planes) for suffix in (".png", ".jpg", ".tif")] + [
        write_raster(tmp_path / "grey8.png", rgb_planes[:1]), write_pillow(tmp_path / "rgba8.png", "RGBA"),
        write_pillow(tmp_path / "grey8.jpg", "L"), tmp_path / "palette.png"]


def test_8bit_files_decode_as_pillow_converts_them(tmp_path: Path) -> None:
    for path in eight_bit_files(tmp_path):
        with Image.open(path) as img:
            expected = np.asarray(img.convert("RGB"))
        assert np.array_equal(decoded(path), expected), path
        assert np.array_equal(decoded(path, scale="percentile", value_max=9.0), expected), path


def test_bands_apply_to_8bit_files(tmp_path: Path) -> None:
    planes = gradients(3, "uint8", 255)
    for suffix in (".png", ".jpg", ".tif"):
        path = write_raster(tmp_path / f"rgb8{suffix}", planes)
        with Image.open(path) as img:
            pillow = np.asarray(img.convert("RGB"))
        assert np.array_equal(decoded(path, bands=(3, 2, 1)), pillow[..., ::-1]), path
        assert np.array_equal(decoded(path, bands=(2,)), np.repeat(pillow[..., 1:2], 3, axis=2)), path


def test_uint8_is_never_rescaled(tmp_path: Path) -> None:
    planes = gradients(5, "uint8", 200)  # five bands: Pillow cannot identify it, rasterio reads it
    path = write_raster(tmp_path / "five8.tif", planes)
    assert np.array_equal(decoded(path, scale="percentile"), rgb(planes[:3]))
    assert np.array_equal(decoded(path, bands=(5,), value_max=50.0), rgb(planes[[4]]))


def test_tiffs_pillow_misreads_go_to_rasterio(tmp_path: Path) -> None:
    """Pillow reads int8 as uint8 and a 2-band uint8 TIFF as one grey band; rasterio reads them as they are."""
    signed = (gradients(1, "int16", 254) - 127).astype(np.int8)
    path = write_raster(tmp_path / "int8.tif", signed)
    assert np.array_equal(decoded(path), rgb(depth(signed, 127)))
    two = gradients(2, "uint8", 255)
    path = write_raster(tmp_path / "two8.tif", two)
    assert np.array_equal(decoded(path), rgb(two[:1]))
    assert np.array_equal(decoded(path, bands=(2,)), rgb(two[1:]))


def test_no_georeference_warning(tmp_path: Path) -> None:
    path = write_raster(tmp_path / "grey16.tif", gradients(1, "uint16", 65535))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_rgb(path)


# ----------------------------------------------------------------------------- errors name the file


def test_band_beyond_the_count_names_file_and_count(tmp_path: Path) -> None:
    path16 = write_raster(tmp_path / "rgb16.tif", gradients(3, "uint16", 65535))
    with pytest.raises(ImageDecodeError, match=f"{path16}: has 3 band\\(s\\), so band 4 "):
        load_rgb(path16, ImageDecoding(bands=(4,)))
    path8 = write_raster(tmp_path / "rgb8.png", gradients(3, "uint8", 255))
    with pytest.raises(ImageDecodeError, match=f"{path8}: has 3 band\\(s\\), so band 5 "):
        load_rgb(path8, ImageDecoding(bands=(1, 2, 5)))


def test_complex_samples_name_file_and_dtype(tmp_path: Path) -> None:
    path = write_raster(tmp_path / "complex.tif", (gradients(1, "float32", 9) + 1j).astype(np.complex64))
    with pytest.raises(ImageDecodeError, match=f"{path}: cannot decode complex64 samples"):
        load_rgb(path)


def test_non_image_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.tif"
    path.write_text("not an image, only text\n" * 20, encoding="utf-8")
    with pytest.raises(OSError, match=f"cannot identify image file {path}: Pillow cannot identify it, and "
                                      "rasterio \\(GDAL\\) cannot open it"):
        load_rgb(path)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_truncated_16bit_file_fails_naming_it(tmp_path: Path, suffix: str) -> None:
    rng = np.random.default_rng(0)
    full = write_raster(tmp_path / f"full{suffix}", rng.integers(0, 65535, (3, 64, 64)).astype(np.uint16))
    data = full.read_bytes()
    path = tmp_path / f"cut{suffix}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(OSError, match=f"{path}: rasterio \\(GDAL\\) cannot read its samples"):
        load_rgb(path)


# ----------------------------------------------------------------------------- config




def test_config_section_defaults_and_values(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(MINIMAL_CONFIG, encoding="utf-8")
    assert ImageDecoding.from_config(load_config(path)["image_decode"]) == ImageDecoding()
    path.write_text(MINIMAL_CONFIG + "image_decode: {scale: percentile, percentiles: [1, 99], bands: [3, 2, 1]}\n",
                    encoding="utf-8")
    decoding = ImageDecoding.from_config(load_config(path)["image_decode"])
    assert decoding == ImageDecoding("percentile", None, (1.0, 99.0), (3, 2, 1))
    path.write_text(MINIMAL_CONFIG + "image_decode: {value_max: 4095}\n", encoding="utf-8")
    assert ImageDecoding.from_config(load_config(path)["image_decode"]).value_max == 4095.0


@pytest.mark.parametrize("section, message", [
    ({"scale": "linear"}, "image_decode.scale: 'linear' is not one of"),
    ({"value_max": 0}, "image_decode.value_max: expected a positive number"),
    ({"value_max": "high"}, "image_decode.value_max: expected a positive number"),
    ({"percentiles": [98, 2]}, "image_decode.percentiles: expected [low, high] with 0 <= low < high <= 100"),
    ({"percentiles": [-1, 50]}, "image_decode.percentiles"),
    ({"percentiles": [2, 101]}, "image_decode.percentiles"),
    ({"percentiles": [2]}, "image_decode.percentiles"),
    ({"bands": [0]}, "image_decode.bands: expected 1 or 3 band numbers counted from 1"),
    ({"bands": [1, 2]}, "image_decode.bands"),
    ({"bands": [1.0, 2, 3]}, "image_decode.bands"),
    ({"bands": [True]}, "image_decode.bands"),
    ({"band": [1]}, "unknown key 'image_decode.band' (did you mean 'image_decode.bands'?)"),
])
def test_config_errors_name_the_key(section: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        ImageDecoding.from_config(section)
    assert message in str(err.value)
