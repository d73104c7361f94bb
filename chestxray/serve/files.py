"""Output files (images, CSVs) written under unique names and handed to a front end by path."""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from chestxray.serve.encode import encode_jpeg, encode_png


def file_stem(label: str) -> str:
    """A label as a safe file-name part."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in label)[:60] or "label"


def safe_cell(text: str) -> str:
    """Keeps spreadsheet programs from reading a file name as a formula."""
    return "'" + text if text[:1] in ("=", "+", "-", "@") else text


class OutputFiles:
    """Output images and CSVs under unique names, removed after ``max_age`` seconds.

    Gradio saves array outputs under a content-hash name and rewrites that file in place each time the
    same picture is produced again (the same example, many users): a client downloading it meanwhile gets
    a truncated file. A path is instead copied into Gradio's cache atomically and never rewritten.
    """

    def __init__(self, max_age: float = 900.0):
        self.root = Path(tempfile.gettempdir()) / f"chestxray_app_{os.getpid()}"
        self.max_age = max_age
        self._pruned = 0.0
        atexit.register(shutil.rmtree, self.root, True)

    def new_dir(self) -> Path:
        """A fresh folder for one request's outputs (old folders are pruned at most once a minute)."""
        self.root.mkdir(parents=True, exist_ok=True)
        now = time.time()
        if now - self._pruned > 60:
            self._pruned = now
            for old in self.root.iterdir():
                try:
                    if now - old.stat().st_mtime > self.max_age:
                        shutil.rmtree(old, ignore_errors=True)
                except OSError:
                    pass
        return Path(tempfile.mkdtemp(dir=self.root))

    @staticmethod
    def png(rgb: np.ndarray, path: Path) -> str:
        """Writes an RGB/gray uint8 array as PNG (:func:`~chestxray.serve.encode.encode_png`) and returns the path."""
        Path(path).write_bytes(encode_png(rgb))
        return str(path)

    @staticmethod
    def heatmap(rgb: np.ndarray, path: Path) -> str:
        """Writes a heatmap overlay as JPEG (:func:`~chestxray.serve.encode.encode_jpeg`) and returns the path
        (``path``'s suffix becomes ``.jpg``)."""
        path = Path(path).with_suffix(".jpg")
        path.write_bytes(encode_jpeg(rgb))
        return str(path)


#: This process's output files.
OUT = OutputFiles()
