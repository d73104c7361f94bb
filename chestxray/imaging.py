"""Image reading that a clinician's files survive.

:func:`read_image` turns a PNG/JPEG/BMP/TIFF/GIF/WebP or DICOM file (path or bytes) into an
:class:`XrayImage`: a float32 HxW array in [0, 1] in display orientation (0 = air/black,
1 = bone/white). Anything that cannot be read raises :class:`ImageReadError`, whose message is
one short user-facing line that never echoes header values.

Privacy: DICOM files are parsed with ``specific_tags``, so only the technical elements in
``_DICOM_TAGS`` (pixel module, rescale, window, modality, view, body part) are ever decoded;
names, IDs, dates and institutions are skipped unread. Warnings from pydicom/PIL are silenced
while reading, and their exceptions are replaced (``from None``) by one-line messages.

Data flows one way: everything later steps need from the file (the technical DICOM tags, and how
colourful a plain image was before it became gray) is recorded in the :class:`XrayImage` at decode
time, so that nothing downstream opens the file again.
"""
from __future__ import annotations

import io
import os
import re
import stat
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image, ImageOps
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, get_decoder
from pydicom.pixels import pixel_array as _dicom_pixel_array
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

MAX_FILE_BYTES = 64 * 2**20
MAX_PIXELS = 40_000_000
#: File extensions that folder walkers should offer; extension-less files are tried as DICOM.
SUPPORTED_EXTENSIONS = (".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".bmp", ".tif", ".tiff", ".gif", ".webp")
_DICOM_EXTENSIONS = (".dcm", ".dicom")
#: PIL plugins we accept (no EPS/PDF/etc.: EPS would run Ghostscript).
_PIL_FORMATS = ("PNG", "JPEG", "MPO", "BMP", "DIB", "TIFF", "GIF", "WEBP")
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R BT.601, as PIL's "L"
_PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
#: The only DICOM elements ever parsed (everything else is skipped, never decoded).
_DICOM_TAGS = [
    *_PIXEL_TAGS, "SOPClassUID", "Modality", "ViewPosition", "BodyPartExamined",
    "Rows", "Columns", "SamplesPerPixel", "PhotometricInterpretation", "PlanarConfiguration",
    "NumberOfFrames", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
    "RescaleIntercept", "RescaleSlope", "RescaleType", "ModalityLUTSequence",
    "WindowCenter", "WindowWidth", "VOILUTFunction", "VOILUTSequence",
    "ExtendedOffsetTable", "ExtendedOffsetTableLengths",
    *(f"{c}PaletteColorLookupTable{k}" for c in ("Red", "Green", "Blue") for k in ("Descriptor", "Data")),
    *(f"Segmented{c}PaletteColorLookupTableData" for c in ("Red", "Green", "Blue")),
]


class ImageReadError(ValueError):
    """The input is not a readable/supported image; ``str()`` is one user-facing line."""

    def __init__(self, message: str) -> None:
        super().__init__(_one_line(message))


@dataclass
class XrayImage:
    """A decoded image, ready for a model or display.

    Attributes:
        pixels: float32 HxW in [0, 1]; 0 = black/air, 1 = white/bone (display orientation).
        format: "png", "jpeg", "dicom", "bmp", "tiff", "gif", "webp".
        original_size: (height, width) as stored in the file (before EXIF rotation).
        bit_depth: bits per sample of the source (DICOM BitsStored; 1/8/12/16/32 for images).
        modality: DICOM Modality ("CR", "DX", "MR", ...); None for plain images.
        view: DICOM ViewPosition ("PA", "AP", "LL", ...) if present.
        body_part: DICOM BodyPartExamined if present.
        photometric: DICOM PhotometricInterpretation or the PIL mode of a plain image.
        n_frames: frames/pages in the file (only the first is used).
        notes: harmless technical notes about what was done to the pixels.
        colour_fraction: share of clearly coloured pixels of a colour plain image before it was
            turned gray (chest films stored as RGB: 0.0; photos: 0.4-1.0); None for gray files and
            DICOM. The input gate's colour rule reads it.
        raw: the stored values before any display window (DICOM: after the modality LUT; 16-bit
            images: as stored), for re-windowing the display (:mod:`chestxray.windowing`); None for
            8-bit and colour images, whose decoded pixels are all there is. Never a model input.
        stored_window: the file's first (WindowCenter, WindowWidth), when it has one.
        invert: MONOCHROME1 (high stored values are dark).
    """

    pixels: np.ndarray = field(repr=False)
    format: str
    original_size: tuple[int, int]
    bit_depth: int
    modality: str | None = None
    view: str | None = None
    body_part: str | None = None
    photometric: str | None = None
    n_frames: int = 1
    notes: list[str] = field(default_factory=list)
    colour_fraction: float | None = None
    raw: np.ndarray | None = field(default=None, repr=False)
    stored_window: tuple[float, float] | None = None
    invert: bool = False


def _one_line(text: str, limit: int = 300) -> str:
    text = re.sub(r"[\x00-\x1f\x7f]+", " ", str(text)).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _code(value: object) -> str | None:
    """A DICOM code string (CS) reduced to harmless characters, or None."""
    text = re.sub(r"[^A-Z0-9 _-]", "", str(value or "").upper()).strip()[:16]
    return text or None


def _check_pixels(height: int, width: int, max_pixels: int) -> None:
    if height * width > max_pixels:
        raise ImageReadError(f"image too large: {width}x{height} pixels (limit {max_pixels / 1e6:g} megapixels)")


def _scale(arr: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """Scale to float32 [0, 1] by [lo, hi] (default: the image's own min/max)."""
    if arr.dtype == np.uint8 and (lo, hi) == (0, 255):  # 8-bit films: finite and in range, one pass (~5x faster)
        if arr.min() == arr.max():
            raise ImageReadError("image is blank (all pixels have the same value)")
        return arr.astype(np.float32) * np.float32(1 / 255)
    arr = arr.astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        raise ImageReadError("image contains invalid (non-finite) pixel values")
    lo = float(arr.min()) if lo is None else lo
    hi = float(arr.max()) if hi is None else hi
    if arr.min() == arr.max() or hi <= lo:
        raise ImageReadError("image is blank (all pixels have the same value)")
    return np.clip((arr - lo) / (hi - lo), 0.0, 1.0).astype(np.float32, copy=False)


def _luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., :3].astype(np.float32) @ _LUMA


def _colour_fraction(rgb: Image.Image, chroma: float = 0.1, side: int = 128) -> float:
    """Share of pixels whose channels differ by more than ``chroma`` (of full scale), on a
    ``side``-px thumbnail: cheap, and enough to tell a photo from a film stored as RGB."""
    small = rgb.copy()
    small.thumbnail((side, side))
    a = np.asarray(small, dtype=np.float32) / 255.0
    return float(((a.max(axis=2) - a.min(axis=2)) > chroma).mean())


def _load(source: str | os.PathLike | bytes, max_bytes: int) -> tuple[bytes, str, str]:
    """Return (content, display name, lower-case suffix); bytes have no suffix."""
    suffix = ""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data, name = bytes(source), "uploaded data"
    else:
        path = Path(os.fspath(source))
        name, suffix = path.name or str(path), path.suffix.lower()
        try:
            st = path.stat()
        except FileNotFoundError:
            raise ImageReadError(f"file not found: {name}") from None
        except (OSError, ValueError):
            raise ImageReadError(f"cannot read file: {name}") from None
        if stat.S_ISDIR(st.st_mode):
            raise ImageReadError(f"is a folder, not a file: {name}")
        if not stat.S_ISREG(st.st_mode):
            raise ImageReadError(f"not a regular file: {name}")
        if st.st_size > max_bytes:
            raise ImageReadError(f"file too large: {st.st_size / 2**20:.0f} MB (limit {max_bytes / 2**20:g} MB)")
        try:
            with open(path, "rb") as f:
                data = f.read(max_bytes + 1)
        except OSError:
            raise ImageReadError(f"cannot read file: {name}") from None
    if not data:
        raise ImageReadError(f"file is empty: {name}")
    if len(data) > max_bytes:
        raise ImageReadError(f"file too large: {len(data) / 2**20:.0f} MB (limit {max_bytes / 2**20:g} MB)")
    return data, name, suffix


def read_image(
    source: str | os.PathLike | bytes, *, max_bytes: int = MAX_FILE_BYTES, max_pixels: int = MAX_PIXELS
) -> XrayImage:
    """Read a radiograph from a path or bytes, detecting the format by content.

    DICOM is recognised by "DICM" at offset 128; preamble-less DICOM is tried only when the
    name ends in .dcm/.dicom, has no extension or a numeric one (UID-style names), or for bytes.
    Dimensions are checked against ``max_pixels`` before any pixel is decoded.

    Args:
        source: File path or the file's bytes.
        max_bytes: Largest accepted file size.
        max_pixels: Largest accepted height*width.

    Returns:
        The decoded :class:`XrayImage`.

    Raises:
        ImageReadError: For any unreadable, unsupported, blank or oversized input.
    """
    data, name, suffix = _load(source, max_bytes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL/pydicom warnings may quote header values
        if data[128:132] == b"DICM":
            image = _read_dicom(data, max_pixels, force=False)
        else:
            image = _read_pil(data, name, max_pixels)
            if image is None and (suffix in ("", *_DICOM_EXTENSIONS) or suffix[1:].isdigit()):
                image = _read_dicom(data, max_pixels, force=True)
    if image is None:
        raise ImageReadError(f"not a readable image or DICOM file: {name}")
    return image


def _read_pil(data: bytes, name: str, max_pixels: int) -> XrayImage | None:
    Image.init()  # registers all plugins (cheap after the first call); absent ones are skipped
    try:
        im = Image.open(io.BytesIO(data), formats=[f for f in _PIL_FORMATS if f in Image.OPEN])
    except Image.DecompressionBombError as exc:  # PIL's own limit (~179 MP) hit before ours
        count = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{int(count.group(1)) / 1e6:.0f} megapixels" if count else "too many pixels"
        raise ImageReadError(f"image too large: {size} (limit {max_pixels / 1e6:g} megapixels)") from None
    except Exception:
        return None
    width, height = im.size
    _check_pixels(height, width, max_pixels)
    fmt = {"MPO": "jpeg", "DIB": "bmp"}.get(im.format or "", (im.format or "image").lower())
    notes: list[str] = []
    colour = raw = None
    try:
        n_frames = int(getattr(im, "n_frames", 1))
        if n_frames > 1:
            im.seek(0)
            notes.append(f"animated or multi-page image: first of {n_frames} frames used")
        im.load()
        if im.getexif().get(0x0112, 1) not in (1, None):
            im = ImageOps.exif_transpose(im)
            notes.append("EXIF orientation applied")
        mode = im.mode
        if mode in ("1", "L"):
            pixels, depth = _scale(np.asarray(im.convert("L")), 0, 255), 1 if mode == "1" else 8
        elif mode in ("LA", "La"):
            pixels, depth = _scale(np.asarray(im.getchannel(0)), 0, 255), 8
            notes.append("alpha channel ignored")
        elif mode.startswith("I") or mode == "F":
            raw = np.asarray(im)
            pixels, depth, note = _scale_wide(raw)
            notes += [note] if note else []
        else:  # RGB(A/X), P, PA, CMYK, YCbCr, LAB, HSV: PIL converts to RGB correctly
            kind = {"P": "palette", "PA": "palette", "CMYK": "CMYK"}.get(mode, "RGB")
            rgb = im.convert("RGB")
            pixels, depth = _scale(_luminance(np.asarray(rgb)), 0, 255), 8
            colour = _colour_fraction(rgb)  # recorded now: the gray pixels can no longer tell
            notes.append(f"{kind} image converted to gray")
            if "A" in mode or "transparency" in im.info:
                notes.append("alpha channel ignored")
    except ImageReadError:
        raise
    except Exception:
        raise ImageReadError(f"image file is damaged or truncated: {name}") from None
    return XrayImage(pixels, fmt, (height, width), depth, photometric=mode, n_frames=n_frames, notes=notes,
                     colour_fraction=colour, raw=raw)


def _scale_wide(arr: np.ndarray) -> tuple[np.ndarray, int, str | None]:
    """16/32-bit gray: 12-bit data stored in 16 bits is scaled by 4095, other unsigned 16-bit by 65535.

    Never stretched per image unless values do not fit in 16 bits (signed, 32-bit, float).
    """
    if arr.dtype.kind in "ui" and arr.size and arr.min() >= 0 and arr.max() <= 65535:
        if arr.max() <= 4095:
            return _scale(arr, 0, 4095), 12, "16-bit image with values within 12 bits: scaled as 12-bit"
        return _scale(arr, 0, 65535), 16, None
    return _scale(arr), 32, "wide-range image: scaled by its own min and max"


def _read_dicom(data: bytes, max_pixels: int, *, force: bool) -> XrayImage | None:
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=force, specific_tags=_DICOM_TAGS)
        found = [t for t in _PIXEL_TAGS if t in ds]
        if force and not (found or "Rows" in ds or "SOPClassUID" in ds):
            return None  # force=True reads junk as an empty dataset
    except Exception:
        return None
    if not found:
        raise ImageReadError("DICOM has no pixel data")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = max(1, int(ds.get("NumberOfFrames") or 1))
        bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 0)
        photometric = _code(ds.get("PhotometricInterpretation"))
    except Exception:
        raise ImageReadError("DICOM image size is missing or invalid") from None
    if rows <= 0 or cols <= 0:
        raise ImageReadError("DICOM image size is missing or invalid")
    _check_pixels(rows, cols, max_pixels)
    meta = ds.file_meta
    if "TransferSyntaxUID" not in meta:  # preamble-less file read with force=True
        implicit, little = ds.original_encoding
        meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else (
            ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    syntax = UID(str(meta.TransferSyntaxUID))
    try:
        supported = get_decoder(syntax).is_available
    except Exception:
        supported = False
    if not supported:
        raise ImageReadError(f"unsupported DICOM compression (transfer syntax {_one_line(syntax.name, 80)})")
    notes = [f"multi-frame DICOM: first of {frames} frames used"] if frames > 1 else []
    raw, stored_window = None, None
    try:
        arr = _dicom_pixel_array(ds, index=0)
        if photometric == "PALETTE COLOR":
            arr = apply_color_lut(arr, ds)
        if arr.ndim == 3:  # RGB (pydicom converts YBR to RGB) or palette output
            top = 255.0 if arr.dtype == np.uint8 else float(2 ** (8 * arr.dtype.itemsize) - 1)
            pixels = _scale(_luminance(arr), 0.0, top)
            notes.append(f"{photometric or 'color'} image converted to gray")
        else:
            values = apply_modality_lut(arr, ds)
            raw, stored_window = values.astype(np.float32), _first_window(ds)  # kept for display windowing
            windowed = "VOILUTSequence" in ds or ("WindowCenter" in ds and "WindowWidth" in ds)
            pixels = _scale(apply_voi_lut(values, ds, index=0))
            notes.append("display window from the file applied" if windowed
                         else "no display window in the file: scaled by min and max")
            if photometric == "MONOCHROME1":
                pixels = 1.0 - pixels
                notes.append("MONOCHROME1 inverted so that air is dark")
    except ImageReadError:
        raise
    except Exception:
        raise ImageReadError("DICOM pixel data could not be decoded") from None
    return XrayImage(
        pixels, "dicom", (rows, cols), bits, modality=_code(ds.get("Modality")), view=_code(ds.get("ViewPosition")),
        body_part=_code(ds.get("BodyPartExamined")), photometric=photometric, n_frames=frames, notes=notes,
        raw=raw, stored_window=stored_window, invert=photometric == "MONOCHROME1")


def _first_window(ds: pydicom.Dataset) -> tuple[float, float] | None:
    """The first (WindowCenter, WindowWidth) pair of the file, or None when absent or unusable."""
    try:
        center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
        if center is None or width is None:
            return None
        center = float(center[0] if isinstance(center, (list, tuple, pydicom.multival.MultiValue)) else center)
        width = float(width[0] if isinstance(width, (list, tuple, pydicom.multival.MultiValue)) else width)
    except (TypeError, ValueError, IndexError):
        return None
    return (center, width) if np.isfinite(center) and np.isfinite(width) and width >= 1 else None


def to_uint8(img: XrayImage | np.ndarray) -> np.ndarray:
    """Return an HxW uint8 copy for display (0..255); float input is taken as [0, 1]."""
    arr = img.pixels if isinstance(img, XrayImage) else np.asarray(img)
    if arr.dtype == np.uint8:
        return arr.copy()
    return np.round(np.clip(arr.astype(np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)
