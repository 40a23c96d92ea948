"""``python -m cfdebug <command>``: every command builds a config and calls the library.

A mistake a user can make prints one line on stderr and exits 2, without a traceback;
progress on long work goes to stderr, results to stdout (and ``--json``/``--csv`` files).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import uuid
import warnings
from pathlib import Path

from .config import BED_TRAIN_EPOCHS, DATA_FORMATS, DEFAULT_TRAIN_EPOCHS, DEMO_DATASETS, CFEConfig, DataConfig, ExtractConfig, ModelConfig, TrainConfig, TreatmentConfig, WorkspaceConfig, check_int, default_workdir
from .errors import CfdebugError, check_path_length
from .serve import DEFAULT_HOST, DEFAULT_PORT
from .store import write_text_atomic

EPILOG = "Defaults to the embedded demo (demo-cnn on biased-digits). Docs: README.md."

#: The flag of each workspace config field (as library messages name it), for :func:`for_cli`.
#: Fields without a flag (``train.batch_size``, ``extract.num_workers``, …) are left as named.
CLI_FLAGS: dict[str, str] = {
    "model.name": "--model",
    "model.weights": "--weights",
    "model.layer": "--layer",
    "data.source": "--data",
    "data.format": "--format",
    "data.input_size": "--input-size",
    "data.mean": "--mean",
    "data.std": "--std",
    "data.bias": "--bias",
    "data.val_fraction": "--val-fraction",
    "data.seed": "--data-seed",
    "train.epochs": "--epochs",
    "train.lr": "--lr",
    "train.seed": "--seed",
    "extract.batch_size": "--batch-size",
    "device": "--device",
    "workdir": "--workdir",
}


def flag_for(field_name: str) -> str | None:
    """The CLI flag that sets config field ``field_name`` (``"data.input_size"`` → ``"--input-size"``), or None."""
    return CLI_FLAGS.get(field_name)


def rename_fields(message: str, names: dict[str, str]) -> str:
    """``message`` with every backquoted field name in ``names`` replaced by its entry.

    Library messages name config fields (``Expected `data.val_fraction` to be in [0, 1), …``);
    the CLI shows its flags instead (:func:`for_cli`), the dashboard its widget labels.
    """
    return re.sub(r"`([A-Za-z_][\w.]*)`", lambda m: f"`{names.get(m.group(1), m.group(1))}`", message)


def for_cli(message: str) -> str:
    """``message`` with config field names replaced by the CLI flags that set them (:data:`CLI_FLAGS`)."""
    return rename_fields(message, CLI_FLAGS)


def _floats3(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three comma-separated numbers, got {text!r}") from None
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected three comma-separated numbers (one per RGB channel), got {text!r}")
    return values


def _workspace_parent() -> argparse.ArgumentParser:
    from .runtime import DEVICE_CHOICES  # imports torch: not at module level (the dashboard imports CLI_FLAGS)

    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("workspace (model, data, device)")
    g.add_argument("--model", default="demo-cnn", help="demo-cnn or a torchvision builder name (resnet18, vgg16, …); default: demo-cnn")
    g.add_argument("--weights", default=None, metavar="PATH", help="checkpoint: a state_dict (or one under `model`/`state_dict`) or a TorchScript file; read with weights_only=True")
    g.add_argument("--layer", default=None, help="target layer name (default: the last conv block, found automatically)")
    g.add_argument("--data", default="biased-digits", metavar="DATA", help=f"{' | '.join(DEMO_DATASETS)} | a folder (ImageFolder train/ test/ [val/], CUB-200-2011, CIFAR batches); default: biased-digits")
    g.add_argument("--format", default="auto", choices=DATA_FORMATS, help="dataset layout when it can't be inferred (default: auto)")
    g.add_argument("--input-size", type=int, default=None, metavar="PX", help="image side after resizing (default: 32 for digits/CIFAR, 224 otherwise)")
    g.add_argument("--mean", type=_floats3, default=None, metavar="R,G,B", help="normalisation mean (default 0.5,0.5,0.5 for digits/CIFAR, ImageNet's otherwise)")
    g.add_argument("--std", type=_floats3, default=None, metavar="R,G,B", help="normalisation std (default 0.25,0.25,0.25 for digits/CIFAR, ImageNet's otherwise)")
    g.add_argument("--bias", type=float, default=0.9, help="Biased Digits: fraction of training images whose corner square has the class colour (default 0.9)")
    g.add_argument("--val-fraction", type=float, default=0.1, help="fraction of train carved out as validation when the dataset has no val/ (default 0.1)")
    g.add_argument("--data-seed", type=int, default=0, help="seed of the dataset splits (default 0)")
    g.add_argument("--workdir", default=default_workdir(), help="artifact cache (default: $CFDEBUG_HOME or ./.cfdebug)")
    g.add_argument("--device", default="auto", help=f"{'|'.join(DEVICE_CHOICES)} (default auto: CUDA when available)")
    g.add_argument("--batch-size", type=int, default=128, help="batch size for extraction (default 128)")
    g.add_argument("--epochs", type=int, default=None, help=f"training epochs when a model is trained (default {DEFAULT_TRAIN_EPOCHS}; {', '.join(f'{v} on {k}' for k, v in BED_TRAIN_EPOCHS.items())})")
    g.add_argument("--lr", type=float, default=TrainConfig.lr, help=f"learning rate for training (default {TrainConfig.lr})")
    g.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    g.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p


def workspace_config(args) -> WorkspaceConfig:
    if not 0.0 <= args.val_fraction < 1.0:  # the same message as when a dataset without val/ needs it above 0
        from .data import val_fraction_error

        raise val_fraction_error(args.val_fraction)
    return WorkspaceConfig(
        model=ModelConfig(name=args.model, weights=args.weights, layer=args.layer),
        data=DataConfig(
            source=args.data, format=args.format, input_size=args.input_size, mean=args.mean, std=args.std,
            bias=args.bias, val_fraction=args.val_fraction, seed=args.data_seed,
        ),
        train=TrainConfig(epochs=args.epochs, lr=args.lr, seed=args.seed),
        extract=ExtractConfig(batch_size=args.batch_size),
        device=args.device,
        workdir=args.workdir,
    )


def progress_printer(args, prefix: str = ""):
    """A progress callback printing to stderr at most every 10% (and every message with ``%`` in ``prefix``)."""
    if getattr(args, "quiet", False):
        return None
    state = {"last": -1.0}

    def show(fraction: float, message: str) -> None:
        if fraction < state["last"]:
            state["last"] = -1.0  # a new stage of a longer job (e.g. training, then a sweep) starts from 0
        if fraction >= 1.0 or fraction - state["last"] >= 0.1 or "epoch" in message:
            state["last"] = fraction
            print(f"{prefix}{message}", file=sys.stderr, flush=True)

    return show


def _open_workspace(args, *, train: bool = False):
    from .workspace import Workspace

    cfg = workspace_config(args)
    return Workspace(cfg, progress_printer(args, "training: "), train=train)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def cmd_train(args) -> dict:
    ws = _open_workspace(args, train=True)
    meta = ws.model_meta
    acc = meta["accuracy"]
    path = ws.store.path("models", ws.model_digest) / "model.pt"
    state = "cached (same model, data and training config)" if meta.get("cache_hit") else "trained"
    print(f"{ws.config.model.name} on {ws.data.describe()}")
    print(f"model {state}: {path}")
    print(f"accuracy: train {_pct(acc['train'])}  val {_pct(acc['val'])}  test {_pct(acc['test'])}")
    if args.out:
        import shutil

        from .store import atomic_file

        with atomic_file(args.out) as tmp:
            shutil.copyfile(path, tmp)
        print(f"weights written to {args.out}")
    return {"model": ws.config.model.name, "data": ws.data.name, "checkpoint": str(path), "accuracy": acc, "cache_hit": bool(meta.get("cache_hit"))}


def cmd_extract(args) -> dict:
    ws = _open_workspace(args)
    report = {"model": ws.config.model.name, "layer": ws.target.name, "data": ws.data.name, "splits": {}}
    splits = args.splits.split(",")
    for split in splits:  # before any split is extracted
        if split not in ws.data.splits:
            raise CfdebugError(f"Expected `--splits` from train,val,test, but got {split!r}.")
    if _warn_skipped(ws):
        report["skipped_files"] = list(ws.data.skipped)
    print(f"{ws.config.model.name} (target layer {ws.target.name}) on {ws.data.describe()}, device {ws.device}")
    for split in splits:
        ex = ws.extractions.get(split, progress_printer(args, f"extract {split}: "))
        recall = ex.per_class_recall(ws.data.num_classes)
        n, c = ex.features.shape
        speed = ex.meta.get("images_per_s", float("nan"))
        cache = "cache hit (nothing recomputed)" if ex.cache_hit else f"computed, {speed:.0f} images/s"
        print(f"[{split}] N={n} C={c} accuracy {_pct(ex.accuracy)}; {cache}")
        print("  per-class recall: " + ", ".join(f"{ws.data.classes[k]}={recall[k]:.2f}" for k in range(len(recall))))
        report["splits"][split] = {
            "n": n, "channels": c, "accuracy": ex.accuracy, "per_class_recall": dict(zip(ws.data.classes, map(_nan_none, recall))),
            "images_per_s": speed, "cache_hit": ex.cache_hit, "artifact": str(ex.path),
        }
    return report


def _warn_skipped(ws) -> bool:
    """Print the count of dataset files (and class folders) that were skipped; whether there were any."""
    if ws.data.skipped:
        print(f"warning: skipped {len(ws.data.skipped)} file(s) or folder(s) that are not usable images, e.g. {ws.data.skipped[0]}", file=sys.stderr)
    return bool(ws.data.skipped)


def _nan_none(x):
    return None if x != x else float(x)


def detect_config(args):
    from .detect import DetectConfig, MCFilterConfig

    return DetectConfig(
        filters=MCFilterConfig(cfe=CFEConfig(epochs=args.cfe_epochs, batch_size=args.cfe_batch_size)),
        skip_threshold=args.skip_threshold,
        freq_threshold=args.freq_threshold,
        recall_cut=args.recall_cut,
        flag_row=args.flag_row,
        ablation_class=args.ablation_class,
        ablation_top_n=args.ablation_top_n,
        split=args.split,
    )


def print_table1(result: dict, model: str) -> None:
    """Table 1 of paper A, row by row, then the detection scores."""
    print(f"{'Model':<12}{'Total errors':>13}  {'Skip thr.':>9}  {'Freq. thr.':>10}  {'Metric':<15}{'Errors detected':>17}  {'New errors':>10}")
    for i, row in enumerate(result["table1"]):
        first = (model, str(result["total_errors"])) if i == 0 else ("", "")
        detected = f"{row['errors_detected']} ({row['errors_detected_pct']:.0f}%)"
        print(f"{first[0]:<12}{first[1]:>13}  {100 * row['skip_threshold']:>8.0f}%  {100 * row['freq_threshold']:>9.0f}%  {row['label']:<15}{detected:>17}  {row['new_errors']:>10}")
    print()
    print(f"{'error detection':<22}{'AUROC':>8}{'AUPR-Err':>10}")
    for key, label in (("mc_agreement", "MC-filter agreement"), ("msp", "max softmax (MSP)"), ("combined", "combined")):
        print(f"{label:<22}{_num3(result['auroc'][key]):>8}{_num3(result['aupr_err'][key]):>10}")


def _num3(value) -> str:
    """A score with 3 decimals, or ``n/a`` when it is undefined (``None``: e.g. no errors to rank)."""
    return "n/a" if value is None else f"{value:.3f}"


def cmd_detect(args) -> dict:
    from .detect import images_frame, run_detection

    config = detect_config(args)
    ws = _open_workspace(args)
    _warn_skipped(ws)
    result = run_detection(ws, config, progress_printer(args, "detect: "))
    print(f"{ws.config.model.name} (filters at {ws.target.name}) on {ws.data.describe()}; scoring the {config.split} split")
    print_table1(result, ws.config.model.name)
    keep = result["cfe_keep_rate"]
    print(f"\nCFE MC heads: {100 * keep['overall']:.1f}% of correctly classified training images keep their class "
          f"after masking; {keep['mean_mc_filters_overall']:.1f} MC filters per image on average (of {ws.target.channels})")
    empty = result["global_filters"]["empty_classes"]
    if empty:
        names = ", ".join(ws.data.classes[i] for i in empty)
        print(f"warning: no confident correct training image for class(es) {names}: their global MC sets are empty and "
              "their predictions are reported as unscorable", file=sys.stderr)
    print(f"re-ranking (top-{config.rerank_top_k} classes by agreement) fixes {result['rerank_fixed']} of the flagged errors")
    ab = result["ablation"]
    if ab["mc_recall_drop"] is None:
        print("causal check: skipped, no class has both a global MC set and images in the scored split")
    else:
        print(f"causal check (zero the top-{ab['top_n']} global MC filters of a class, mean over classes): recall drops by "
              f"{ab['mc_recall_drop']:.3f}, vs {ab['random_recall_drop']:.3f} for {ab['top_n']} random filters ({ab['n_random_draws']} draws)")
    if args.csv:
        frame = images_frame(result)
        frame["true"] = [ws.data.classes[i] for i in frame["true"]]
        frame["predicted"] = [ws.data.classes[i] for i in frame["predicted"]]
        frame["proposed"] = [ws.data.classes[i] for i in frame["proposed"]]
        columns = ["id", "path", "true", "predicted", "confidence", "recall", "precision", "f1", "flagged", "proposed", "unscorable", "error"]
        write_text_atomic(args.csv, frame[columns].to_csv(index=False))  # as text first: a full disk's message gives its size
        print(f"per-image table written to {args.csv}", file=sys.stderr)
    return result


def _floats(text: str, name: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CfdebugError(f"Expected `{name}` as comma-separated numbers (e.g. 1e-4,5e-4), but got {text!r}.") from None


def _ints(text: str, name: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CfdebugError(f"Expected `{name}` as comma-separated integers (e.g. 0,1,2), but got {text!r}.") from None


def _seeds(text: str, name: str) -> list[int]:
    """Comma-separated seeds, each in [0, 2^63) (:func:`check_int`), checked before any run exists."""
    return [check_int(seed, name, 0) for seed in _ints(text, name)]


def treat_run_config(args) -> dict:
    """The spec a treatment run is started from (also what the dashboard writes to run.json)."""
    from .config import TreatmentSchedule
    from .jobs import treat_spec

    l1, l2, seeds = _floats(args.lambda1, "--lambda1"), _floats(args.lambda2, "--lambda2"), _seeds(args.seeds, "--seeds")
    workspace = workspace_config(args)
    try:
        schedule = TreatmentSchedule(epochs=args.treat_epochs, lr=args.treat_lr, seed=seeds[0] if seeds else 0,
                                     batch_size=args.treat_batch_size, trainable=args.trainable)
        return treat_spec(workspace, schedule, l1, l2, seeds)
    except CfdebugError as exc:
        raise CfdebugError(rename_fields(str(exc), TREAT_FLAGS)) from None


#: The treat flag of each :class:`TreatmentSchedule` field and treat-spec grid (their messages name them).
TREAT_FLAGS = {"epochs": "--treat-epochs", "lr": "--treat-lr", "batch_size": "--treat-batch-size", "trainable": "--trainable",
               "seed": "--seeds", "lambdas1": "--lambda1", "lambdas2": "--lambda2", "seeds": "--seeds"}


def print_table2(result: dict, model: str) -> None:
    """Table 2 of paper A: λ1, λ2, train and test accuracy as mean ± std over seeds."""
    print(f"{'Model':<22}{'λ1 (MC)':>10}{'λ2 (non-MC)':>13}{'Train acc. (%)':>18}{'Val acc. (%)':>16}{'Test acc. (%)':>17}")

    def cell(row, split):
        mean, std = 100 * row[f"{split}_acc_mean"], 100 * row[f"{split}_acc_std"]
        return f"{mean:.2f}" if row["n_seeds"] <= 1 or row["model"] == "base" else f"{mean:.2f} ± {std:.2f}"

    for row in result["table2"]:
        name = {"base": f"{model} base", "fine-tuned": "Fine-tuned (control)", "treatment": f"{model} treated"}[row["model"]]
        l1 = "-" if row["model"] != "treatment" else f"{row['lambda1']:g}"
        l2 = "-" if row["model"] != "treatment" else f"{row['lambda2']:g}"
        print(f"{name:<22}{l1:>10}{l2:>13}{cell(row, 'train'):>18}{cell(row, 'val'):>16}{cell(row, 'test'):>17}")
    seeds = result["table2"][1]["n_seeds"]
    print(f"(mean ± sample std over {seeds} seed{'s' if seeds != 1 else ''}; the epoch kept is the best on validation, never test)")


def print_table3(result: dict, model: str) -> None:
    t3 = result["table3"]
    best = result["best"]
    print(f"\nTable 3: class recall change, base → treated (λ1={best['lambda1']:g}, λ2={best['lambda2']:g}, mean over seeds; test split)")
    print(f"{'':<10}{'Class':<14}{'Original':>10}{'Treated':>10}{'Change':>10}")
    for group, label in (("improved", "Improved"), ("worsened", "Worsened")):
        if not t3[group]:
            print(f"{label:<10}(no class {'improved' if group == 'improved' else 'worsened'})")
        for i, row in enumerate(t3[group]):
            print(f"{label if i == 0 else '':<10}{row['class']:<14}{row['original_recall']:>10.2f}{row['treated_recall']:>10.2f}{row['change']:>+10.2f}")


def _run_spec(args, kind: str, registry, new_spec) -> tuple[dict, str | None]:
    """``(spec, run_id)`` of a run command (treat, xcr, prepare), the same way for each: ``--resume
    RUN_ID`` (a stored run of ``kind``), ``--config RUN_JSON`` (its stored run id unless
    ``--run-id`` names another), or ``new_spec()`` from the flags with no run id (the job then
    registers a new run). ``new_spec`` checks the flags, so a mistake leaves no run behind."""
    from .jobs import read_run_spec

    if getattr(args, "resume", None):
        record = registry.get(args.resume)
        if record.status == "unreadable":
            raise CfdebugError(f"Cannot resume run {args.resume}: its {record.error}. Start a new run instead.")
        if record.kind != kind:
            raise CfdebugError(f"Run {args.resume} is a {record.kind!r} run, not a {kind!r} run; resume it with `python -m cfdebug {record.kind} --resume {args.resume}`.")
        return record.config, record.run_id
    if args.config:
        spec, stored_id = read_run_spec(args.config)
        return spec, args.run_id or stored_id
    return new_spec(), None


def _announce(registry, kind: str, workdir: str, started: dict):
    """The ``on_start`` of a run job: keeps ``run_id`` and ``ws`` in ``started`` and prints where
    the run lives and how to resume it, on stderr."""

    def on_start(run_id: str, ws) -> None:
        started.update(run_id=run_id, ws=ws)
        print(f"run {run_id} (registry {registry.db_path}); resume with: python -m cfdebug {kind} --resume {run_id} --workdir {workdir}", file=sys.stderr)

    return on_start


def _cancelled(kind: str, run_id: str) -> None:
    print(f"run {run_id} was cancelled; resume it with: python -m cfdebug {kind} --resume {run_id}", file=sys.stderr)


def cmd_treat(args) -> dict | None:
    """A treatment sweep as a registry run (:func:`cfdebug.jobs.run_treat_job`); under ``torchrun``
    every rank trains (DDP) and rank 0 alone writes the registry, checkpoints and output."""
    from .jobs import run_treat_job
    from .runs import RunRegistry

    registry = RunRegistry(args.workdir)
    spec, run_id = _run_spec(args, "treat", registry, lambda: treat_run_config(args))
    started = {}
    result = run_treat_job(spec, registry=registry, run_id=run_id, progress=progress_printer(args),
                           on_start=_announce(registry, "treat", args.workdir, started))
    if result is None:  # cancelled (rank 0: the registry recorded it), or another rank: prints nothing
        return _cancelled("treat", started["run_id"]) if started else None
    ws = started["ws"]
    print(f"{ws.config.model.name} on {ws.data.describe()}: treatment of the filters at {ws.target.name}" + (f" ({result['world_size']} processes, DDP)" if result["world_size"] > 1 else ""))
    print_table2(result, ws.config.model.name)
    print_table3(result, ws.config.model.name)
    fc = result["flagged_churn"]
    print(f"\nflagged-set churn (detection recomputed on the treated model, λ1={fc['lambda1']:g}, λ2={fc['lambda2']:g}, seed {fc['seed']}): "
          f"{fc['flagged_errors_fixed']} of {fc['flagged_errors_before']} flagged errors fixed; {fc['new_errors']} new errors, "
          f"{fc['new_errors_flagged']} of them flagged; flagged {fc['flagged_before']} → {fc['flagged_after']}")
    return result


def _filters(text: str | None, ws) -> list[int]:
    """``--filters I,J,…`` or ``top:N`` (the N filters most specific to a class, as the Class
    filters page ranks them) as filter indices."""
    if not text:
        return []
    if text.startswith("top:"):
        from .revise import most_specific_filters

        try:
            n = int(text[4:])
        except ValueError:
            raise CfdebugError(f"Expected `--filters top:N` with an integer N, but got {text!r}.") from None
        return most_specific_filters(ws, n)
    return _ints(text, "--filters")


def revise_config(args):
    """The :class:`ReviseConfig` of the revise options (shared by ``revise`` and ``report``)."""
    from .config import ReviseConfig

    values = {"epochs": args.revise_epochs, "lr": args.revise_lr, "fill": args.fill, "rrr_lambda": args.rrr_lambda,
              "filter_lambda": args.filter_lambda, "jitter": args.jitter}
    try:
        return ReviseConfig(**{k: v for k, v in values.items() if v is not None})
    except CfdebugError as exc:
        raise CfdebugError(rename_fields(str(exc), REVISE_FLAGS)) from None


#: The revise flag of each :class:`ReviseConfig` field.
REVISE_FLAGS = {"epochs": "--revise-epochs", "lr": "--revise-lr", "fill": "--fill", "rrr_lambda": "--rrr-lambda",
                "filter_lambda": "--filter-lambda", "jitter": "--jitter"}


def print_revise(result: dict) -> None:
    """The models a revise run kept (what chose them, what they do) and its verdicts."""
    from .verdicts import format_verdicts

    decl = result["declaration"]
    print(f"revise: {decl['method']}" + (f", region {decl['region']}" if decl.get("region") else "")
          + (f", filters {decl['filters']}" if decl.get("filters") else "")
          + ((f"; fill chosen on counterfactual validation: {result['fill']}" if result.get("fill_scores") else f"; fill {result['fill']}") if result.get("fill") else ""))
    cols = [c for c in ("model", "seed", "fill", "best_epoch", "cf_val_acc", "plain_val_acc", "test_acc", "cam_over_area", "wrong_region_acc") if c in result["summary"][0]]
    print("  ".join(f"{c:>14}" for c in cols))
    for row in result["summary"]:
        print("  ".join(f"{row[c]:>14.3f}" if isinstance(row.get(c), float) else f"{'-' if row.get(c) is None else str(row.get(c)):>14}" for c in cols))
    print("(epochs chosen on counterfactual validation: the validation split with the declared intervention applied; never test)")
    print(format_verdicts(result["verdicts"]))


def cmd_revise(args) -> dict | None:
    """A revise run (:func:`cfdebug.jobs.run_revise_job`) in the registry, like ``treat``: every
    option is checked (against the data) before the run exists."""
    from .jobs import revise_spec, run_revise_job
    from .revise import declare
    from .runs import RunRegistry

    def new_spec() -> dict:
        if not args.method:
            raise CfdebugError("Expected `--method` (region-counterfactual, region-rrr, filters, filters-zero or appearance), but got none.")
        ws = _open_workspace(args)
        decl = declare(ws, args.method, args.region, _filters(args.filters, ws))
        return revise_spec(ws.config, revise_config(args), decl.as_dict(), _seeds(args.seeds, "--seeds"), args.budget)

    registry = RunRegistry(args.workdir)
    spec, run_id = _run_spec(args, "revise", registry, new_spec)
    started = {}
    result = run_revise_job(spec, registry=registry, run_id=run_id, progress=progress_printer(args, "revise: "),
                            on_start=_announce(registry, "revise", args.workdir, started))
    if result is None:
        return _cancelled("revise", started["run_id"]) if started else None
    print_revise(result)
    return result


def _csv_list(text, name, convert, everything):
    if text is None:
        return None
    if text == "all":
        return tuple(everything)
    try:
        return tuple(convert(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise CfdebugError(f"Expected `{name}` as a comma-separated list or `all`, but got {text!r}.") from None


def xcr_run_config(args) -> dict:
    """The spec an XCR run is started from (what the dashboard writes to run.json), from the flags."""
    from .config import TABLE1_SWEEP
    from .data.corruptions import CORRUPTIONS
    from .jobs import xcr_spec
    from .xcr import default_xcr_config, override_xcr_config

    ws_config = workspace_config(args)
    cfg = override_xcr_config(
        default_xcr_config(ws_config),
        k=args.k, beta=args.beta, patch_size=args.patch_size, mode=args.mode, selector_epochs=args.selector_epochs,
        epochs=args.xcr_epochs, lr=args.xcr_lr, seeds=_csv_list(args.seeds, "--seeds", int, ()),
        corruptions=_csv_list(args.corruptions, "--corruptions", str, CORRUPTIONS),
        severities=_csv_list(args.severities, "--severities", int, (1, 2, 3, 4, 5)),
        cifar10c_dir=args.cifar10c, random_baseline=args.random_baseline or None, init=args.init,
        max_corrupt_images=args.max_corrupt_images, **(TABLE1_SWEEP if args.table1_sweep else {}),
    )
    return xcr_spec(ws_config, cfg)


#: The xcr flag of each XCR config field its messages name (``epochs`` and ``lr`` are the retraining's).
XCR_FLAGS = {"k": "--k", "beta": "--beta", "patch_size": "--patch-size", "mode": "--mode", "seeds": "--seeds",
             "corruptions": "--corruptions", "severities": "--severities", "cifar10c_dir": "--cifar10c", "init": "--init",
             "max_corrupt_images": "--max-corrupt-images", "epochs": "--xcr-epochs", "lr": "--xcr-lr"}


def cmd_xcr(args) -> dict | None:
    """An XCR report as a registry run (:func:`cfdebug.jobs.run_xcr_job`), like ``treat``: the job
    checks the options against the data, then registers the run (unless ``--config``/``--resume``
    name one), so the Calibration page lists what a terminal ran."""
    from .jobs import run_xcr_job
    from .runs import RunRegistry
    from .xcr import print_table1, print_table2

    registry = RunRegistry(args.workdir)
    try:
        spec, run_id = _run_spec(args, "xcr", registry, lambda: xcr_run_config(args))
        started = {"run_id": run_id}
        result = run_xcr_job(spec, registry=registry, run_id=run_id, progress=progress_printer(args, "xcr: "),
                             on_start=_announce(registry, "xcr", args.workdir, started), use_cache=not args.no_cache)
    except CfdebugError as exc:
        raise CfdebugError(rename_fields(str(exc), XCR_FLAGS)) from None
    if result is None:
        return _cancelled("xcr", started["run_id"]) if started["run_id"] else None
    print_table1(result)
    print_table2(result)
    return result


def cmd_prepare(args) -> dict | None:
    """A prepare run (:func:`cfdebug.jobs.run_prepare_job`): what the dashboard starts for a page
    whose artifacts are not cached yet; by hand it fills the cache before the dashboard opens."""
    from .jobs import prepare_spec, run_prepare_job
    from .runs import RunRegistry

    registry = RunRegistry(args.workdir)
    through = args.through or ("load" if args.train else "detect")
    spec, run_id = _run_spec(args, "prepare", registry, lambda: prepare_spec(workspace_config(args), through, train=args.train))
    result = run_prepare_job(spec, registry=registry, run_id=run_id, progress=progress_printer(args))
    if result is None:
        print(f"run {run_id} was cancelled", file=sys.stderr)
        return None
    print(f"{result['model']} on {result['data']}: ready through {result['through']} in {result['seconds']:.1f} s" + (f"; trained weights: {result['weights']}" if result.get("weights") else ""))
    return result


@contextlib.contextmanager
def _locked(path):
    """An exclusive advisory lock on ``path``.lock for a read-modify-write of ``path``."""
    import fcntl

    with open(f"{path}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
            Path(f"{path}.lock").unlink(missing_ok=True)


def _revise_declarations(args, ws) -> list[dict]:
    """The revise methods ``report --claims revise`` judges: ``--method`` (or every method the
    given ``--region``/``--filters`` allow), each checked before any training."""
    from .config import FILTER_METHODS, REGION_METHODS, REVISE_METHODS
    from .revise import declare

    filters = _filters(args.filters, ws)
    if args.method in (None, ""):
        methods = (list(REGION_METHODS) if args.region else []) + (list(FILTER_METHODS) if filters else [])
        if not methods:
            raise CfdebugError("Expected `--region X0,Y0,X1,Y1` or `--filters I,J,…` (or `--method appearance`) for the revise claim, but got none.")
    else:
        methods = list(REVISE_METHODS) if args.method == "all" else [m.strip() for m in args.method.split(",") if m.strip()]
    config = revise_config(args)
    out = []
    for method in methods:
        decl = declare(ws, method, args.region, filters)
        out.append({**decl.as_dict(), "config": config})
    return out


def cmd_report(args) -> dict:
    """Every chosen claim on one workspace, each method vs its baseline with a 95% interval and a verdict."""
    from .claims import CLAIMS, model_line, replace_marked_section, report_markdown, run_claims, verdicts_markdown
    from .config import TreatmentSchedule
    from .data.corruptions import CORRUPTIONS
    from .runtime import fixed_threads
    from .verdicts import format_verdicts
    from .xcr import default_xcr_config, override_xcr_config

    claims = _csv_list(args.claims, "--claims", str, CLAIMS)
    seeds = _seeds(args.seeds, "--seeds")
    lambdas1, lambdas2 = _floats(args.lambda1, "--lambda1"), _floats(args.lambda2, "--lambda2")
    for name, values in (("--lambda1", lambdas1), ("--lambda2", lambdas2), ("--seeds", seeds)):
        if not values:
            raise CfdebugError(f"Expected at least one value for `{name}`, but got {getattr(args, name[2:])!r}.")
    outputs = [(path, False) for path in args.markdown or []] + [(path, True) for path in args.markdown_verdicts or []]
    for path, _ in outputs:  # before hours of work, not after
        if not Path(path).is_file():
            raise CfdebugError(f"Expected --markdown {path} to be an existing file with the section markers, but it does not exist.")
        replace_marked_section(Path(path).read_text(), args.section or args.data, "")
    with fixed_threads(args.threads, deterministic=False):
        ws = _open_workspace(args)
        treatment = TreatmentSchedule(epochs=args.treat_epochs)
        xcr = override_xcr_config(
            default_xcr_config(ws.config), selector_epochs=args.selector_epochs, epochs=args.xcr_epochs,
            corruptions=_csv_list(args.corruptions, "--corruptions", str, CORRUPTIONS),
            severities=_csv_list(args.severities, "--severities", int, (1, 2, 3, 4, 5)),
        )
        xcr = override_xcr_config(xcr, table1_ks=(xcr.k,), table1_betas=(xcr.selector.beta,))  # Table 1 at the k, β used
        revise = _revise_declarations(args, ws) if "revise" in claims else None
        result = run_claims(ws, claims, seeds, budget=args.budget, treatment=treatment, lambdas1=lambdas1, lambdas2=lambdas2, xcr=xcr,
                            n_boot=args.n_boot, revise=revise, progress=progress_printer(args, "report: "))
    print(f"{ws.config.model.name} on {ws.data.describe()}: {', '.join(claims)} over seeds {', '.join(map(str, seeds))} "
          f"({result['seconds']:.0f} s, {args.threads} thread{'s' if args.threads != 1 else ''})")
    print(format_verdicts(result["verdicts"]))
    title = f"{ws.config.model.name} on {args.data}"
    command = "python -m cfdebug report " + " ".join(a for a in sys.argv[2:] if a) if sys.argv[1:2] == ["report"] else "python -m cfdebug report"
    for path, verdicts_only in outputs:
        short = f"**{title}** (`{command}`). {model_line(result)}\n\n{verdicts_markdown(result['verdicts'], headline_only=True)}"
        body = short if verdicts_only else report_markdown(result, title, command)
        with _locked(path):  # two reports (make -j2 results) may rewrite the same file
            write_text_atomic(path, replace_marked_section(Path(path).read_text(), args.section or args.data, body))
        print(f"wrote the {args.section or args.data} section of {path}", file=sys.stderr)
    return result


def cmd_runs(args) -> dict:
    from .runs import BACKGROUND_KINDS, RunRegistry, cancel

    if args.kind is not None and args.kind not in BACKGROUND_KINDS:
        raise CfdebugError(f"Expected `--kind` to be one of {', '.join(BACKGROUND_KINDS)}, but got {args.kind!r}.")
    registry = RunRegistry(args.workdir)
    if args.cancel:
        record = cancel(registry, args.cancel)
        print(f"run {record.run_id}: {record.status}")
        return {"run_id": record.run_id, "status": record.status}
    records = registry.list(args.kind)
    if not records:
        print(f"no runs in {registry.db_path}")
    for r in records:
        progress = r.progress or {}  # the latest row (cfdebug.runs.progress): a position, or an engine epoch
        where = f"{progress['fraction']:.0%} {progress.get('stage', '')}" if "fraction" in progress else f"epoch {progress['epoch']}" if "epoch" in progress else ""
        print(f"{r.run_id}  {r.kind:<7} {r.status:<10} {where:<16} {r.error or ''}")
    return {"runs": [{"run_id": r.run_id, "kind": r.kind, "status": r.status, "error": r.error} for r in records]}


def cmd_export_demo(args) -> dict:
    from .data import export_imagefolder

    counts = export_imagefolder(args.directory, bias=args.bias, seed=args.data_seed, bed=args.bed)
    print(f"wrote {args.bed}{f' (bias {args.bias})' if args.bed == 'biased-digits' else ''} to {args.directory}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    print(f"use it with: python -m cfdebug extract --data {args.directory}")
    return {"directory": str(args.directory), "counts": counts}


def cmd_models(args) -> dict:
    from .models import available_models

    names = available_models()
    print("\n".join(names))
    return {"models": names}


def cmd_bench(args) -> dict | None:
    from . import bench

    ws_config = workspace_config(args)
    if args.rss_child is not None:  # the fresh process `bench extract` measures RSS in
        print(json.dumps(bench.peak_rss_child(ws_config, args.rss_child)))
        return None
    n = bench.DEFAULT_N[args.what] if args.n is None else args.n
    if args.threads is None:
        return _run_bench(bench, args, ws_config, n)
    from .runtime import fixed_threads

    with fixed_threads(args.threads, deterministic=False):  # both sides of each ratio on the same threads
        return _run_bench(bench, args, ws_config, n)


def _run_bench(bench, args, ws_config, n: int) -> dict:
    if args.what == "extract":
        return bench.bench_extract(ws_config, n=n, repeats=args.repeats)
    if args.what == "cfe":
        return bench.bench_cfe(ws_config, n=n, repeats=args.repeats, limit=args.limit)
    if args.what == "treat":
        return bench.bench_treat(ws_config, epochs_per_repeat=args.epochs_per_repeat, repeats=args.repeats)
    return bench.bench_xcr_selector(ws_config, n=n)


def cmd_serve(args) -> None:
    from .serve import serve

    serve(args.host, args.port, args.root or (), args.read_only, args.streamlit_args)


def _add_serve(sub, ws, common) -> None:
    p = sub.add_parser("serve", help="start the dashboard (127.0.0.1 unless --host says otherwise); Streamlit options after --",
                       epilog="Sharing: put it behind a reverse proxy with authentication; --read-only for demos. Docs: README.md.")
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST}: this machine only; 0.0.0.0 shares it)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument("--root", action="append", metavar="DIR", help="a further folder the dashboard may read weights and datasets from (repeatable; the start folder and the workdir always are)")
    p.add_argument("--read-only", action="store_true", help="no launching or cancelling runs, only the preset workspaces (demos)")
    p.add_argument("streamlit_args", nargs="*", metavar="-- STREAMLIT_OPTION", help="further `streamlit run` options, after --")
    p.set_defaults(func=cmd_serve)


def _add_train(sub, ws, common) -> None:
    p = sub.add_parser("train", parents=[ws, common], help="train (or fetch from cache) a model and print train/val/test accuracy", epilog=EPILOG)
    p.add_argument("--out", default=None, metavar="PATH", help="also copy the trained state_dict to PATH")
    p.set_defaults(func=cmd_train)


def _add_extract(sub, ws, common) -> None:
    p = sub.add_parser("extract", parents=[ws, common], help="stream a dataset through the model; cache pooled target-layer features and logits", epilog=EPILOG)
    p.add_argument("--splits", default="train,val,test", help="comma-separated splits (default train,val,test)")
    p.set_defaults(func=cmd_extract)


def _add_detect(sub, ws, common) -> None:
    p = sub.add_parser("detect", parents=[ws, common], help="counterfactual filters: CFE heads, global MC filters, flagged predictions (Table 1), AUROC vs MSP", epilog=EPILOG)
    p.add_argument("--csv", default=None, metavar="PER_IMAGE.csv", help="write one row per scored image (id, path, true, predicted, confidence, recall, precision, f1, flagged, proposed, unscorable)")
    p.add_argument("--skip-threshold", type=float, default=0.9, help="only predictions with confidence <= this are checked (default 0.9; 0 disables skipping and checks every prediction)")
    p.add_argument("--freq-threshold", type=float, default=0.15, help="global MC set: filters with histogram > f * max (default 0.15)")
    p.add_argument("--recall-cut", type=float, default=0.3, help="the fixed recall threshold of the third Table-1 row (default 0.3)")
    p.add_argument("--flag-row", default="avg_f1", choices=["avg_recall", "avg_f1", "recall_cut"], help="which rule fills the per-image `flagged` column (default avg_f1)")
    p.add_argument("--ablation-class", type=int, default=None, help="class index for the causal check (default: mean over all classes)")
    p.add_argument("--ablation-top-n", type=int, default=5, help="filters zeroed in the causal check (default 5)")
    p.add_argument("--split", default="test", choices=["test", "val"], help="split to score (default test)")
    p.add_argument("--cfe-epochs", type=int, default=CFEConfig.epochs, help=f"training epochs of the CFE heads (default {CFEConfig.epochs}; each epoch runs the classifier head once per training image and class, which dominates for VGG-style heads)")
    p.add_argument("--cfe-batch-size", type=int, default=CFEConfig.batch_size, help=f"CFE batch size (default {CFEConfig.batch_size}; the loss is a sum over the batch)")
    p.set_defaults(func=cmd_detect)


def _add_treat(sub, ws, common) -> None:
    p = sub.add_parser("treat", parents=[ws, common], help="treatment: retrain with the MC-filter losses (λ1, λ2) against a CE-only control; Tables 2 and 3", epilog=EPILOG)
    p.add_argument("--lambda1", default="1e-3", help="weight(s) rewarding the true class's MC filters, comma-separated for a sweep (default 1e-3; paper grid 1e-4…2e-3)")
    p.add_argument("--lambda2", default="2e-5", help="weight(s) penalising non-MC filters, comma-separated (default 2e-5; paper grid 1e-5…1e-4)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds; every λ pair and the control run once per seed (default 0)")
    p.add_argument("--treat-epochs", type=int, default=10, help="fine-tuning epochs of each run (default 10)")
    p.add_argument("--treat-lr", type=float, default=1e-4, help="SGD learning rate of the fine-tuning (default 1e-4, momentum 0.9)")
    p.add_argument("--treat-batch-size", type=int, default=64, help="fine-tuning batch size (default 64)")
    p.add_argument("--trainable", default="block+head", choices=["block+head", "head", "all"], help="what is fine-tuned (default: the target block and the head)")
    p.add_argument("--config", default=None, metavar="RUN_JSON", help="start from a run.json (what the dashboard launches)")
    p.add_argument("--run-id", default=None, help="the registry id of the run started with --config")
    p.add_argument("--resume", default=None, metavar="RUN_ID", help="resume a stopped or crashed run from its last checkpoint")
    p.set_defaults(func=cmd_treat)


def _add_xcr(sub, ws, common) -> None:
    p = sub.add_parser("xcr", parents=[ws, common], help="XCR: explanation selector, masks, counterfactual retraining vs vanilla; calibration on clean and corrupted images (paper B Tables 1-2)", epilog=EPILOG)
    p.add_argument("--config", default=None, metavar="RUN_JSON", help="start from a run.json (what the dashboard launches)")
    p.add_argument("--run-id", default=None, help="the registry id of the run started with --config")
    p.add_argument("--resume", default=None, metavar="RUN_ID", help="resume a stopped or crashed run from its last checkpoint")
    p.add_argument("--k", type=int, default=None, help="patches kept by the selector (default 32 of 256 at 32 px, patch 2)")
    p.add_argument("--beta", type=float, default=None, help="weight of KL(p || uniform) in the selector loss")
    p.add_argument("--patch-size", type=int, default=None, help="patch side in pixels; must divide the image (default 2)")
    p.add_argument("--mode", default=None, choices=["Topk", "Softmax"], help="selection map used for T(x)")
    p.add_argument("--selector-epochs", type=int, default=None, help="selector training epochs")
    p.add_argument("--xcr-epochs", type=int, default=None, help="retraining epochs (vanilla and XCR alike)")
    p.add_argument("--xcr-lr", type=float, default=None, help="retraining learning rate")
    p.add_argument("--seeds", default=None, help="comma-separated retraining seeds (means over seeds are reported)")
    p.add_argument("--corruptions", default=None, help="comma-separated corruption names, or `all` (the 15 of CIFAR-10-C)")
    p.add_argument("--severities", default=None, help="comma-separated severities 1-5, or `all`")
    p.add_argument("--cifar10c", default=None, metavar="DIR", help="use the official CIFAR-10-C .npy files in DIR instead of generating corruptions")
    p.add_argument("--random-baseline", action="store_true", help="also retrain with random k-hot masks (paper B's random comparison)")
    p.add_argument("--init", default=None, choices=["pretrained", "scratch"], help="retrain from the loaded model or from a seeded random start")
    p.add_argument("--max-corrupt-images", type=int, default=None, help="cap on corrupted test images per corruption and severity")
    p.add_argument("--table1-sweep", action="store_true", help="Table 1 over paper B's grid, k in 16,32,64 x beta in 0.1,0.01,0.001 "
                   "(9 more XCR and VIBI selectors to train: several times the default run's time); default: Table 1 at the --k, --beta used")
    p.add_argument("--no-cache", action="store_true", help="recompute even when the same report is cached")
    p.set_defaults(func=cmd_xcr)


def _add_revise_options(p, required_method: bool) -> None:
    from .config import REVISE_FILLS, REVISE_METHODS, ReviseConfig

    g = p.add_argument_group("revise (what is not evidence, and how cfdebug fine-tunes against it)")
    g.add_argument("--method", required=required_method, default=None,
                   help=f"{' | '.join(REVISE_METHODS)}" + ("" if required_method else "; comma-separated, or `all` (default: the region methods with --region, the filter methods with --filters)"))
    g.add_argument("--region", default=None, metavar="X0,Y0,X1,Y1", help="the rectangle that is not evidence, in the model's input pixels (X1, Y1 exclusive); the demo's corner square is 1,1,7,7")
    g.add_argument("--filters", default=None, metavar="I,J,…", help="target-layer filters that are not evidence, or top:N (the N most class-specific, as the Class filters page ranks them)")
    g.add_argument("--fill", default=None, choices=REVISE_FILLS, help=f"region counterfactual fill (default {ReviseConfig.fill}: chosen on counterfactual validation)")
    g.add_argument("--rrr-lambda", type=float, default=None, help=f"weight of the input-gradient penalty inside the region (default {ReviseConfig.rrr_lambda:g})")
    g.add_argument("--filter-lambda", type=float, default=None, help=f"weight of L_nonMC on the chosen filters (default {ReviseConfig.filter_lambda:g})")
    g.add_argument("--jitter", type=float, default=None, help=f"appearance counterfactual strength in [0, 1] (default {ReviseConfig.jitter:g})")
    g.add_argument("--revise-epochs", type=int, default=None, help=f"fine-tuning epochs of the method and its control (default {ReviseConfig.epochs})")
    g.add_argument("--revise-lr", type=float, default=None, help=f"Adam learning rate of the method and its control (default {ReviseConfig.lr:g}, every layer)")


def _add_revise(sub, ws, common) -> None:
    p = sub.add_parser("revise", parents=[ws, common], help="revise: fine-tune against what you declare not evidence (a region, filters, an appearance) vs a CE control; verdicts", epilog=EPILOG)
    _add_revise_options(p, required_method=False)
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds; the method and the CE control run once per seed (default 0,1,2)")
    p.add_argument("--budget", type=float, default=0.1, help="review budget whose flagged predictions are counted (default 0.1)")
    p.add_argument("--config", default=None, metavar="RUN_JSON", help="start from a run.json (what the dashboard launches)")
    p.add_argument("--run-id", default=None, help="the registry id of the run started with --config")
    p.add_argument("--resume", default=None, metavar="RUN_ID", help="resume a stopped or crashed run from its last checkpoints")
    p.set_defaults(func=cmd_revise)


def _add_prepare(sub, ws, common) -> None:
    from .jobs import PREPARE_STAGES

    p = sub.add_parser("prepare", parents=[ws, common], help="open a workspace and cache what the dashboard's pages read (model, features, CFE heads, detection)", epilog=EPILOG)
    p.add_argument("--through", default=None, choices=PREPARE_STAGES, help="last stage to make: load (the model, trained if needed), extract, filters or detect (default detect; load with --train)")
    p.add_argument("--train", action="store_true", help="train the model on the data (a torchvision model without --weights) and stop; prints the weights' path")
    p.add_argument("--config", default=None, metavar="RUN_JSON", help="start from a run.json (what the dashboard launches)")
    p.add_argument("--run-id", default=None, help="the registry id of the run started with --config")
    p.set_defaults(func=cmd_prepare)


def _add_report(sub, ws, common) -> None:
    p = sub.add_parser("report", parents=[ws, common], help="verdicts: each method vs its baseline (detection vs MSP, treatment vs CE control, XCR vs vanilla) with 95%% intervals over seeds or images", epilog=EPILOG)
    p.add_argument("--claims", default="detection,treatment,xcr", help="comma-separated claims to judge: detection, treatment, xcr, revise (needs --region/--filters/--method), or `all` (default detection,treatment,xcr)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds: CFE fits for detection, paired runs for treatment and XCR (default 0,1,2)")
    p.add_argument("--budget", type=float, default=0.1, help="review budget: the fraction of test predictions flagged, lowest scores first (default 0.1)")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples of the test images for detection (default 2000)")
    p.add_argument("--lambda1", default=f"{TreatmentConfig.lambda1:g}", help=f"treatment λ1, or a comma-separated grid: the pair with the best validation accuracy is judged (default {TreatmentConfig.lambda1:g})")
    p.add_argument("--lambda2", default=f"{TreatmentConfig.lambda2:g}", help=f"treatment λ2, or a comma-separated grid (default {TreatmentConfig.lambda2:g})")
    p.add_argument("--treat-epochs", type=int, default=TreatmentConfig.epochs, help=f"fine-tuning epochs of treatment and control (default {TreatmentConfig.epochs})")
    p.add_argument("--selector-epochs", type=int, default=None, help="XCR selector training epochs (default: the XCR default)")
    p.add_argument("--xcr-epochs", type=int, default=None, help="XCR and vanilla retraining epochs (default: the XCR default)")
    p.add_argument("--corruptions", default=None, help="comma-separated corruptions for XCR, or `all` (default: the XCR default)")
    p.add_argument("--severities", default=None, help="comma-separated severities 1-5 for XCR, or `all` (default: the XCR default)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads; a fixed count makes the numbers identical on every machine (default 1)")
    p.add_argument("--markdown", action="append", metavar="FILE", help="replace the section between <!-- SECTION:start/end --> markers in FILE with the full report (repeatable)")
    p.add_argument("--markdown-verdicts", action="append", metavar="FILE", help="the same with the verdict table only (the README's results)")
    p.add_argument("--section", default=None, help="marker name for --markdown (default: the --data value)")
    _add_revise_options(p, required_method=False)
    p.set_defaults(func=cmd_report)


def _add_runs(sub, ws, common) -> None:
    p = sub.add_parser("runs", parents=[common], help="list the runs (treat, xcr, prepare) with where each is, or cancel one")
    p.add_argument("--workdir", default=default_workdir(), help="artifact cache holding runs.db (default: $CFDEBUG_HOME or ./.cfdebug)")
    p.add_argument("--kind", default=None, help="only runs of this kind (treat, xcr, prepare)")
    p.add_argument("--cancel", default=None, metavar="RUN_ID", help="cancel a queued or running run")
    p.set_defaults(func=cmd_runs)


def _add_export_demo(sub, ws, common) -> None:
    p = sub.add_parser("export-demo", parents=[common], help="write Biased Digits as an ImageFolder tree (DIR/train/<class>/*.png, DIR/val/…, DIR/test/…)")
    p.add_argument("directory", help="an empty or new folder")
    p.add_argument("--bias", type=float, default=0.9, help="shortcut strength in train/val (default 0.9; 0 = clean digits)")
    p.add_argument("--bed", default="biased-digits", choices=DEMO_DATASETS, help="which embedded set to export (default biased-digits; --bias applies to it only)")
    p.add_argument("--data-seed", type=int, default=0, help="split seed (default 0)")
    p.set_defaults(func=cmd_export_demo)


def _add_models(sub, ws, common) -> None:
    p = sub.add_parser("models", parents=[common], help="list the model names --model accepts")
    p.set_defaults(func=cmd_models)


def _add_bench(sub, ws, common) -> None:
    p = sub.add_parser("bench", parents=[ws, common], help="benchmarks that print ratios against a baseline measured in the same run")
    p.add_argument("what", choices=["extract", "cfe", "treat", "xcr"], help="extract: extraction vs plain inference time, and peak RSS at N vs 10×N images; cfe: CFE fit + mask prediction vs one extraction pass, and Grad-CAM batched vs one image at a time; treat: a treatment epoch vs a CE-only epoch; xcr: selector masks/s vs captum Occlusion, and both Avg Drops")
    p.add_argument("--epochs-per-repeat", type=int, default=2, help="bench treat: epochs per timed run (default 2)")
    p.add_argument("--n", type=int, default=None, help="images: for extract the timing and the smaller RSS run (default 2000); for cfe the Grad-CAM images (default 128); for xcr (default 64)")
    p.add_argument("--limit", type=int, default=None, help="bench cfe: only the first N training images for both sides of the ratio (default: all), e.g. vgg16 at --input-size 224")
    p.add_argument("--repeats", type=int, default=3, help="timing repeats; the fastest of each is compared (default 3)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads for the whole bench (default: torch's own count); a fixed count on a shared machine")
    p.add_argument("--rss-child", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m cfdebug",
        description="Find why an image classifier fails (counterfactual filters, XCR) and treat it.",
        epilog=EPILOG,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    ws = _workspace_parent()
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", default=None, metavar="OUT", help="also write the results as JSON to OUT")
    _add_train(sub, ws, common)
    _add_extract(sub, ws, common)
    _add_detect(sub, ws, common)
    _add_treat(sub, ws, common)
    _add_xcr(sub, ws, common)
    _add_revise(sub, ws, common)
    _add_prepare(sub, ws, common)
    _add_report(sub, ws, common)
    _add_runs(sub, ws, common)
    _add_export_demo(sub, ws, common)
    _add_models(sub, ws, common)
    _add_bench(sub, ws, common)
    _add_serve(sub, ws, common)
    return parser



def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings meant for the user print as one line, without the source location."""
    print(f"warning: {message}", file=sys.stderr)


#: Options naming a file the command writes: checked before any work starts.
OUTPUT_OPTIONS = (("out", "--out"), ("json", "--json"), ("csv", "--csv"))
#: Options naming a file the command reads (a folder there is refused as such).
INPUT_FILE_OPTIONS = (("weights", "--weights"), ("config", "--config"), ("markdown", "--markdown"), ("markdown_verdicts", "--markdown-verdicts"))
#: Every option naming a path (one value or a list of them): their length is checked first.
PATH_OPTIONS = (*OUTPUT_OPTIONS, *INPUT_FILE_OPTIONS, ("data", "--data"), ("workdir", "--workdir"), ("cifar10c", "--cifar10c"), ("root", "--root"), ("directory", "DIRECTORY"))


def _option_values(args, attr: str) -> list[str]:
    """The non-empty values of option ``attr`` (an empty one means "not given", as before)."""
    value = getattr(args, attr, None)
    return [str(v) for v in (value if isinstance(value, list) else [value]) if v]


def check_path_options(args) -> None:
    """Refuse, before any work starts, a path too long for the system, a folder where a file is
    read, and an output that cannot be written (:func:`check_output_path`)."""
    for attr, flag in PATH_OPTIONS:
        for value in _option_values(args, attr):
            check_path_length(value, f"`{flag}`")
    for attr, flag in INPUT_FILE_OPTIONS:
        for value in _option_values(args, attr):
            if Path(value).expanduser().is_dir():
                raise CfdebugError(f"Expected `{flag}` to name a file, but {value} is a directory. Pass the path of a file.")
    for attr, flag in OUTPUT_OPTIONS:
        for value in _option_values(args, attr):
            check_output_path(value, flag)


def check_output_path(path: str, flag: str) -> None:
    """Refuse an output path that cannot become a file: a directory, under a file, or in a folder
    where no file can be created (tried, not guessed: root may write anywhere by its permissions,
    yet not under /proc or on a read-only disk)."""
    target = Path(path).expanduser()
    if target.is_dir():
        raise CfdebugError(f"Expected `{flag}` to name a file, but {target} is a directory. Pass a file path, e.g. {target / 'out'}.")
    parent = target.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise CfdebugError(f"Expected `{flag}` to name a file in a folder, but {parent} is a file. Pass a path in a folder.")
    probe = parent / f".cfdebug-write-check-{uuid.uuid4().hex[:8]}.tmp"
    try:
        probe.touch(exist_ok=False)
        probe.unlink()
    except OSError as exc:
        raise CfdebugError(f"Expected `{flag}` in a folder where files can be created, but creating one in {parent} fails "
                           f"({exc.strerror or exc}). Pass another path.") from None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_path_options(args)
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.showwarning = _show_warning
            result = args.func(args)
        if getattr(args, "json", None) and result is not None:
            from .store import write_json_atomic

            write_json_atomic(args.json, result)
            print(f"results written to {args.json}", file=sys.stderr)
    except CfdebugError as exc:
        print(f"error: {for_cli(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing half-written was kept", file=sys.stderr)
        return 130
    return 0
