"""Display windowing (chestxray.windowing): hand-computed values, MONOCHROME1, presets, the raw values kept."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from chestxray.imaging import read_image, to_uint8
from chestxray.windowing import PRESETS, STORED, Window, film_for_display, window
from tests.badfiles import CHEST_CR, NIH_IMAGE


def test_window_on_a_16bit_ramp_matches_hand_computed_values():
    # DICOM linear VOI with centre 1000.5, width 201: black at or below 900, white above 1100, linear between
    ramp = np.arange(0, 2001, dtype=np.uint16)
    out = to_uint8(window(ramp, 1000.5, 201))
    expected = {0: 0, 899: 0, 900: 0, 950: 64, 1000: 128, 1050: 191, 1100: 255, 1101: 255, 2000: 255}
    # 950: (950 - 1000) / 200 + 0.5 = 0.25 -> 63.75 -> 64; 1000: 0.5 -> 127.5 -> 128; 1050: 0.75 -> 191.25 -> 191
    assert {x: int(out[x]) for x in expected} == expected
    assert np.all(np.diff(out.astype(int)) >= 0)  # monotone
    inverted = to_uint8(window(ramp, 1000.5, 201, invert=True))  # MONOCHROME1: high values dark
    flipped = {x: 255 - v for x, v in expected.items()} | {1000: 128}  # 0.5 stays 0.5 (127.5 rounds to even)
    assert {x: int(inverted[x]) for x in expected} == flipped
    assert window(ramp, 1000, 0.2).max() == 1.0 and set(np.unique(window(ramp, 1000, 0.2))) == {0.0, 1.0}


def test_window_agrees_with_pydicom():
    from pydicom import Dataset
    from pydicom.pixels import apply_voi_lut

    ds = Dataset()
    ds.BitsStored, ds.PixelRepresentation, ds.PhotometricInterpretation = 16, 0, "MONOCHROME2"
    ds.WindowCenter, ds.WindowWidth = 30000, 20000
    values = np.linspace(0, 65535, 4097).astype(np.uint16)
    reference = apply_voi_lut(values, ds).astype(np.float64) / 65535.0
    assert np.abs(window(values, 30000, 20000) - reference).max() < 1e-4


def test_dicom_keeps_raw_values_and_stored_window(data_dir):
    x = read_image(data_dir / CHEST_CR)
    assert x.raw is not None and x.raw.shape == x.pixels.shape and x.invert
    assert x.stored_window == (15000.0, 30000.0)
    film = film_for_display(x, (200, 188))
    assert film.values.shape == (200, 188) and film.stored == Window(15000.0, 30000.0)
    small = np.asarray(Image.fromarray(to_uint8(x)).resize((188, 200), Image.Resampling.BILINEAR), float) / 255
    shown = film.render(film.stored)  # the file's window on the kept values: the decoded film, air dark
    assert np.corrcoef(shown.ravel(), small.ravel())[0, 1] > 0.98
    lung, media, full = (film.render(film.preset(p)) for p in PRESETS[1:])
    assert lung.mean() > full.mean() > media.mean()  # lung window: the bright side; mediastinum: the dark side
    assert full.min() < 0.05 and full.max() > 0.95  # the whole film's range (resizing rounds off the extremes)


def test_16bit_png_keeps_raw_and_8bit_has_none(data_dir):
    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, format="PNG")
    x = read_image(buf.getvalue())
    assert x.bit_depth == 16 and np.array_equal(x.raw, ramp) and not x.invert and x.stored_window is None
    film = film_for_display(x, (64, 64))
    assert film.preset(STORED) == film.preset("Full range")  # no window in the file: the full range
    assert np.allclose(film.render(Window(1000.5, 201)), window(ramp, 1000.5, 201), atol=1e-3)
    assert read_image(data_dir / NIH_IMAGE).raw is None and film_for_display(read_image(data_dir / NIH_IMAGE),
                                                                              (64, 64)) is None


def test_ct_presets_are_hounsfield_windows(data_dir):
    film = film_for_display(read_image(data_dir / "dicom/kcr2019_anon_apct_abdomen_CT.dcm"), (128, 128))
    assert film.modality == "CT" and film.preset("Lung") == Window(-600.0, 1500.0)
