"""Fast input pipeline: a decode-once uint8 image cache, datasets and on-device batch augmentation.

Every image is decoded once with :func:`chestxray.imaging.read_image`, resized with
:func:`chestxray.transforms.resize_gray` (the one resize the predictor also uses) and quantised to
uint8 into a single memory-mapped ``.npy``; training then only reads bytes and augments whole
batches on the GPU. The quantisation is the only difference to the predictor's path (<= 0.5/255).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Sequence
from multiprocessing.pool import ThreadPool
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from chestxray.transforms import resize_gray

CACHE_VERSION = 1


def load_uint8(path: str, size: int) -> np.ndarray:
    """Decodes one image and resizes it exactly as the cache does: uint8 size x size."""
    from chestxray.imaging import read_image

    x = resize_gray(read_image(path).pixels, (size, size))[0, 0]
    return x.mul(255.0).round_().clamp_(0, 255).to(torch.uint8).numpy()


def cache_key(paths: Sequence[str], size: int) -> str:
    """Hash of the sorted paths, their file sizes and mtimes, the size and the cache version."""
    h = hashlib.sha256(f"v{CACHE_VERSION}|{int(size)}".encode())
    for p in sorted(paths):
        try:
            st = os.stat(p)
            h.update(f"|{p}|{st.st_size}|{st.st_mtime_ns}".encode())
        except OSError:
            h.update(f"|{p}|missing".encode())
    return h.hexdigest()


class CachedImages:
    """A built cache: ``array`` (read-only memmap, N x size x size uint8) and its paths."""

    def __init__(self, npy_path: str | os.PathLike, index: dict, built: bool = False):
        self.npy_path = Path(npy_path)
        self.paths: list[str] = list(index["paths"])
        self.size: int = int(index["size"])
        self.key: str = index["key"]
        self.failed: dict[str, str] = dict(index.get("failed", {}))  # unreadable path -> error
        self.built = built  # True when this call decoded the images, False when reused
        self.build_seconds: float = float(index.get("build_seconds", 0.0))
        self.array = np.load(self.npy_path, mmap_mode="r")
        self._row = {p: i for i, p in enumerate(self.paths)}
        if self.array.shape != (len(self.paths), self.size, self.size):
            raise ValueError(f"{self.npy_path}: shape {self.array.shape} does not match its index")

    def __getstate__(self) -> dict:  # spawn-started DataLoader workers reopen the memmap
        state = self.__dict__.copy()
        state["array"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.array = np.load(self.npy_path, mmap_mode="r")

    def __len__(self) -> int:
        return len(self.paths)

    def __contains__(self, path: str) -> bool:
        return path in self._row

    def index_of(self, path: str) -> int:
        """Row of ``path`` in ``array`` (KeyError when it is not cached, e.g. unreadable)."""
        return self._row[path]

    def __repr__(self) -> str:
        return f"CachedImages({len(self)} x {self.size}px, {len(self.failed)} failed, {self.npy_path})"


def build_cache(df: pd.DataFrame | Sequence[str], size: int, cache_dir: str | os.PathLike, workers: int = 2,
                progress: bool = True) -> CachedImages:
    """Decodes each image once into ``cache_dir/xray_{size}px_{key16}.npy`` (+ ``.json`` index).

    Reused when a cache with the same key exists (same sorted paths, file sizes/mtimes and size);
    otherwise rebuilt. Unreadable images are dropped and listed in ``CachedImages.failed``.
    A cache is only visible once complete (written under a temporary name, index written last).
    """
    paths = list(dict.fromkeys(df["path"] if isinstance(df, pd.DataFrame) else df))  # unique, in order
    size = int(size)
    key = cache_key(paths, size)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    stem = cache_dir / f"xray_{size}px_{key[:16]}"
    npy, idx = stem.with_suffix(".npy"), stem.with_suffix(".json")
    if npy.exists() and idx.exists():
        try:
            index = json.loads(idx.read_text())
            if index.get("key") == key:
                return CachedImages(npy, index, built=False)
        except (ValueError, OSError):
            pass  # corrupt index: rebuild

    t0 = time.perf_counter()
    tmp = stem.with_suffix(f".tmp{os.getpid()}.npy")
    arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(paths), size, size))
    ok = np.zeros(len(paths), dtype=bool)
    failed: dict[str, str] = {}

    def work(i: int):
        try:
            return i, load_uint8(paths[i], size), None
        except Exception as e:  # noqa: BLE001 - one broken file must not abort a long build
            return i, None, f"{type(e).__name__}: {e}"

    torch_threads = torch.get_num_threads()
    if workers > 1:
        torch.set_num_threads(1)  # the pool gives the parallelism; avoid oversubscription
    try:
        with ThreadPool(max(1, workers)) as pool, tqdm(total=len(paths), desc=f"cache {size}px",
                                                      disable=not progress, leave=False) as bar:
            for i, img, err in pool.imap_unordered(work, range(len(paths)), chunksize=8):
                if err is None:
                    arr[i] = img
                    ok[i] = True
                else:
                    failed[paths[i]] = err
                bar.update()
    finally:
        torch.set_num_threads(torch_threads)

    if len(paths) and not ok.any():
        del arr
        os.remove(tmp)
        raise RuntimeError(f"no image could be read, e.g. {next(iter(failed.items()))}")
    if ok.all():
        arr.flush()
        del arr
        os.replace(tmp, npy)
    else:  # compact the readable rows into the final file
        final = np.lib.format.open_memmap(npy, mode="w+", dtype=np.uint8, shape=(int(ok.sum()), size, size))
        keep = np.flatnonzero(ok)
        for start in range(0, len(keep), 1024):
            final[start:start + 1024] = arr[keep[start:start + 1024]]
        final.flush()
        del final, arr
        os.remove(tmp)
    index = {"key": key, "size": size, "version": CACHE_VERSION, "paths": [p for p, k in zip(paths, ok) if k],
             "failed": failed, "build_seconds": round(time.perf_counter() - t0, 3)}
    tmp_idx = idx.with_suffix(f".tmp{os.getpid()}")
    tmp_idx.write_text(json.dumps(index))
    os.replace(tmp_idx, idx)
    return CachedImages(npy, index, built=True)


def _targets(df: pd.DataFrame, labels: Sequence[str]) -> torch.Tensor:
    return torch.tensor(df[list(labels)].to_numpy(dtype=np.float32).reshape(len(df), len(labels)))


class XrayDataset(torch.utils.data.Dataset):
    """(uint8 1 x H x W image, float K target with NaN = unknown) from a :class:`CachedImages`.

    Rows whose image is not in the cache (unreadable) are dropped; ``self.df`` holds the rows kept,
    in order, so predictions line up with it.
    """

    def __init__(self, cache: CachedImages, df: pd.DataFrame, labels: Sequence[str]):
        keep = df["path"].map(lambda p: p in cache).to_numpy(dtype=bool)
        self.dropped = int((~keep).sum())
        self.df = df[keep]
        self.labels = list(labels)
        self.cache = cache
        self.rows = np.array([cache.index_of(p) for p in self.df["path"]], dtype=np.int64)
        self.targets = _targets(self.df, self.labels)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        img = torch.from_numpy(np.array(self.cache.array[self.rows[i]]))[None]
        return img, self.targets[i]


class RawXrayDataset(torch.utils.data.Dataset):
    """Same items as :class:`XrayDataset`, but decoding and resizing each file on every access."""

    def __init__(self, df: pd.DataFrame, labels: Sequence[str], size: int):
        self.df = df
        self.labels = list(labels)
        self.size = int(size)
        self.paths = list(df["path"])
        self.targets = _targets(df, self.labels)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(load_uint8(self.paths[i], self.size))[None], self.targets[i]


def batch_augment(x: torch.Tensor, generator: torch.Generator | None = None, strength: float = 1.0,
                  hflip: bool = False, rotate: float = 7.0, scale: tuple[float, float] = (0.9, 1.1),
                  translate: float = 0.06, brightness: float = 0.08, contrast: float = 0.15,
                  gamma: float = 0.2) -> torch.Tensor:
    """Augments a whole batch on its device: one affine warp + per-image intensity jitter.

    Affine: rotation +-``rotate`` degrees, zoom in ``scale``, shift +-``translate`` of the side
    (one ``affine_grid``/``grid_sample`` call, zeros outside). Intensity: gamma
    ``exp(U(-gamma, gamma))``, contrast ``1 + U(-contrast, contrast)`` about the image mean,
    brightness ``+U(-brightness, brightness)``. ``strength`` scales every range (0 = identity).

    No horizontal flip by default: chest films are not mirror-symmetric (heart, aortic knob and
    gastric bubble on the left, liver on the right, laterality markers burnt in); a flipped film is
    dextrocardia / situs inversus, which the model would learn as normal. ``hflip=True`` flips
    half the batch anyway (e.g. for findings whose side does not matter).

    Args:
        x: B x 1 x H x W, uint8 (0..255) or float in [0, 1].
        generator: makes it deterministic; random numbers are drawn on its device, then moved.

    Returns:
        float32 B x 1 x H x W in [0, 1] on ``x.device``.
    """
    x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
    b, _, h, w = x.shape
    gdev = generator.device if generator is not None else torch.device("cpu")
    u = (torch.rand(b, 8, generator=generator, device=gdev) * 2 - 1).to(x.device)  # U(-1, 1)
    s = float(strength)
    if s == 0 and not hflip:
        return x.clamp(0.0, 1.0)
    angle = u[:, 0] * math.radians(rotate) * s
    lo, hi = scale
    zoom = 1.0 + ((hi + lo) / 2 - 1.0) * s + u[:, 1] * (hi - lo) / 2 * s
    tx, ty = u[:, 2] * 2 * translate * s, u[:, 3] * 2 * translate * s  # normalised coords span 2
    flip = torch.where(u[:, 4] > 0, -1.0, 1.0) if hflip else torch.ones_like(u[:, 4])
    cos, sin = torch.cos(angle), torch.sin(angle)
    ar = w / h  # rotate in pixel space: theta = S^-1 R S with S = diag(w, h)
    theta = torch.stack([torch.stack([cos * flip / zoom, -sin * flip / (zoom * ar), tx], 1),
                         torch.stack([sin * ar / zoom, cos / zoom, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False).clamp_(0.0, 1.0)
    x = x.clamp_min_(1e-6).pow_(torch.exp(u[:, 5] * gamma * s).view(b, 1, 1, 1))
    c = (1.0 + u[:, 6] * contrast * s).view(b, 1, 1, 1)
    shift = x.mean(dim=(1, 2, 3), keepdim=True) * (1.0 - c) + (u[:, 7] * brightness * s).view(b, 1, 1, 1)
    return torch.addcmul(shift, x, c).clamp_(0.0, 1.0)  # (x - mean) * c + mean + brightness
