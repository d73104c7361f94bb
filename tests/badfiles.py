"""A corpus of bad and odd input files, written into a directory, for reader/app/CLI tests.

``make_bad_corpus(dir)`` returns ``{name: path}``. Names in ``BAD`` must be refused with a one-line
``ImageReadError``; names in ``GOOD`` are odd but valid and must read. Everything is derived from
real files in the shared data (small, generated in well under a second).
"""
from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import UID

from chestxray.layout import default_data_root

DATA = Path(default_data_root())
NIH_IMAGE = "nih/images_384/00000075_000.png"
KERMANY_JPEG = "kermany/train/NORMAL/IM-0115-0001.jpeg"
CHEST_CR = "dicom/pydicom_RG1_UNCR_chest_CR.dcm"
MR = "dicom/pydicom_MR2_UNCR_mr.dcm"
US = "dicom/pydicom_US1_UNCR_us.dcm"
#: Identifying values written into privacy.dcm; none may ever appear in output or logs.
PRIVACY_MARKERS = {
    "PatientName": "MARKER^NAME^ZQX",
    "PatientID": "MARKERID-ZQX-4711",
    "PatientBirthDate": "19010101",
    "InstitutionName": "MARKER-HOSPITAL-ZQX",
}
#: A transfer syntax with no decoder in pydicom 3.0 (JPEG XL).
UNSUPPORTED_SYNTAX = "1.2.840.10008.1.2.4.110"
BAD = ("empty.png", "truncated.png", "truncated.jpg", "text.png", "text.dcm", "bomb.png",
       "nopixels.dcm", "badcodec.dcm", "truncated.dcm", "blank.png")
GOOD = ("palette.png", "rgba.png", "la.png", "onebit.png", "gray16.png", "gray12.png", "cmyk.jpg",
        "anim.gif", "multiframe.dcm", "preambleless.dcm", "us_rgb.dcm", "privacy.dcm")


def png_bomb(width: int = 30000, height: int = 30000) -> bytes:
    """A tiny, structurally valid 1-bit PNG whose header claims ``width`` x ``height`` pixels."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _small_mr(data: Path, frames: int = 1) -> pydicom.Dataset:
    """The real MR dataset, pixels downsampled to 256x256 (frame k is the image rolled by k*64 columns)."""
    ds = pydicom.dcmread(data / MR)
    small = np.ascontiguousarray(ds.pixel_array[::4, ::4])
    stack = [np.roll(small, 64 * k, axis=1) for k in range(frames)]
    ds.Rows, ds.Columns = small.shape
    ds.PixelData = np.stack(stack).astype(small.dtype).tobytes()
    if frames > 1:
        ds.NumberOfFrames = frames
    return ds


def make_bad_corpus(directory: str | os.PathLike, data_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """Write the corpus into ``directory`` and return ``{file name: path}``."""
    out, data = Path(directory), Path(data_dir or DATA)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, bytes] = {}
    nih_png = (data / NIH_IMAGE).read_bytes()
    nih = Image.open(data / NIH_IMAGE).convert("L").resize((128, 128))
    jpeg = (data / KERMANY_JPEG).read_bytes()
    files["empty.png"] = b""
    files["truncated.png"] = nih_png[: len(nih_png) // 2]
    files["truncated.jpg"] = jpeg[: len(jpeg) // 2]
    files["text.png"] = b"This is not an image, just a note renamed to .png\n" * 20
    files["text.dcm"] = b"Patient notes: this is plain text renamed to .dcm\n" * 20
    files["bomb.png"] = png_bomb()
    files["blank.png"] = _png(Image.new("L", (64, 64), 128))

    files["palette.png"] = _png(nih.convert("RGB").quantize(64))
    rgba = nih.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(nih.size))
    files["rgba.png"] = _png(rgba)
    files["la.png"] = _png(Image.merge("LA", (nih, Image.new("L", nih.size, 200))))
    files["onebit.png"] = _png(nih.convert("1"))
    arr8 = np.asarray(nih, dtype=np.uint16)
    files["gray16.png"] = _png(Image.fromarray(arr8 * 257))  # full 16-bit range
    files["gray12.png"] = _png(Image.fromarray(arr8 * 16))  # 12-bit data stored in 16 bits
    buf = io.BytesIO()
    nih.convert("CMYK").save(buf, format="JPEG", quality=95)
    files["cmyk.jpg"] = buf.getvalue()
    buf = io.BytesIO()
    frames = [nih, nih.transpose(Image.Transpose.FLIP_LEFT_RIGHT), Image.new("L", nih.size, 0)]
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    files["anim.gif"] = buf.getvalue()
    files["us_rgb.dcm"] = (data / US).read_bytes()

    def dicom_bytes(ds: pydicom.Dataset, **kwargs) -> bytes:
        buf = io.BytesIO()
        ds.save_as(buf, **kwargs)
        return buf.getvalue()

    files["multiframe.dcm"] = dicom_bytes(_small_mr(data, frames=3))
    raw = _small_mr(data)  # old-style: no preamble, no "DICM", no file meta, implicit VR
    raw.file_meta, raw.preamble = FileMetaDataset(), None
    files["preambleless.dcm"] = dicom_bytes(raw, implicit_vr=True, little_endian=True, enforce_file_format=False)

    cr = pydicom.dcmread(data / CHEST_CR)
    for keyword, value in PRIVACY_MARKERS.items():
        setattr(cr, keyword, value)
    files["privacy.dcm"] = dicom_bytes(cr)
    files["truncated.dcm"] = files["privacy.dcm"][: len(files["privacy.dcm"]) // 2]
    del cr.PixelData
    files["nopixels.dcm"] = dicom_bytes(cr)

    us = pydicom.dcmread(data / US)
    us.file_meta.TransferSyntaxUID = UID(UNSUPPORTED_SYNTAX)
    us.PixelData = encapsulate([b"\xff\x0a" + bytes(200)])
    us["PixelData"].VR = "OB"
    files["badcodec.dcm"] = dicom_bytes(us, implicit_vr=False, little_endian=True, force_encoding=True)

    paths = {}
    for name, content in files.items():
        (out / name).write_bytes(content)
        paths[name] = out / name
    return paths
