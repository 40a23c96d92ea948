"""Paper A's commands: ``train``, ``extract``, ``detect`` (Table 1) and ``treat`` (Tables 2-3)."""

from __future__ import annotations

import sys

from ..config import CFEConfig
from ..errors import CfdebugError
from ..store import write_text_atomic
from .background import announce_run, print_cancelled, run_spec
from .flags import TREAT_FLAGS, rename_fields
from .options import EPILOG, open_workspace, parse_floats, parse_seeds, progress_printer, warn_skipped, workspace_config

def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def cmd_train(args) -> dict:
    ws = open_workspace(args, train=True)
    meta = ws.model_meta
    acc = meta["accuracy"]
    path = ws.store.path("models", ws.model_digest) / "model.pt"
    state = "cached (same model, data and training config)" if meta.get("cache_hit") else "trained"
    print(f"{ws.config.model.name} on {ws.data.describe()}")
    print(f"model {state}: {path}")
    print(f"accuracy: train {_pct(acc['train'])}  val {_pct(acc['val'])}  test {_pct(acc['test'])}")
    if args.out:
        import shutil

        from ..store import atomic_file

        with atomic_file(args.out) as tmp:
            shutil.copyfile(path, tmp)
        print(f"weights written to {args.out}")
    return {"model": ws.config.model.name, "data": ws.data.name, "checkpoint": str(path), "accuracy": acc, "cache_hit": bool(meta.get("cache_hit"))}


def cmd_extract(args) -> dict:
    ws = open_workspace(args)
    report = {"model": ws.config.model.name, "layer": ws.target.name, "data": ws.data.name, "splits": {}}
    splits = args.splits.split(",")
    for split in splits:  # before any split is extracted
        if split not in ws.data.splits:
            raise CfdebugError(f"Expected `--splits` from train,val,test, but got {split!r}.")
    if warn_skipped(ws):
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


def _nan_none(x):
    return None if x != x else float(x)


def detect_config(args):
    from ..detect import DetectConfig, MCFilterConfig

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
    from ..detect import images_frame, run_detection

    config = detect_config(args)
    ws = open_workspace(args)
    warn_skipped(ws)
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


def treat_run_config(args) -> dict:
    """The spec a treatment run is started from (also what the dashboard writes to run.json)."""
    from ..config import TreatmentSchedule
    from ..jobs import treat_spec

    l1, l2, seeds = parse_floats(args.lambda1, "--lambda1"), parse_floats(args.lambda2, "--lambda2"), parse_seeds(args.seeds, "--seeds")
    workspace = workspace_config(args)
    try:
        schedule = TreatmentSchedule(epochs=args.treat_epochs, lr=args.treat_lr, seed=seeds[0] if seeds else 0,
                                     batch_size=args.treat_batch_size, trainable=args.trainable)
        return treat_spec(workspace, schedule, l1, l2, seeds)
    except CfdebugError as exc:
        raise CfdebugError(rename_fields(str(exc), TREAT_FLAGS)) from None


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


def cmd_treat(args) -> dict | None:
    """A treatment sweep as a registry run (:func:`cfdebug.jobs.run_treat_job`); under ``torchrun``
    every rank trains (DDP) and rank 0 alone writes the registry, checkpoints and output."""
    from ..jobs import run_treat_job
    from ..runs import RunRegistry

    registry = RunRegistry(args.workdir)
    spec, run_id = run_spec(args, "treat", registry, lambda: treat_run_config(args))
    started = {}
    result = run_treat_job(spec, registry=registry, run_id=run_id, progress=progress_printer(args),
                           on_start=announce_run(registry, "treat", args.workdir, started))
    if result is None:  # cancelled (rank 0: the registry recorded it), or another rank: prints nothing
        return print_cancelled("treat", started["run_id"]) if started else None
    ws = started["ws"]
    print(f"{ws.config.model.name} on {ws.data.describe()}: treatment of the filters at {ws.target.name}" + (f" ({result['world_size']} processes, DDP)" if result["world_size"] > 1 else ""))
    print_table2(result, ws.config.model.name)
    print_table3(result, ws.config.model.name)
    fc = result["flagged_churn"]
    print(f"\nflagged-set churn (detection recomputed on the treated model, λ1={fc['lambda1']:g}, λ2={fc['lambda2']:g}, seed {fc['seed']}): "
          f"{fc['flagged_errors_fixed']} of {fc['flagged_errors_before']} flagged errors fixed; {fc['new_errors']} new errors, "
          f"{fc['new_errors_flagged']} of them flagged; flagged {fc['flagged_before']} → {fc['flagged_after']}")
    return result


def add_train(sub, ws, common) -> None:
    p = sub.add_parser("train", parents=[ws, common], help="train (or fetch from cache) a model and print train/val/test accuracy", epilog=EPILOG)
    p.add_argument("--out", default=None, metavar="PATH", help="also copy the trained state_dict to PATH")
    p.set_defaults(func=cmd_train)


def add_extract(sub, ws, common) -> None:
    p = sub.add_parser("extract", parents=[ws, common], help="stream a dataset through the model; cache pooled target-layer features and logits", epilog=EPILOG)
    p.add_argument("--splits", default="train,val,test", help="comma-separated splits (default train,val,test)")
    p.set_defaults(func=cmd_extract)


def add_detect(sub, ws, common) -> None:
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


def add_treat(sub, ws, common) -> None:
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
