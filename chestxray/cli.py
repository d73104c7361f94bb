"""Command line: ``chestxray {predict,evaluate,localize,train,cv,release,recard,publish,fit-gate,ensemble,compare} ...``.

Installed as the ``chestxray`` console script; ``python -m chestxray`` is the same. User errors
(unreadable images, unknown models, bad options) end with one ``error:`` line and a non-zero exit
code, never a traceback. Every heavy import (torch, timm, the imaging stack) happens inside the
command that needs it, so ``--help`` and ``--version`` answer at once.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from chestxray import __version__
from chestxray.layout import WEIGHTS_ENV, CheckpointError, default_data_root, weights_dir
from chestxray.sources import SOURCES

log = logging.getLogger("chestxray")


def default_model() -> str:
    """The app's default model (``models.yaml``), so the CLI and the app agree.

    Returns its shipped name when its folder is under :func:`weights_dir`, else the local folder the
    registry resolved (a pinned Hub revision in the Hugging Face cache), which ``Predictor.load`` takes too.
    """
    from chestxray.registry import ModelRegistry

    registry = ModelRegistry.from_yaml()
    name = registry.default()
    if name is None:
        raise CheckpointError(f"no trained model is installed (looked in {weights_dir()} and the Hugging Face "
                              f"cache); set ${WEIGHTS_ENV} or pass --model")
    folder = registry.folder(name)
    return name if folder == weights_dir() / name else str(folder)


def iter_images(paths: Sequence[str]) -> Iterator[Path]:
    """Files as given, and folders walked recursively for image/DICOM files (extension-less included)."""
    from chestxray.imaging import SUPPORTED_EXTENSIONS

    for p in map(Path, paths):
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                if f.is_file() and not f.name.startswith(".") and (
                        f.suffix.lower() in SUPPORTED_EXTENSIONS or f.suffix == ""):
                    yield f
        else:
            yield p


#: The CSV's columns after ``path`` and the labels (the app's batch CSV has the same ones).
ABOVE, WARNING, ERROR = "above_threshold", "warning", "error"


def cmd_predict(args: argparse.Namespace) -> int:
    """Predicts every image into a CSV; a bad file gets a row with its error (and a stderr line), the others
    are still predicted.

    Columns: ``path``, one probability per label, ``above_threshold`` (the labels at or above their
    operating threshold, most probable first, ``;``-separated), ``warning`` (the input gate's, ``; ``-separated)
    and ``error`` (why a file could not be read; its probabilities are then empty).

    Films are decoded in ``--workers`` processes while the model runs on batches of ``--batch-size``
    (:mod:`chestxray.batch`); the rows are written batch by batch in input order, so ``--resume`` continues a
    killed run. Under ``torchrun`` each process predicts its shard and rank 0 merges the parts into ``--out``.
    """
    from tqdm import tqdm

    from chestxray.batch import CsvAppender, Prediction, Shard, merge_parts, predict_films, read_rows
    from chestxray.ensemble import load_model

    shard = Shard.from_env()
    if (args.resume or shard.world > 1) and not args.out:
        print("error: --resume and torchrun need --out (the CSV to continue or merge into)", file=sys.stderr)
        return 2
    cores = shard.cores()
    workers = max(0, cores - 1) if args.workers is None else args.workers  # the model needs one core at least
    predictor = load_model(args.model or default_model(), device=shard.device())  # an ensemble folder too
    cpu = predictor.device.type == "cpu"
    # On a CPU, one lane a core (the lanes and the decoding workers share the cores, and whichever is ahead
    # waits); a GPU needs one thread to feed it.
    lanes = args.threads or (cores if cpu else 1)
    files = list(iter_images(args.paths))
    if not files:
        print("error: no image files found", file=sys.stderr)
        return 2
    header = ["path", *predictor.labels, ABOVE, WARNING, ERROR]
    cam_dir = Path(args.cam_dir) if args.cam_dir else None
    if cam_dir:
        cam_dir.mkdir(parents=True, exist_ok=True)

    def row(p: Prediction) -> list[str]:
        a = p.analysis
        if a is None:
            print(f"skipped {p.path}: {p.error}", file=sys.stderr)
            return [str(p.path), *([""] * len(predictor.labels)), "", "", p.error]
        for w in a.warnings:
            print(f"warning {p.path}: {w}", file=sys.stderr)
        if cam_dir:
            _write_cams(a, p.path, cam_dir, args.cam_label, args.alpha)
        return [str(p.path), *(f"{q:.5f}" for q in a.probs), ";".join(a.positives()),
                "; ".join(str(w) for w in a.warnings), ""]

    shard.start()
    try:
        sink = CsvAppender(shard.part(args.out) if args.out else None, header, resume=args.resume)
        done = set(sink.done)
        if shard.world > 1 and args.resume and Path(args.out).is_file():
            done |= {r[0] for r in read_rows(args.out, header)}  # merged by an earlier run
        todo = [f for f in shard.take(files) if str(f) not in done]
        written = failed = 0  # counted, not kept: an archive's rows need not fit in memory
        with tqdm(total=len(todo), desc="predict", unit="img", file=sys.stderr,
                  disable=len(todo) < 5 or not sys.stderr.isatty() or shard.rank > 0) as bar:
            for batch in predict_films(predictor, todo, batch_size=args.batch_size, workers=workers, lanes=lanes,
                                       threads=max(1, cores // lanes) if cpu else None, display=cam_dir is not None):
                sink.write(rows := [row(p) for p in batch])
                written, failed = written + len(rows), failed + sum(1 for r in rows if r[-1])
                bar.update(len(batch))
        sink.close()
        shard.barrier()  # every part is complete
        if shard.world > 1 and shard.rank == 0:  # the counts become every rank's
            rows = merge_parts(args.out, shard.parts(args.out), [str(f) for f in files], header, args.resume)
            written, failed = len(rows), sum(1 for r in rows if r[-1])
        if shard.rank == 0:
            already = len(files) - written
            print(f"{written - failed} predicted, {failed} skipped" + (" (see the error column)" if failed else "")
                  + (f"; {already} already in {args.out}" if already else ""), file=sys.stderr)
        return shard.agree(1 if failed else 0)
    finally:
        shard.stop()


def _write_cams(analysis, src: Path, cam_dir: Path, label: str | None, alpha: float) -> None:
    from PIL import Image

    labels = [label] if label and label != "positive" else (analysis.positives() if label == "positive" else
                                                            [analysis.top_label()])
    for k in labels:
        if k not in analysis.labels:
            raise ValueError(f"--cam-label {k!r} is not one of the model's labels")
        name = f"{src.stem}_{k.replace(' ', '_')}.png"
        # the colour key is drawn on, so that the file explains itself away from the app
        Image.fromarray(analysis.overlay(k, alpha, colorbar=True)).save(cam_dir / name)


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Writes metrics.json, ROC, confusion and reliability plots for labelled images."""
    from chestxray.evaluate import evaluate

    m = evaluate(args.model or default_model(), args.out, labels_csv=args.labels, images=args.images,
                 sources=args.source or (), data_root=args.data_root, split=args.split, n_boot=args.n_boot,
                 progress=sys.stderr.isatty(), localize=not args.no_localize)
    ci = m.get("mean_auroc_ci") or [None, None]
    mean = m.get("mean_auroc")
    print(f"mean AUROC {mean:.4f} (95% CI {ci[0]:.4f}-{ci[1]:.4f}) on {m['n_images']} images -> {args.out}"
          if mean is not None and ci[0] is not None else f"mean AUROC undefined on {m['n_images']} images")
    for g, gm in sorted(m.get("by_group", {}).items()):
        if gm.get("mean_auroc") is not None:
            print(f"  {g}: {gm['mean_auroc']:.4f} on {gm['n_images']} images")
    if m.get("undefined_labels"):
        print(f"labels without positives or negatives here: {', '.join(m['undefined_labels'])}")
    if (ts := m.get("temperature_scaling")):
        b, a = ts["all"]["before"], ts["all"]["after"]
        print(f"temperature-calibrated ({len(ts['temperatures'])} labels): pooled ECE {b['pooled_ece']:.4f} -> "
              f"{a['pooled_ece']:.4f}, mean Brier {b['mean_brier']:.4f} -> {a['mean_brier']:.4f}")
    if (loc := m.get("localization")):
        films = "held-out films" if loc.get("held_out") else "films (no splits.csv: training films included)"
        print(f"localization: map maximum in the box for {loc['hit_rate']:.1%} of {loc['n_pairs']} boxed findings "
              f"on {loc['n_films']} {films}; IoU " + ", ".join(f">={k} {v:.0%}" for k, v in loc["iou_hit_rate"].items()))
    return 0


def cmd_localize(args: argparse.Namespace) -> int:
    """Pointing game: does the finding's Grad-CAM maximum fall in the radiologists' box?"""
    import json

    from chestxray.ensemble import load_model
    from chestxray.localization import held_out_pointing_game

    result = held_out_pointing_game(load_model(args.model or default_model()), args.data_root)
    films = "held-out films" if result["held_out"] else "films (no splits.csv: training films included)"
    if not result["n_pairs"]:
        print(f"no boxed {films} of this model's labels in {result['folder']}")
        return 0
    def ious(m: dict) -> str:
        return ", ".join(f"{k} {v:.0%}" for k, v in m["iou_hit_rate"].items())

    print(f"map maximum inside the box: {result['hit_rate']:.1%} of {result['n_pairs']} finding boxes on "
          f"{result['n_films']} {films} (a random point: {result['chance']:.1%})")
    print(f"map boxes (cut at {result['box_threshold']:g} of the maximum): best box reaches IoU {ious(result)} "
          f"({result['n_pred_boxes']} map boxes, {result['n_gt_boxes']} radiologists' boxes)")
    for label, m in sorted(result["by_label"].items()):
        print(f"  {label}: {m['hit_rate']:.1%} of {m['n']} (random {m['chance']:.1%}); IoU {ious(m)}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


def cmd_release(args: argparse.Namespace) -> int:
    """Builds a shipped checkpoint folder from a training run."""
    from chestxray.release import release
    from chestxray.release_cv import release_from_cv

    name = args.name or Path(args.run).name
    if args.cv:  # all-data weights: the cross-validation's figures, thresholds and calibration
        dest = release_from_cv(args.run, args.cv, name, dest_root=args.dest, data_root=args.data_root,
                               fit_gate=not args.no_gate, repo_id=args.repo_id)
    else:
        dest = release(args.run, name, dest_root=args.dest, data_root=args.data_root, n_boot=args.n_boot,
                       fit_gate=not args.no_gate, repo_id=args.repo_id, progress=sys.stderr.isatty(),
                       calibrate=not args.no_calibrate)
    print(f"released {dest}")
    return 0


def cmd_recard(args: argparse.Namespace) -> int:
    """Refreshes shipped checkpoint folders' cards, metrics and configs (temperatures) without their runs."""
    import json

    from chestxray.release import recard

    for folder in args.folders:
        out = recard(folder, args.data_root, n_boot=args.n_boot, progress=sys.stderr.isatty(),
                     localize=not args.no_localize, calibrate=not args.no_calibrate, tolerance=args.tolerance,
                     card_only=args.card_only)
        print(json.dumps(out, indent=1))
    return 0


def cmd_ensemble(args: argparse.Namespace) -> int:
    """Builds an ensemble folder (config, thresholds, measured figures beside each member's, plots, card)."""
    from chestxray.ensemble_cv import build_cv_ensemble
    from chestxray.ensemble_release import build_ensemble

    if sys.stderr.isatty() or args.verbose:
        logging.getLogger("chestxray").setLevel(logging.INFO)
    if args.cv:
        dest = build_cv_ensemble(args.members, args.name, dest_root=args.dest, data_root=args.data_root,
                                 n_boot=args.n_boot, timing_runs=args.timing_runs, timing_threads=args.timing_threads)
    else:
        dest = build_ensemble(args.members, args.name, dest_root=args.dest, data_root=args.data_root,
                              n_boot=args.n_boot, localize=not args.no_localize, timing_runs=args.timing_runs,
                              timing_threads=args.timing_threads, reuse=not args.forward_all, progress=True)
    print(f"built {dest}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """Two predictions.csv files on their common films: both mean AUROCs and the paired difference."""
    from chestxray.compare import compare_predictions, report_lines

    r = compare_predictions(args.a, args.b, args.data_root, source=args.source, cohort=args.cohort,
                            split_of=args.split_of, n_boot=args.n_boot)
    print("\n".join(report_lines(r, args.a, args.b, args.n_boot)))
    return 0


def cmd_fit_gate(args: argparse.Namespace) -> int:
    """Fits the input gate of a checkpoint folder on the shared chest X-rays and prints its rates."""
    import torch

    from chestxray.gate import GATE_FILE
    from chestxray.gate_fit import fit_from_folder

    torch.set_num_threads(max(1, args.threads))
    out = args.out or str(Path(args.model) / GATE_FILE)
    fit_from_folder(args.model, args.data_root, out, max_train_per_source=args.max_train_per_source,
                    max_eval_per_source=args.max_eval_per_source, target_fa=args.target_fa, seed=args.seed,
                    use_embedding=not args.no_embedding, manifest=args.manifest)
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    """Uploads a checkpoint folder to the Hugging Face Hub and prints the pinned reference for ``models.yaml``."""
    from chestxray.hub import pinned_ref, upload

    url, commit = upload(args.folder, args.repo_id, token=args.token, private=args.private)
    print(url)
    if commit:
        print(f"pin it in models.yaml: hub: {pinned_ref(args.repo_id, commit)}")
    return 0


def cmd_train(args: argparse.Namespace, rest: Sequence[str]) -> int:
    """Hands the remaining arguments to :mod:`chestxray.train_cli` (its flags come from TrainConfig)."""
    from chestxray.train_cli import main as train_main

    return train_main(list(rest))


def cmd_cv(args: argparse.Namespace, rest: Sequence[str]) -> int:
    """Hands the remaining arguments to :func:`chestxray.cv.main` (the train flags plus the fold options)."""
    from chestxray.cv import main as cv_main

    return cv_main(list(rest))


#: Commands that parse their own flags (their ``--help`` is theirs).
OWN_FLAGS = {"train": cmd_train, "cv": cmd_cv}


def build_parser() -> argparse.ArgumentParser:
    """The ``chestxray`` argument parser (``train``'s own flags are parsed by :mod:`chestxray.train_cli`)."""
    p = argparse.ArgumentParser(
        prog="chestxray", description="Chest X-ray classification toolkit: predict, explain, evaluate, train, "
        "release and publish multi-label chest X-ray models.",
        epilog="Each command has its own --help, with examples. Models are found as the README's \"Where models "
               f"are found\" says (${WEIGHTS_ENV}, the checkout's weights/, the installed copy, pinned hf-hub: "
               "references).")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}", help="print the version and exit")
    p.add_argument("-v", "--verbose", action="store_true", help="log what happens (INFO level)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND",
                           help="what to do (each command has its own --help, with an example)")

    def command(name: str, help: str, example: str, **kw) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help[:1].upper() + help[1:] + ".",
                              epilog="example:\n  " + example.replace("\n", "\n  "),
                              formatter_class=argparse.RawDescriptionHelpFormatter, **kw)

    model_help = "shipped name, checkpoint folder or hf-hub:org/name[@commit] (default: the app's default model)"
    data_help = "folder of the shared data sources (default: $CHESTXRAY_DATA, else shared/data beside the checkout)"

    pr = command("predict", "probabilities per label for images, folders (recursive) or DICOMs",
                 "chestxray predict --out preds.csv film.dcm scans/\n"
                 "chestxray predict --model efficientnet_b0 --cam-dir cams/ --cam-label positive film.png\n"
                 "chestxray predict --workers 3 --batch-size 32 --resume --out archive.csv archive/\n"
                 "torchrun --nproc_per_node 4 -m chestxray predict --out archive.csv archive/   # one shard each")
    pr.add_argument("paths", nargs="+", metavar="PATH", help="image or DICOM files, or folders to walk recursively")
    pr.add_argument("--model", help=model_help)
    pr.add_argument("--out", help="CSV file: path, one probability column per label, above_threshold, warning, "
                                  "error (default: standard output)")
    pr.add_argument("--cam-dir", help="write Grad-CAM overlay PNGs here")
    pr.add_argument("--cam-label", help="label to explain (default: the top one; 'positive' = all above threshold)")
    pr.add_argument("--alpha", type=float, default=0.4, help="overlay opacity (default 0.4)")
    pr.add_argument("--workers", type=int, help="processes that decode the films while the model runs (default: "
                                                "the usable cores minus one; 0: decode in the main process)")
    pr.add_argument("--batch-size", type=int, default=16, help="films per forward pass (default 16)")
    pr.add_argument("--threads", type=int, help="batches run through the model at once, each in its own thread, "
                                                "the cores shared out among them (default: the usable cores on a "
                                                "CPU, 1 on a GPU)")
    pr.add_argument("--resume", action="store_true",
                    help="keep the rows already in --out and predict only the other files (a killed run "
                         "loses at most one batch)")
    pr.set_defaults(func=cmd_predict)

    ev = command("evaluate", "metrics.json, ROC curves, confusion matrices and calibration on labelled images",
                 "chestxray evaluate --model resnet18 --source nih384 --split test --out eval/\n"
                 "chestxray evaluate --model my_run/best --labels labels.csv --images films/ --out eval/")
    ev.add_argument("--model", help=model_help)
    ev.add_argument("--labels", help="label CSV (NIH layout, or one 0/1/blank column per label)")
    ev.add_argument("--images", help="folder the CSV's image names are relative to (default: the CSV's)")
    ev.add_argument("--source", action="append", help="shared-data source name instead (repeatable): "
                                                      + ", ".join(SOURCES))
    ev.add_argument("--data-root", default=default_data_root(), help=data_help)
    ev.add_argument("--split", help="only images this checkpoint's splits.csv puts in SPLIT (e.g. test)")
    ev.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for CIs (default 1000)")
    ev.add_argument("--out", required=True, help="output folder (metrics.json, roc.png, confusion.png, "
                                                 "reliability.png, predictions.csv)")
    ev.add_argument("--no-localize", action="store_true",
                    help="skip the pointing game on the boxed NIH films (run when the data root has the box files)")
    ev.set_defaults(func=cmd_evaluate)

    lc = command("localize", "pointing game and box IoU: Grad-CAM vs radiologists' boxes (NIH, RSNA)",
                 "chestxray localize --model resnet18 --out pointing.json")
    lc.add_argument("--model", help=model_help)
    lc.add_argument("--data-root", default=default_data_root(), help=data_help)
    lc.add_argument("--out", help="write every film's result as JSON here")
    lc.set_defaults(func=cmd_localize)

    command("train", "train a model: defaults < YAML recipe (--config) < flags; 'chestxray train --help' lists "
                     "every option", "chestxray train --config train/configs/resnet18.yaml --epochs 3",
            add_help=False)  # main() hands it the remaining arguments: `chestxray train --help` is train_cli's
    command("cv", "patient-wise k-fold cross-validation of a recipe (resumable), evaluated out of fold; "
                  "'chestxray cv --help' lists every option", "chestxray cv --config train/configs/cv/efficientnet_lite0.yaml",
            add_help=False)

    rl = command("release", "evaluate a training run and install it as a shipped checkpoint",
                 "chestxray release runs/resnet18 --name resnet18")
    rl.add_argument("run", help="training run folder (with best/, manifest.csv, log.csv)")
    rl.add_argument("--name", help="shipped folder name (default: the run folder's name)")
    rl.add_argument("--dest", help="destination root (default: the weights folder, see the README)")
    rl.add_argument("--data-root", help="folder of the shared data sources (default: the run's)")
    rl.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for CIs (default 1000)")
    rl.add_argument("--repo-id", help="Hub repo id for the model card's usage snippet")
    rl.add_argument("--no-gate", action="store_true", help="do not fit the input gate")
    rl.add_argument("--no-calibrate", action="store_true",
                    help="fit no per-label temperatures on the validation films")
    rl.add_argument("--cv", metavar="CV_DIR",
                    help="RUN trained on every film (split all): take the figures, thresholds and calibration from "
                         "this cross-validation of the same recipe (chestxray cv's --out)")
    rl.set_defaults(func=cmd_release)

    rc = command("recard", "refresh a shipped folder's card, metrics.json and config.json (temperatures) without "
                           "its training run; weights and gate untouched",
                 "chestxray recard weights/efficientnet_b0 --data-root ../shared/data")
    rc.add_argument("folders", nargs="+", metavar="FOLDER", help="shipped checkpoint folder(s) with splits.csv")
    rc.add_argument("--data-root", default=default_data_root(), help=data_help)
    rc.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for CIs (default 1000, as release)")
    rc.add_argument("--tolerance", type=float, default=2e-3,
                    help="largest difference to the shipped probabilities and AUROCs accepted (default 0.002)")
    rc.add_argument("--no-localize", action="store_true", help="skip the pointing game")
    rc.add_argument("--no-calibrate", action="store_true", help="fit no temperatures (removes existing ones)")
    rc.add_argument("--card-only", action="store_true",
                    help="compute nothing: rewrite README.md from the folder's own metrics.json and config.json")
    rc.set_defaults(func=cmd_recard)

    pb = command("publish", "upload a checkpoint folder to the Hugging Face Hub and print its pinned reference",
                 "HF_TOKEN=hf_... chestxray publish weights/resnet18 org/cxr-resnet18")
    pb.add_argument("folder", help="checkpoint folder (config.json + model.safetensors, card, plots)")
    pb.add_argument("repo_id", help="Hub model repo, org/name (created if missing)")
    pb.add_argument("--token", default=os.environ.get("HF_TOKEN"), help="Hub token (default: $HF_TOKEN, else "
                                                                        "the saved login)")
    pb.add_argument("--private", action="store_true", help="create the repo private")
    pb.set_defaults(func=cmd_publish)

    fg = command("fit-gate", "fit the input gate of a checkpoint folder and report its rates",
                 "chestxray fit-gate --model weights/resnet18 --manifest runs/resnet18/manifest.csv")
    fg.add_argument("--model", required=True, help="checkpoint folder (config.json + model.safetensors)")
    fg.add_argument("--data-root", default=default_data_root(), help=data_help)
    fg.add_argument("--out", default=None, help="output file (default: <model>/gate.safetensors)")
    fg.add_argument("--manifest", default=None,
                    help="the training run's manifest.csv (default: found beside the model folder or in its parent)")
    fg.add_argument("--target-fa", type=float, default=0.01, help="false-alarm rate aimed at on val chest X-rays")
    fg.add_argument("--max-train-per-source", type=int, default=600, help="fitting films per source (default 600)")
    fg.add_argument("--max-eval-per-source", type=int, default=300,
                    help="evaluation films per source (default 300)")
    fg.add_argument("--no-embedding", action="store_true", help="appearance components only")
    fg.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    fg.add_argument("--seed", type=int, default=0, help="random seed of the film sampling (default 0)")
    fg.set_defaults(func=cmd_fit_gate)

    en = command("ensemble", "build an ensemble folder: the members' calibrated probabilities and Grad-CAMs "
                             "averaged, thresholds chosen on every member's validation films, figures on every "
                             "member's test films",
                 "chestxray ensemble --name ensemble_nih14 --members efficientnet_b0 efficientnet_b2 resnet18 "
                 "mobilenetv2_100 swin_tiny_patch4_window7_224")
    en.add_argument("--members", nargs="+", required=True, metavar="MODEL",
                    help="model names (models.yaml entries or shipped folders); the first one's input gate is used")
    en.add_argument("--name", required=True, help="the folder's name under the weights folder (and in models.yaml)")
    en.add_argument("--dest", help="destination root (default: the weights folder, see the README)")
    en.add_argument("--data-root", default=default_data_root(), help=data_help)
    en.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for CIs (default 1000)")
    en.add_argument("--no-localize", action="store_true", help="skip the pointing game")
    en.add_argument("--timing-runs", type=int, default=15, help="runs of the CPU cost per film (default 15; 0: skip)")
    en.add_argument("--timing-threads", type=int, nargs="+", default=[1],
                    help="torch threads the CPU cost is measured with (default 1, as the app runs a request)")
    en.add_argument("--forward-all", action="store_true",
                    help="run every test film through the members instead of taking their predictions.csv (checked "
                         "against a fresh forward of a few films)")
    en.add_argument("--cv", action="store_true",
                    help="members released from cross-validations on the same folds (release --cv): figures and "
                         "thresholds from their out-of-fold predictions, over every labelled film")
    en.set_defaults(func=cmd_ensemble)

    cp = command("compare", "two models' predictions.csv on their common films: each mean AUROC and the paired "
                            "bootstrap CI of the difference",
                 "chestxray compare weights/efficientnet_b0/predictions.csv weights/efficientnet_lite0/predictions.csv "
                 "--cohort reproduce_chexnet --split-of weights/efficientnet_b0:test")
    cp.add_argument("a", help="the reference predictions.csv (the difference is B - A)")
    cp.add_argument("b", help="the other predictions.csv")
    cp.add_argument("--source", default="nih384", help="the source whose films are compared (default nih384)")
    cp.add_argument("--cohort", default=None, help="only this cohort's films (e.g. reproduce_chexnet)")
    cp.add_argument("--split-of", default=None, metavar="FOLDER:SPLIT",
                    help="only the films in SPLIT of FOLDER/splits.csv (e.g. weights/efficientnet_b0:test)")
    cp.add_argument("--data-root", default=default_data_root(), help=data_help)
    cp.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples (default 1000)")
    cp.set_defaults(func=cmd_compare)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command not in OWN_FLAGS:  # `train` and `cv` parse their own flags
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command not in OWN_FLAGS:  # training logs its progress at INFO level itself (chestxray.train_cli)
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    from chestxray.imaging import ImageReadError  # after parsing: --help never imports the imaging stack

    try:
        return OWN_FLAGS[args.command](args, rest) if args.command in OWN_FLAGS else args.func(args)
    except (ImageReadError, CheckpointError, ValueError, FileNotFoundError, KeyError) as err:
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
