"""Tests of chestxray.imaging on real files and on a corpus of bad/odd inputs (tests/badfiles.py)."""
from __future__ import annotations

import io
import logging
import shutil
import time
import warnings

import numpy as np
import pydicom
import pytest
from PIL import Image, ImageFile
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from chestxray.imaging import (
    MAX_FILE_BYTES,
    MAX_PIXELS,
    SUPPORTED_EXTENSIONS,
    ImageReadError,
    XrayImage,
    read_image,
    to_uint8,
)
from tests.badfiles import BAD, CHEST_CR, GOOD, KERMANY_JPEG, NIH_IMAGE, PRIVACY_MARKERS

J2K_CR = "dicom/pydicom_RG1_J2KI_chest_CR_jpeg2000.dcm"


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def _check_image(img: XrayImage) -> None:
    assert isinstance(img, XrayImage)
    assert img.pixels.ndim == 2 and img.pixels.dtype == np.float32
    assert 0.0 <= img.pixels.min() < img.pixels.max() <= 1.0


@pytest.fixture(scope="module")
def chest_cr(data_dir) -> XrayImage:
    return read_image(data_dir / CHEST_CR)


@pytest.fixture(scope="module")
def nih_small(data_dir) -> np.ndarray:
    """The 8-bit NIH image the corpus was derived from, as float [0, 1] at 128 px."""
    return np.asarray(Image.open(data_dir / NIH_IMAGE).convert("L").resize((128, 128)), np.float32) / 255


def test_size_limits_refuse_before_decoding_and_real_films_pass_them(chest_cr, data_dir):
    """The default limits pass the largest real film here (a 1955 x 1841 DICOM, 7 MB); a limit just under a
    real file's size or pixel count refuses it with a one-line error. Every real film's suffix is one the
    folder walk accepts, and importing the reader leaves PIL's truncated-file switch off."""
    path = data_dir / CHEST_CR
    size, pixels = path.stat().st_size, chest_cr.pixels.size
    assert size <= MAX_FILE_BYTES and pixels <= MAX_PIXELS and chest_cr.pixels.shape == (1955, 1841)
    with pytest.raises(ImageReadError, match="file too large"):
        read_image(path, max_bytes=size - 1)
    with pytest.raises(ImageReadError, match="image too large"):
        read_image(path, max_pixels=pixels - 1)
    png = data_dir / NIH_IMAGE
    with pytest.raises(ImageReadError, match="image too large"):
        read_image(png.read_bytes(), max_pixels=read_image(png).pixels.size - 1)
    films = [png, data_dir / KERMANY_JPEG, path, data_dir / "misc/16747_3_1.jpg"]
    assert all(f.suffix.lower() in SUPPORTED_EXTENSIONS and read_image(f).pixels.ndim == 2 for f in films)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_monochrome1_chest_cr_is_inverted_to_display_orientation(chest_cr, data_dir):
    _check_image(chest_cr)
    assert (chest_cr.format, chest_cr.modality, chest_cr.view, chest_cr.body_part) == ("dicom", "CR", "PA", "CHEST")
    assert chest_cr.photometric == "MONOCHROME1" and chest_cr.bit_depth == 15 and chest_cr.n_frames == 1
    assert chest_cr.original_size == chest_cr.pixels.shape == (1955, 1841)
    assert any("MONOCHROME1" in n for n in chest_cr.notes)
    # Mid-chest rows: the mediastinum (central column band) is brighter than both lung fields.
    p = chest_cr.pixels
    h, w = p.shape
    rows = p[int(0.3 * h): int(0.6 * h)]
    band = lambda a, b: float(rows[:, int(a * w): int(b * w)].mean())  # noqa: E731
    center, right_lung, left_lung = band(0.42, 0.58), band(0.18, 0.32), band(0.65, 0.80)
    assert center > right_lung + 0.1 and center > left_lung + 0.1
    # ...and that is because the stored values were inverted: windowed raw data anti-correlates.
    ds = pydicom.dcmread(data_dir / CHEST_CR)
    raw = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds)
    assert _corr(raw[::8, ::8], p[::8, ::8]) < -0.99


def test_jpeg2000_matches_uncompressed(chest_cr, data_dir):
    img = read_image(data_dir / J2K_CR)
    _check_image(img)
    assert img.pixels.shape == chest_cr.pixels.shape and img.photometric == "MONOCHROME1"
    diff = np.abs(img.pixels - chest_cr.pixels)
    assert diff.mean() < 0.01 and diff.max() < 0.05  # lossy J2K: measured 0.0025 / 0.017
    assert _corr(img.pixels[::4, ::4], chest_cr.pixels[::4, ::4]) > 0.999


@pytest.mark.parametrize(
    ("name", "modality", "photometric"),
    [("pydicom_US1_UNCR_us.dcm", "US", "RGB"), ("pydicom_MR2_UNCR_mr.dcm", "MR", "MONOCHROME2"),
     ("kcr2019_anon_apct_abdomen_CT.dcm", "CT", "MONOCHROME2"), ("pydicom_RG3_UNCR_tibia_CR.dcm", "CR", "MONOCHROME1")],
)
def test_other_dicoms_read_with_modality(data_dir, name, modality, photometric):
    img = read_image(data_dir / "dicom" / name)
    _check_image(img)
    assert (img.modality, img.photometric) == (modality, photometric)
    if photometric == "RGB":
        assert img.pixels.shape == (480, 640) and "RGB image converted to gray" in img.notes


def test_colour_fraction_is_recorded_at_decode(data_dir):
    """What the gate's colour rule needs is measured once, with the pixels: photos are colourful, a
    chest film stored as RGB is not, gray files and DICOM (even an RGB ultrasound) have none."""
    for name in ("photo_china.jpg", "photo_flower.jpg", "photo_grace_hopper.jpg"):
        path = data_dir / "ood" / name
        assert read_image(path).colour_fraction > 0.3
        assert read_image(path.read_bytes()).colour_fraction == read_image(path).colour_fraction
    assert read_image(data_dir / "misc" / "h0001.png").colour_fraction == 0.0
    assert read_image(data_dir / "ood" / "mri_pydicom_MR2.png").colour_fraction is None
    assert read_image(data_dir / "dicom" / "pydicom_US1_UNCR_us.dcm").colour_fraction is None


def test_16bit_png_keeps_its_range(bad_corpus, nih_small):
    g16, g12 = read_image(bad_corpus["gray16.png"]), read_image(bad_corpus["gray12.png"])
    assert (g16.bit_depth, g16.photometric, g12.bit_depth) == (16, "I;16", 12)
    np.testing.assert_allclose(g16.pixels, nih_small, atol=1e-5)  # v*257/65535 == v/255
    np.testing.assert_allclose(g12.pixels, nih_small, atol=0.005)  # v*16/4095 ~ v/255
    assert any("12 bits" in n for n in g12.notes)
    # Real 16-bit data is divided by 65535, never stretched per image.
    buf = io.BytesIO()
    Image.fromarray((np.asarray(nih_small) * 20000).astype(np.uint16)).save(buf, format="PNG")
    dark = read_image(buf.getvalue())
    assert dark.bit_depth == 16 and abs(dark.pixels.max() - nih_small.max() * 20000 / 65535) < 1e-4


@pytest.mark.parametrize("name", ["palette.png", "rgba.png", "la.png", "cmyk.jpg", "anim.gif", "onebit.png"])
def test_odd_plain_images_read_to_gray(bad_corpus, nih_small, name):
    img = read_image(bad_corpus[name])
    _check_image(img)
    assert img.pixels.shape == (128, 128) and img.modality is None
    if name == "onebit.png":  # dithered: only the mean survives
        assert img.bit_depth == 1 and abs(img.pixels.mean() - nih_small.mean()) < 0.05
    else:
        assert _corr(img.pixels, nih_small) > 0.98
    if name == "anim.gif":
        assert img.n_frames == 3 and any("first of 3 frames" in n for n in img.notes)


def test_exif_orientation_is_applied(nih_small):
    im = Image.fromarray((nih_small[:, :96] * 255).astype(np.uint8))  # 128 high, 96 wide
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display needs a 90 degree turn
    buf = io.BytesIO()
    im.save(buf, format="JPEG", exif=exif, quality=95)
    img = read_image(buf.getvalue())
    assert img.original_size == (128, 96) and img.pixels.shape == (96, 128)
    assert "EXIF orientation applied" in img.notes


def test_multiframe_dicom_uses_first_frame(bad_corpus):
    img = read_image(bad_corpus["multiframe.dcm"])
    single = read_image(bad_corpus["preambleless.dcm"])  # the same first frame, single-frame, no preamble
    assert img.n_frames == 3 and "multi-frame DICOM: first of 3 frames used" in img.notes
    assert img.modality == single.modality == "MR"
    np.testing.assert_array_equal(img.pixels, single.pixels)


def test_dicom_found_by_content_not_name(bad_corpus, tmp_path):
    shutil.copy(bad_corpus["us_rgb.dcm"], tmp_path / "looks_like.png")
    assert read_image(tmp_path / "looks_like.png").format == "dicom"
    raw = bad_corpus["preambleless.dcm"].read_bytes()  # preamble-less: tried only for DICOM-ish names
    for name in ("IM0001", "1.2.826.0.1.3680043.2.1125.1", "x.DICOM"):
        (tmp_path / name).write_bytes(raw)
        assert read_image(tmp_path / name).modality == "MR"
    (tmp_path / "raw.png").write_bytes(raw)
    with pytest.raises(ImageReadError, match="not a readable image or DICOM file: raw.png"):
        read_image(tmp_path / "raw.png")
    assert read_image(raw).modality == "MR"  # bytes: no name, so tried


EXPECTED = {"empty.png": "file is empty", "truncated.png": "damaged or truncated", "truncated.jpg": "damaged",
            "text.png": "not a readable image or DICOM file", "text.dcm": "not a readable image or DICOM file",
            "bomb.png": "image too large", "nopixels.dcm": "DICOM has no pixel data", "blank.png": "blank",
            "badcodec.dcm": "unsupported DICOM compression (transfer syntax 1.2.840.10008.1.2.4.110)",
            "truncated.dcm": "could not be decoded"}


def _assert_one_line_error(call, expected: str) -> str:
    t0 = time.perf_counter()
    with pytest.raises(ImageReadError) as info:
        call()
    assert time.perf_counter() - t0 < 1.0
    msg = str(info.value)
    assert expected in msg and "\n" not in msg and "Traceback" not in msg and len(msg) < 200
    assert info.value.__cause__ is None and (info.value.__context__ is None or info.value.__suppress_context__)
    return msg


@pytest.mark.parametrize("name", BAD)
def test_bad_corpus_is_refused_in_one_line(bad_corpus, name):
    msg = _assert_one_line_error(lambda: read_image(bad_corpus[name]), EXPECTED[name])
    assert not any(m in msg for m in PRIVACY_MARKERS.values())


@pytest.mark.parametrize("name", GOOD)
def test_good_corpus_reads(bad_corpus, name):
    _check_image(read_image(bad_corpus[name]))


def test_path_problems_and_limits(bad_corpus, tmp_path, data_dir):
    _assert_one_line_error(lambda: read_image(tmp_path / "missing.png"), "file not found: missing.png")
    _assert_one_line_error(lambda: read_image(tmp_path), "not a file")
    _assert_one_line_error(lambda: read_image(b""), "file is empty")
    _assert_one_line_error(lambda: read_image(bad_corpus["gray16.png"], max_bytes=1000), "file too large")
    _assert_one_line_error(lambda: read_image(bad_corpus["rgba.png"], max_pixels=100 * 100),
                           "image too large: 128x128 pixels (limit 0.01 megapixels)")
    msg = _assert_one_line_error(lambda: read_image(data_dir / CHEST_CR, max_pixels=10**6), "image too large")
    assert "1841x1955" in msg
    weird = tmp_path / "bad\nname.png"
    weird.write_bytes(b"junk")
    _assert_one_line_error(lambda: read_image(weird), "not a readable image or DICOM file")


def test_privacy_markers_never_leak(bad_corpus, caplog):
    loggers = [logging.getLogger(n) for n in ("", "pydicom", "PIL", "chestxray")]
    old = [lg.level for lg in loggers]
    caplog.set_level(logging.DEBUG)
    for lg in loggers:
        lg.setLevel(logging.DEBUG)
    pydicom.config.debug(True)  # even pydicom's element-by-element debug log must not see them
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            img = read_image(bad_corpus["privacy.dcm"])
            img_bytes = read_image(bad_corpus["privacy.dcm"].read_bytes())
    finally:
        pydicom.config.debug(False)
        for lg, level in zip(loggers, old):
            lg.setLevel(level)
    assert caplog.records, "debug logging was not captured: the check below would be vacuous"
    assert raw_has_markers(bad_corpus["privacy.dcm"])
    _check_image(img)
    text = " ".join([repr(img), str(img), repr(img_bytes), *img.notes, *map(str, vars(img).values()),
                     caplog.text, *(str(w.message) for w in caught)])
    for marker in PRIVACY_MARKERS.values():
        assert marker not in text
        assert marker.replace("^", " ") not in text


def raw_has_markers(path) -> bool:
    """The test file really carries the markers (so the test above is not vacuous)."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return all(str(ds.get(k)) == v for k, v in PRIVACY_MARKERS.items())


def test_to_uint8(chest_cr):
    out = to_uint8(chest_cr)
    assert out.dtype == np.uint8 and out.shape == chest_cr.pixels.shape and out.min() == 0 and out.max() == 255
    np.testing.assert_array_equal(to_uint8(np.array([[-1.0, 0.0, 0.5, 1.0, 2.0]])), [[0, 0, 128, 255, 255]])
    assert to_uint8(np.zeros((2, 2), np.uint8)).dtype == np.uint8


def test_8bit_fast_scale_equals_the_general_one(data_dir):
    """8-bit films take a one-pass path; it gives the general path's float32 pixels."""
    from chestxray.imaging import _scale

    raw = np.asarray(Image.open(data_dir / "nih/full_res/00000100_000.png").convert("L"))
    fast = read_image(data_dir / "nih/full_res/00000100_000.png").pixels
    general = _scale(raw.astype(np.float32), 0, 255)
    assert fast.dtype == np.float32 and fast.shape == raw.shape
    np.testing.assert_allclose(fast, general, rtol=0, atol=1e-7)
    with pytest.raises(ImageReadError, match="blank"):
        _scale(np.full((8, 8), 7, np.uint8), 0, 255)
