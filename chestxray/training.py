"""Training: manifests -> patient-wise split -> cached batches -> a checkpoint folder with metrics.

Used by ``train/train.py`` (and ``torchrun`` for several processes). Multi-label throughout: the
model returns logits, the loss is BCE-with-logits over known labels only, thresholds are chosen on
the validation split, early stopping watches validation mean AUROC.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
import torch.distributed as dist
from tqdm import tqdm

from chestxray.checkpoint import init_from_checkpoint, save_checkpoint
from chestxray.ckpt_config import CkptMeta, Training
from chestxray.data import (XrayDataset, assert_patient_disjoint, batch_augment, build_cache,
                            cohort_patient_split, folds_from_cv, format_label_counts, load_sources,
                            masked_bce_loss, parse_cohort_fracs, patient_folds, pos_weights, read_manifest,
                            repeat_rows, split_from_lists)
from chestxray.distill import splits_from_run, teacher_probs
from chestxray.labels import get_label_set
from chestxray.layout import default_data_root
from chestxray.metrics import choose_threshold, mean_auroc
from chestxray.models import create_model
from chestxray.recipes import upgrade_run_config
from chestxray.transforms import GRAY_MEAN, GRAY_STD, normalize

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Every knob of a run; saved beside the checkpoint as ``train_config.json``."""

    arch: str = "mobilenetv2_100"
    labels: str = "nih14"
    sources: list[str] = field(default_factory=lambda: ["nih384", "nih64"])
    data_root: str = field(default_factory=default_data_root)  # $CHESTXRAY_DATA, else shared/data beside the checkout
    csv: str | None = None  # a custom label CSV instead of shared sources (with --images)
    images: str | None = None
    source_caps: list[str] = field(default_factory=list)  # e.g. ["kermany=500"]: at most N training images
    repeat: list[str] = field(default_factory=list)  # e.g. ["reproduce_chexnet=3"]: those training films 3x
    # Model selection + thresholds on the val images of these sources or cohorts (default: all).
    val_sources: list[str] = field(default_factory=list)
    cohort_fracs: list[str] = field(default_factory=list)  # e.g. ["reproduce_chexnet=0.25:0.25"] (val:test)
    # "patient" (seeded patient-wise), "lists" (train/val/test lists below) or "all": every film trains, no
    # validation or test split (the all-data weights of a cross-validated recipe, ``select: last``).
    split: str = "patient"
    train_list: str | None = None
    val_list: str | None = None
    test_list: str | None = None
    val_frac: float = 0.15
    test_frac: float = 0.15
    # k-fold cross-validation (``chestxray cv``): with folds = k, fold i's patients are the validation
    # split (held out) and the other k-1 folds train; no test split.
    folds: int = 0
    fold: int = 0
    select: str = "best"  # "best": keep the best validation epoch, stop early; "last": every epoch, no early stop
    img_size: int = 128
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.05
    schedule: str = "cosine"  # "cosine" (with warmup) or "plateau"
    warmup_epochs: float = 1.0
    pos_weight_max: float = 5.0  # class-imbalance: BCE pos_weight = neg/pos, clipped
    augment: float = 1.0
    drop_rate: float = 0.2
    # False (recorded recipes retrain bit for bit): one film order every epoch; True: a new order each epoch.
    reshuffle: bool = False
    pretrained: bool = False
    teacher: list[str] = field(default_factory=list)  # distil from these checkpoints (soft targets)
    kd_weight: float = 1.0  # loss = BCE(known labels) + kd_weight * BCE(teacher probabilities)
    # In cross-validation: a teacher's cross-validation folder; fold i is taught by its fold-i model (instead of
    # ``teacher``) and keeps its folds for the patients it had, so no student is scored on its teacher's films.
    teacher_cv: str | None = None
    split_from: str | None = None  # keep an earlier run's split (a teacher's) for the images it had
    init_from: str | None = None  # start from a released checkpoint's backbone (chest features), new head
    amp: bool = True  # bf16/fp16 autocast on GPU only
    channels_last: bool = True  # NHWC memory layout: faster on GPUs and, for these convnets, ~1.5x on CPU
    patience: int = 5  # early stopping on validation mean AUROC
    threshold_rule: str = "youden"
    seed: int = 0
    out: str = "runs/exp"
    cache_dir: str = ".cache/xray"
    workers: int = 2
    device: str = "auto"
    resume: bool = False
    half: bool = True  # publish weights in float16 (the run keeps float32; `release` compares both)
    max_steps: int = 0  # stop after this many optimizer steps (smoke tests); 0 = no limit
    eval_boot: int = 1000
    push_to_hub: str | None = None
    recipe_file: str | None = None  # the YAML file this run was configured from (set by --config), for the card

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """Builds a config, rejecting unknown keys (typos in YAML files fail loudly); older runs' key names
        are read too (:func:`chestxray.recipes.upgrade_run_config`)."""
        d = upgrade_run_config(d)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown training options: {', '.join(unknown)}")
        return cls(**d)


def seed_everything(seed: int) -> None:
    """Seeds python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _dist() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def build_manifest(cfg: TrainConfig, labels: list[str]):
    """Reads the training data and assigns splits by patient; checks no patient crosses splits."""
    if cfg.csv:
        df = read_manifest(cfg.csv, cfg.images or Path(cfg.csv).parent, labels, source=Path(cfg.csv).stem)
    else:
        df = load_sources(cfg.sources, cfg.data_root, labels)
    if cfg.folds:  # cross-validation: the cohorts given larger held-out shares are folded on their own
        cohorts = list(parse_cohort_fracs(cfg.cohort_fracs))
        df["fold"] = (folds_from_cv(df, cfg.teacher_cv, cfg.folds, cfg.data_root, seed=cfg.seed, cohorts=cohorts)
                      if cfg.teacher_cv else patient_folds(df, cfg.folds, seed=cfg.seed, cohorts=cohorts))
        df["split"] = np.where(df["fold"] == cfg.fold, "val", "train").astype(object)
    elif cfg.split == "all":  # the thresholds and the estimate come from the recipe's cross-validation
        df["split"] = "train"
    elif cfg.split_from:
        # The teacher's val/test patients stay out of training; images it never had are split anew.
        known = splits_from_run(df, cfg.split_from)
        per_patient = known.dropna().groupby(df["patient"]).first()
        split = df["patient"].map(per_patient)
        new = split.isna().to_numpy()
        if new.any():
            split[new] = cohort_patient_split(df[new], cfg.val_frac, cfg.test_frac, seed=cfg.seed,
                                              cohort_fracs=parse_cohort_fracs(cfg.cohort_fracs)).to_numpy()
        df["split"] = split.astype(object)
    elif cfg.split == "lists":
        df["split"] = split_from_lists(df, cfg.train_list, cfg.val_list, cfg.test_list, seed=cfg.seed,
                                       val_frac=cfg.val_frac)
    else:
        df["split"] = cohort_patient_split(df, cfg.val_frac, cfg.test_frac, seed=cfg.seed,
                                           cohort_fracs=parse_cohort_fracs(cfg.cohort_fracs))
    df = df[df["split"] != "unused"].reset_index(drop=True)
    assert_patient_disjoint(df)
    caps = {name: int(n) for name, _, n in (c.partition("=") for c in cfg.source_caps)}
    if caps:  # subsample big sources in training only; val/test keep every image
        rng = np.random.default_rng(cfg.seed)
        keep = np.ones(len(df), bool)
        for source, idx in df[df["split"] == "train"].groupby("source").groups.items():
            idx = np.asarray(idx)
            if source in caps and len(idx) > caps[source]:
                keep[rng.choice(idx, len(idx) - caps[source], replace=False)] = False
        df = df[keep].reset_index(drop=True)
    # What each source teaches each label (a label one source alone makes positive is confounded
    # with that source); the training split's counts, after the caps.
    log.info("training labels per source (positives/negatives/unknown):\n%s",
             format_label_counts(df[df["split"] == "train"]))
    return df


def _optimizer_state_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Flattens an optimizer state into tensors + JSON, so resume files are safetensors, not pickles."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt.{pid}.{k}"] = v.contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _load_optimizer_state(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    for key, v in meta["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _run_name(ref: str) -> str:
    """A checkpoint reference's display name (a run's ``best`` folder is named after its run)."""
    path = Path(ref)
    return path.parent.name if path.name == "best" else path.name


class Trainer:
    """One training run. ``run()`` returns the path of the best checkpoint folder."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.rank, self.world = _dist()
        self.out = Path(cfg.out)
        self.labels = get_label_set(cfg.labels)
        if cfg.select not in ("best", "last"):
            raise ValueError(f"select must be best or last, got {cfg.select!r}")
        if cfg.split == "all" and (cfg.select != "last" or cfg.folds):
            raise ValueError("split all trains on every film: it needs select last (nothing to select on) and no folds")
        if cfg.folds and not 0 <= cfg.fold < cfg.folds:
            raise ValueError(f"fold {cfg.fold} is not among the {cfg.folds} folds (0..{cfg.folds - 1})")
        if cfg.device == "auto":
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            self.device = torch.device(cfg.device)
        if self.device.type == "cuda" and self.world > 1:
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        self.mean, self.std = GRAY_MEAN, GRAY_STD

    # -- data ---------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Builds the manifest, the split and the uint8 image cache (rank 0 builds, others wait)."""
        cfg = self.cfg
        self.df = build_manifest(cfg, self.labels)
        if self.rank == 0:
            self.cache = build_cache(self.df, cfg.img_size, cfg.cache_dir, workers=cfg.workers,
                                     progress=self.rank == 0)
        if self.world > 1:
            dist.barrier()
            if self.rank != 0:
                self.cache = build_cache(self.df, cfg.img_size, cfg.cache_dir, progress=False)
        parts = {s: self.df[self.df["split"] == s] for s in ("train", "val", "test")}
        parts["train"] = repeat_rows(parts["train"], cfg.repeat)
        self.sets = {s: XrayDataset(self.cache, part, self.labels) for s, part in parts.items()}
        # The validation films that choose the epoch and thresholds (all of them without val_sources):
        # only these are predicted each epoch.
        val = self.df[self.df["split"] == "val"]
        named = val["source"].isin(cfg.val_sources) | val["cohort"].isin(cfg.val_sources)
        if cfg.val_sources and named.any():
            val = val[named]
        elif cfg.val_sources and len(val):
            log.warning("no validation film is of %s: every validation film selects", cfg.val_sources)
        self.sets["select"] = XrayDataset(self.cache, val, self.labels)
        self.pos_weight = pos_weights(self.sets["train"].df, self.labels, cfg.pos_weight_max)
        if cfg.teacher:  # soft targets ride along as K extra target columns of the training set
            train = self.sets["train"]
            if self.rank == 0:
                soft = teacher_probs(cfg.teacher, self.cache, list(train.df["path"]), self.labels, self.out,
                                     progress=True)
            if self.world > 1:
                dist.barrier()
                if self.rank != 0:
                    soft = teacher_probs(cfg.teacher, self.cache, list(train.df["path"]), self.labels, self.out)
            train.targets = torch.cat([train.targets, torch.from_numpy(soft)], dim=1)

    def loader(self, split: str, train: bool, epoch: int = 0) -> torch.utils.data.DataLoader:
        """A DataLoader over cached uint8 images (cheap: augmentation happens later, on the batch); ``epoch``
        picks the film order with ``reshuffle``."""
        ds = self.sets[split]
        sampler = None
        if train and self.world > 1:
            sampler = torch.utils.data.DistributedSampler(ds, self.world, self.rank, shuffle=True,
                                                          seed=self.cfg.seed)
        g = torch.Generator().manual_seed(self.cfg.seed + self.rank + (7919 * epoch if self.cfg.reshuffle else 0))
        return torch.utils.data.DataLoader(ds, batch_size=self.cfg.batch_size, shuffle=train and sampler is None,
                                           sampler=sampler, drop_last=train and len(ds) > self.cfg.batch_size,
                                           generator=g, num_workers=0, pin_memory=self.device.type == "cuda")

    # -- model --------------------------------------------------------------------------------
    def build_model(self) -> None:
        """Creates model, optimizer, schedule and (with several processes) the DDP wrapper."""
        cfg = self.cfg
        self.model = create_model(cfg.arch, len(self.labels), img_size=cfg.img_size, pretrained=cfg.pretrained,
                                  drop_rate=cfg.drop_rate)
        if cfg.init_from:
            if not cfg.split_from:  # its validation and test patients would be training films here
                raise ValueError("init_from needs split_from (that model's run or checkpoint)")
            self.model.init_report = init_from_checkpoint(self.model, cfg.init_from)
            log.info("%s initialised from %s", cfg.arch, self.model.init_report)
        self.model = self.model.to(self.device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.net = self.model
        if self.world > 1:
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        decay = [p for n, p in self.model.named_parameters() if p.ndim > 1]
        no_decay = [p for n, p in self.model.named_parameters() if p.ndim <= 1]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                      {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
        self.steps_per_epoch = max(1, len(self.loader("train", True)))
        total = self.steps_per_epoch * cfg.epochs
        warm = int(cfg.warmup_epochs * self.steps_per_epoch)
        if cfg.schedule == "cosine":
            def lr_at(step: int) -> float:
                if step < warm:
                    return (step + 1) / warm
                return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))
            self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_at)
        elif cfg.schedule == "plateau":
            self.sched = torch.optim.lr_scheduler.ReduceLROnPlateau(self.opt, mode="max", factor=0.3, patience=1)
        else:
            raise ValueError(f"unknown schedule {cfg.schedule!r} (cosine or plateau)")
        amp_ok = cfg.amp and self.device.type == "cuda"
        self.amp_dtype = torch.bfloat16 if amp_ok and torch.cuda.is_bf16_supported() else torch.float16
        self.use_amp = amp_ok
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp_ok and self.amp_dtype == torch.float16)

    def _inputs(self, x: torch.Tensor, train: bool, gen: torch.Generator | None = None) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        x = batch_augment(x, gen, strength=self.cfg.augment) if train else x.float().div_(255.0)
        x = normalize(x, self.mean, self.std, 1)
        if self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    @torch.no_grad()
    def predict(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(targets, probabilities) on a split, from the cached images."""
        self.model.eval()
        if not len(self.sets[split]):  # split "all": no validation films (the thresholds come from cv)
            return np.zeros((0, len(self.labels))), np.zeros((0, len(self.labels)))
        ys, ps = [], []
        for x, y in self.loader(split, False):
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.use_amp):
                logits = self.model(self._inputs(x, False))
            ps.append(torch.sigmoid(logits.float()).cpu().numpy())
            ys.append(y.numpy())
        return np.concatenate(ys), np.concatenate(ps)

    # -- state --------------------------------------------------------------------------------
    def save_state(self, epoch: int, best: float, bad_epochs: int, step: int, gen: torch.Generator) -> None:
        """Writes ``last_state.safetensors`` + ``.json``: everything needed to resume, no pickle. The random
        streams (augmentation, dropout) are saved too, so a resumed run is the run that was never stopped."""
        tensors = {f"model.{k}": v.contiguous() for k, v in self.model.state_dict().items()}
        tensors.update({"rng.augment": gen.get_state(), "rng.torch": torch.get_rng_state()})
        if self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        opt_t, opt_meta = _optimizer_state_tensors(self.opt)
        tensors.update(opt_t)
        safetensors.torch.save_file(tensors, str(self.out / "last_state.safetensors"))
        meta = {"epoch": epoch, "best": best, "bad_epochs": bad_epochs, "step": step, "optimizer": opt_meta,
                "scheduler": {k: v for k, v in self.sched.state_dict().items() if k != "lr_lambdas"},
                "config": dataclasses.asdict(self.cfg)}
        (self.out / "last_state.json").write_text(json.dumps(meta))

    def load_state(self, gen: torch.Generator) -> tuple[int, float, int, int]:
        """Restores model/optimizer/schedule/random streams from ``last_state``; returns (next epoch, best,
        bad, step). Only rank 0's streams are saved (the other ranks restart theirs), and a state saved before
        the streams were kept resumes with fresh ones."""
        tensors = safetensors.torch.load_file(str(self.out / "last_state.safetensors"), device=str(self.device))
        meta = json.loads((self.out / "last_state.json").read_text())
        if "rng.augment" in tensors and self.rank == 0:
            gen.set_state(tensors["rng.augment"].cpu())
            torch.set_rng_state(tensors["rng.torch"].cpu())
            if "rng.cuda" in tensors and self.device.type == "cuda":
                torch.cuda.set_rng_state(tensors["rng.cuda"].cpu(), self.device)
        self.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        _load_optimizer_state(self.opt, tensors, meta["optimizer"])
        sched = self.sched.state_dict()
        sched.update(meta["scheduler"])
        self.sched.load_state_dict(sched)
        return meta["epoch"] + 1, meta["best"], meta["bad_epochs"], meta["step"]

    def save_best(self, y: np.ndarray, p: np.ndarray, epoch: int, val_auc: float) -> Path:
        """Saves the checkpoint with per-label thresholds chosen on validation (``threshold_rule``)."""
        thresholds = {}  # none without validation films: Predictor's 0.5 until a release sets the cv ones
        for k, name in enumerate(self.labels if len(y) else []):
            thresholds[name] = round(float(choose_threshold(y[:, k], p[:, k], self.cfg.threshold_rule)), 6)
        training = Training(
            epoch=epoch, val_mean_auroc=None if math.isnan(val_auc) else round(val_auc, 4),  # split all: no val
            threshold_rule=self.cfg.threshold_rule, split=self.cfg.split, seed=self.cfg.seed,
            sources=sorted(self.df["source"].unique().tolist()), val_sources=list(self.cfg.val_sources) or "all",
            n_images={s: d.df["path"].nunique() for s, d in self.sets.items()},  # films: a repeat is one film
            pretrained=self.cfg.pretrained, img_size=self.cfg.img_size,
            initialised_from=getattr(self.model, "init_report", "random (from scratch)"),
            taught_by=(f"teacher {' + '.join(_run_name(t) for t in self.cfg.teacher)} "
                       f"(soft targets, kd_weight {self.cfg.kd_weight}) and the labels where known"
                       if self.cfg.teacher else "the labels"))
        return save_checkpoint(self.model, self.out / "best", arch=self.cfg.arch, labels=self.labels,
                               img_size=self.cfg.img_size, mean=self.mean, std=self.std, thresholds=thresholds,
                               meta=CkptMeta(training=training), half=False)

    # -- loop ---------------------------------------------------------------------------------
    def run(self) -> Path:
        """Trains, validates each epoch, keeps the best by validation mean AUROC, stops early."""
        cfg = self.cfg
        seed_everything(cfg.seed)
        self.out.mkdir(parents=True, exist_ok=True)
        self.prepare()
        self.build_model()
        if self.rank == 0:
            (self.out / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
            self.df.to_csv(self.out / "manifest.csv", index=False)
        start, best, bad, step = 0, -1.0, 0, 0
        gen = torch.Generator(device=self.device).manual_seed(cfg.seed * 1000 + self.rank)
        if cfg.resume and (self.out / "last_state.json").exists():
            start, best, bad, step = self.load_state(gen)
            log.info("resumed at epoch %d (best val mean AUROC %.4f)", start, best)
        log_path = self.out / "log.csv"
        for epoch in range(start, cfg.epochs):
            self.model.train()
            loader = self.loader("train", True, epoch)
            if isinstance(loader.sampler, torch.utils.data.DistributedSampler):
                loader.sampler.set_epoch(epoch)
            t0, total, n = time.perf_counter(), 0.0, 0
            bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=self.rank != 0, leave=False)
            for x, y in bar:
                with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.use_amp):
                    logits = self.net(self._inputs(x, True, gen))
                y = y.to(self.device)
                k = len(self.labels)
                loss = masked_bce_loss(logits.float(), y[:, :k], self.pos_weight)
                if cfg.teacher:
                    loss = loss + cfg.kd_weight * masked_bce_loss(logits.float(), y[:, k:])
                self.opt.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                self.scaler.step(self.opt)
                self.scaler.update()
                if cfg.schedule == "cosine":
                    self.sched.step()
                total, n, step = total + loss.item() * len(x), n + len(x), step + 1
                bar.set_postfix(loss=f"{total / n:.4f}")
                if cfg.max_steps and step >= cfg.max_steps:
                    break
            train_time = time.perf_counter() - t0
            if self.world > 1:
                dist.barrier()
            stop = False
            if self.rank == 0:
                y, p = self.predict("select")  # e.g. NIH's balanced validation films only (val_sources)
                val_loss = float(masked_bce_loss(torch.logit(torch.from_numpy(p).clamp(1e-6, 1 - 1e-6)),
                                                 torch.from_numpy(y))) if len(y) else math.nan
                val_auc = mean_auroc(y, p)
                if cfg.schedule == "plateau":
                    self.sched.step(val_auc if not math.isnan(val_auc) else 0.0)
                improved = not math.isnan(val_auc) and val_auc > best
                if cfg.select == "last":  # a fixed schedule: the final epoch is the model, whatever validation says
                    self.save_best(y, p, epoch + 1, val_auc)
                    best, bad = (val_auc if improved else best), 0
                elif improved or best < 0:
                    best, bad = (val_auc if not math.isnan(val_auc) else best), 0
                    self.save_best(y, p, epoch + 1, val_auc)
                else:
                    bad += 1
                row = {"epoch": epoch + 1, "train_loss": round(total / max(n, 1), 5), "val_loss": round(val_loss, 5),
                       "val_mean_auroc": round(val_auc, 5), "lr": self.opt.param_groups[0]["lr"],
                       "images_per_s": round(n / train_time, 1), "best": improved}
                new = not log_path.exists() or epoch == 0
                with log_path.open("w" if new else "a", newline="") as f:
                    w = csv.DictWriter(f, fieldnames=list(row))
                    if new:
                        w.writeheader()
                    w.writerow(row)
                log.info("epoch %d: %s", epoch + 1, row)
                self.save_state(epoch, best, bad, step, gen)
                stop = bad >= cfg.patience or bool(cfg.max_steps and step >= cfg.max_steps)
            if self.world > 1:
                flag = torch.tensor([int(stop)], device=self.device)
                dist.broadcast(flag, 0)
                stop = bool(flag.item())
            if stop:
                break
        return self.out / "best"


def train(cfg: TrainConfig) -> Path:
    """Runs training in this process (or as one rank of ``torchrun``); returns the best checkpoint."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and cfg.device != "cpu" else "gloo"
        dist.init_process_group(backend)
    try:
        best = Trainer(cfg).run()
        if cfg.push_to_hub and _dist()[0] == 0:
            # Publish what a user should see: the released folder (fp16 weights, card, plots).
            from chestxray.hub import publish
            from chestxray.release import release

            folder = release(cfg.out, cfg.push_to_hub.rsplit("/", 1)[-1], dest_root=Path(cfg.out) / "release",
                             n_boot=cfg.eval_boot, half=cfg.half, repo_id=cfg.push_to_hub,
                             fit_gate=False)  # the gate needs the shared chest/non-chest sets: `release` fits it
            log.info("published %s", publish(folder, cfg.push_to_hub))
        return best
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()
