"""Predicting an archive: films decoded in worker processes, the model run batched, the CSV written as it goes.

``chestxray predict`` runs on this module. A :class:`torch.utils.data.DataLoader` reads and preprocesses the
films in worker processes (:class:`FilmDataset`: an unreadable file becomes an error string, never a crashed
loader) while the main process runs the model on whole batches (:func:`predict_films`), on the GPU when there
is one. Each film's probabilities, operating thresholds and input-gate warnings are those of
:meth:`Predictor.analyze <chestxray.predictor.Predictor.analyze>` on that film alone (to the float rounding of a
batched forward pass): the same preprocessing (``Predictor.preprocess``), the same forward
(``Predictor.infer``) and the same gate (``Gate.assess`` on the same features).

The CSV is appended batch by batch and flushed (:class:`CsvAppender`), so a killed run loses at most the batch
being written and ``resume`` continues it. Under ``torchrun`` each process takes every WORLD_SIZE-th film
(:class:`Shard`) and writes its own part file; rank 0 merges the parts in input order (:func:`merge_parts`).
"""
from __future__ import annotations

import csv
import dataclasses
import datetime
import os
import sys
from collections import defaultdict, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from chestxray.gate import GateResult, assess_without_gate
from chestxray.imaging import ImageReadError, XrayImage, read_image
from chestxray.predictor import Analysis, Predictor, as_pixels, display_image
from chestxray.transforms import resize_gray

#: Side of the thumbnail the input gate's pixel features start from: ``chestxray.gate.pixel_features`` squashes
#: every film to 128 x 128 first and computes everything else from that, so a worker sends this thumbnail
#: instead of the whole film and the gate's features are the same to the bit (tests/test_batch.py checks it).
GATE_VIEW = 128
#: How long rank 0 waits for the slowest rank at the merge (torch.distributed's default, 30 min, is too short
#: for an archive whose shards finish hours apart after a resume).
MERGE_TIMEOUT = datetime.timedelta(days=7)


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, which containers and ``taskset`` narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# --------------------------------------------------------------------------------------------
# Decoding in worker processes
# --------------------------------------------------------------------------------------------

@dataclass
class Film:
    """One film as a worker hands it over: its input tensor, what the gate reads, or why it failed."""

    index: int  # position in the dataset's paths
    x: torch.Tensor | None = None  # 1 x C x H x W model input (moved into Batch.x by collate)
    xray: XrayImage | None = None  # the decoded file's metadata, pixels reduced to the gate's view
    image: np.ndarray | None = None  # the display image, only when CAMs are drawn
    error: str = ""  # one user-facing line when the file could not be read


@dataclass
class Batch:
    """The films of one batch and the readable ones' inputs, stacked in their order."""

    films: list[Film]
    x: torch.Tensor | None  # N_readable x C x H x W

    def pin_memory(self) -> Batch:
        """Page-locked input, so the copy to the GPU overlaps (the DataLoader calls this with pin_memory)."""
        return Batch(self.films, None if self.x is None else self.x.pin_memory())


def gate_view(xray: XrayImage, pixels: np.ndarray) -> XrayImage:
    """The decoded file reduced to what the input gate reads: metadata, colour and a 128 x 128 thumbnail
    (:data:`GATE_VIEW`), small enough to pass between processes. A film the shape rule refuses keeps its
    pixels, since that rule reads the film's own aspect ratio (a square thumbnail would hide it)."""
    small = pixels if "shape" in assess_without_gate(xray, pixels).rules else (
        resize_gray(pixels, (GATE_VIEW, GATE_VIEW))[0, 0].numpy())
    return dataclasses.replace(xray, pixels=small, raw=None)


class FilmDataset(Dataset):
    """Reads and preprocesses films (in DataLoader workers); a file that fails becomes a :class:`Film` with
    ``error`` set, so one bad file never ends a run over an archive."""

    def __init__(self, paths: Sequence[str | os.PathLike], preprocess: Callable[[np.ndarray], torch.Tensor],
                 display: bool = False):
        self.paths = list(paths)
        self.preprocess = preprocess
        self.display = display

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Film:
        try:
            xray = read_image(self.paths[i])
            pixels = as_pixels(xray)
            return Film(i, self.preprocess(pixels), gate_view(xray, pixels),
                        display_image(pixels) if self.display else None)
        except ImageReadError as err:
            return Film(i, error=str(err))
        except Exception as err:  # noqa: BLE001 - an unforeseen failure on one odd file; its text may quote it
            return Film(i, error=f"could not be read ({type(err).__name__})")


def collate(films: list[Film]) -> Batch:
    """Stacks the readable films' inputs (in the worker, so the main process receives one tensor)."""
    xs = [f.x for f in films if f.x is not None]
    for f in films:
        f.x = None  # sent once, in Batch.x
    return Batch(films, torch.cat(xs) if xs else None)


# --------------------------------------------------------------------------------------------
# Batched inference
# --------------------------------------------------------------------------------------------

@dataclass
class Prediction:
    """One film's outcome: its analysis, or the error that kept it from the model."""

    path: Path
    analysis: Analysis | None
    error: str = ""


def gate_verdict(predictor: Predictor, xray: XrayImage, embedding: np.ndarray) -> GateResult:
    """The input gate's verdict as ``Predictor.analyze`` gives it (the fitted gate, else the fixed rules)."""
    if predictor.gate is not None:
        return predictor.gate.assess(xray, xray.pixels, embedding)
    return assess_without_gate(xray, xray.pixels)


def analyse_batch(predictor: Predictor, batch: Batch, paths: Sequence[str | os.PathLike]) -> list[Prediction]:
    """One forward pass over the batch's readable films, then each film's gate; in the batch's order."""
    if batch.x is not None:
        x = batch.x.to(predictor.device, non_blocking=True)
        probs, cams, embeddings = (t.float().cpu().numpy() for t in predictor.infer(x))
    out, k = [], 0
    for film in batch.films:
        path = Path(paths[film.index])
        if film.error:
            out.append(Prediction(path, None, film.error))
            continue
        verdict = gate_verdict(predictor, film.xray, embeddings[k])
        image = film.image if film.image is not None else np.zeros((0, 0), np.float32)  # no CAMs drawn
        out.append(Prediction(path, Analysis(
            predictor.labels, probs[k], cams[k], image, dict(predictor.thresholds), embeddings[k],
            warnings=list(verdict.reasons), gate=verdict, calibrated=predictor.calibrated,
            reference=predictor.reference)))
        k += 1
    return out


def predict_films(predictor: Predictor, paths: Sequence[str | os.PathLike], *, batch_size: int, workers: int = 0,
                  lanes: int = 1, threads: int | None = None, display: bool = False) -> Iterator[list[Prediction]]:
    """Predicts films batch by batch, in input order.

    Args:
        predictor: the loaded model (on the GPU when it is there).
        paths: image or DICOM files.
        batch_size: films per forward pass.
        workers: decoding processes (0: decode in this process, beside the forward passes).
        lanes: batches run through the model at once, each in its own thread (torch releases the GIL).
        threads: torch threads of each lane (None: torch's default). On a CPU, lanes of one thread each beat
            one forward spread over the cores: efficientnet_b0 costs 63 core-ms a film on one thread, 86 on two.
        display: also keep each film's display image (for CAM overlays; costs a resize and its transfer).

    Yields:
        Each batch's :class:`Prediction` list, as soon as it and the batches before it are done.
    """
    if batch_size < 1 or workers < 0 or lanes < 1:
        raise ValueError(f"--batch-size and --threads must be >= 1 and --workers >= 0, got {batch_size}, "
                         f"{lanes} and {workers}")
    loader = DataLoader(FilmDataset(paths, predictor.preprocess, display), batch_size=batch_size,
                        num_workers=workers, collate_fn=collate, pin_memory=predictor.device.type == "cuda")
    # torch's thread count is per thread (OpenMP): each lane sets its own
    setup = (torch.set_num_threads, (threads,)) if threads else (None, ())
    with ThreadPoolExecutor(lanes, thread_name_prefix="lane", initializer=setup[0], initargs=setup[1]) as pool:
        running: deque[Future[list[Prediction]]] = deque()
        for batch in loader:
            running.append(pool.submit(analyse_batch, predictor, batch, paths))
            if len(running) > lanes:  # one batch waits ready for the first free lane; the oldest is yielded
                yield running.popleft().result()  # first, so the rows stay in input order
        while running:
            yield running.popleft().result()


# --------------------------------------------------------------------------------------------
# The CSV, written as it goes
# --------------------------------------------------------------------------------------------

def read_rows(path: str | os.PathLike, header: Sequence[str]) -> list[list[str]]:
    """The complete rows of a prediction CSV (a torn last row of a killed run is left out).

    Raises:
        ValueError: the file's columns are not ``header`` (another model's CSV).
    """
    with open(path, newline="") as f:
        text = f.read()
    rows = list(csv.reader(text[: text.rfind("\n") + 1].splitlines(keepends=True)))
    if rows and rows[0] != list(header):
        raise ValueError(f"{path} has other columns than this model's predictions: use another --out")
    return rows[1:]


class CsvAppender:
    """A prediction CSV written batch by batch, each batch flushed (a killed run loses at most that batch).

    With ``resume`` and an existing file, its rows are kept (:attr:`done` holds their paths), a torn last row
    is cut off and new rows are appended; otherwise the file is started afresh. ``path=None``: standard output.
    """

    def __init__(self, path: str | os.PathLike | None, header: Sequence[str], resume: bool = False):
        self.done: list[str] = []
        if path is None:
            self.file: TextIO = sys.stdout
        elif resume and Path(path).is_file() and Path(path).stat().st_size:
            self.done = [r[0] for r in read_rows(path, header)]
            with open(path, "rb+") as f:  # cut a torn last row, so the next row starts on its own line
                f.truncate(f.read().rfind(b"\n") + 1)
            self.file = open(path, "a", newline="")  # noqa: SIM115 - closed in close()
        else:
            self.file = open(path, "w", newline="")  # noqa: SIM115 - closed in close()
        self.writer = csv.writer(self.file)
        if self.file is sys.stdout or self.file.tell() == 0:  # a new file (or one cut back to nothing)
            self.write([list(header)])

    def write(self, rows: Sequence[Sequence[str]]) -> None:
        """Appends rows and flushes them to the operating system."""
        self.writer.writerows(rows)
        self.file.flush()

    def close(self) -> None:
        """Closes the file (never standard output)."""
        if self.file is not sys.stdout:
            self.file.close()


def merge_parts(out: str | os.PathLike, parts: Sequence[Path], order: Sequence[str], header: Sequence[str],
                keep_existing: bool = False) -> list[list[str]]:
    """Merges the ranks' part files into ``out`` and deletes them; returns the rows they held.

    The parts' rows follow ``order`` (the input paths, duplicates included); a row whose path is not in it
    goes last. With ``keep_existing``, ``out``'s own rows (an earlier, resumed run) stay first. ``out`` is
    replaced at once, never left half-written.
    """
    existing = read_rows(out, header) if keep_existing and Path(out).is_file() else []
    pending: dict[str, deque[list[str]]] = defaultdict(deque)
    for part in parts:
        if part.is_file():
            for row in read_rows(part, header):
                pending[row[0]].append(row)
    new = [pending[p].popleft() for p in order if pending.get(p)]
    new += [row for rows in pending.values() for row in rows]
    tmp = Path(f"{out}.merging")
    with open(tmp, "w", newline="") as f:
        csv.writer(f).writerows([list(header), *existing, *new])
    os.replace(tmp, out)
    for part in parts:
        part.unlink(missing_ok=True)
    return new


# --------------------------------------------------------------------------------------------
# torchrun: one shard per process
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Shard:
    """This process's place among ``torchrun``'s (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @classmethod
    def from_env(cls) -> Shard:
        """Read from the environment torchrun sets; one process without it."""
        env = os.environ
        world = int(env.get("WORLD_SIZE", "1"))
        return cls(int(env.get("RANK", "0")), world, int(env.get("LOCAL_RANK", "0")),
                   int(env.get("LOCAL_WORLD_SIZE", str(world))))

    def take(self, items: Sequence) -> list:
        """Every ``world``-th item from ``rank`` on: shards of equal size and like content."""
        return list(items[self.rank::self.world])

    def part(self, out: str | os.PathLike, rank: int | None = None) -> Path:
        """The part file a rank writes (``out`` itself for a single process)."""
        rank = self.rank if rank is None else rank
        return Path(out) if self.world == 1 else Path(f"{out}.part{rank}of{self.world}")

    def parts(self, out: str | os.PathLike) -> list[Path]:
        """Every rank's part file, in rank order."""
        return [self.part(out, r) for r in range(self.world)]

    def device(self) -> torch.device | None:
        """This rank's GPU (LOCAL_RANK; ranks share them when there are more ranks than GPUs) when there are GPUs
        and several processes; None: the predictor's choice."""
        if self.world == 1 or not torch.cuda.is_available():
            return None
        return torch.device("cuda", self.local_rank % torch.cuda.device_count())

    def cores(self) -> int:
        """This process's share of the machine's usable cores."""
        return max(1, usable_cores() // max(1, self.local_world))

    def start(self) -> None:
        """Joins torchrun's process group. gloo also on GPUs: only a barrier and one number go through it."""
        import torch.distributed as dist

        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("gloo", timeout=MERGE_TIMEOUT)

    def barrier(self) -> None:
        """Waits for every rank (nothing to wait for alone)."""
        import torch.distributed as dist

        if self.world > 1:
            dist.barrier()

    def agree(self, code: int) -> int:
        """Rank 0's exit code, for every rank; waits for rank 0, so no rank's exit cuts its merge short
        (torchrun stops every process once one exits with an error)."""
        import torch.distributed as dist

        if self.world == 1:
            return code
        t = torch.tensor([code])
        dist.broadcast(t, 0)
        return int(t.item())

    def stop(self) -> None:
        """Leaves the process group."""
        import torch.distributed as dist

        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()
