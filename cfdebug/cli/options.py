"""The options every command shares: the workspace (model, data, device), value parsing, the
progress printer, and the checks of path options before any work starts."""

from __future__ import annotations

import argparse
import sys
import uuid
from pathlib import Path

from ..config import BED_TRAIN_EPOCHS, DATA_FORMATS, DEFAULT_TRAIN_EPOCHS, DEMO_DATASETS, DEVICE_CHOICES, DataConfig, ExtractConfig, ModelConfig, TrainConfig, WorkspaceConfig, check_int, default_workdir
from ..errors import CfdebugError, check_path_length

EPILOG = "Defaults to the embedded demo (demo-cnn on biased-digits). Docs: README.md."


def _floats3(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three comma-separated numbers, got {text!r}") from None
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected three comma-separated numbers (one per RGB channel), got {text!r}")
    return values


def workspace_options() -> argparse.ArgumentParser:
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
        from ..data import val_fraction_error

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


def open_workspace(args, *, train: bool = False):
    from ..workspace import Workspace

    cfg = workspace_config(args)
    return Workspace(cfg, progress_printer(args, "training: "), train=train)


def warn_skipped(ws) -> bool:
    """Print the count of dataset files (and class folders) that were skipped; whether there were any."""
    if ws.data.skipped:
        print(f"warning: skipped {len(ws.data.skipped)} file(s) or folder(s) that are not usable images, e.g. {ws.data.skipped[0]}", file=sys.stderr)
    return bool(ws.data.skipped)


def parse_floats(text: str, name: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CfdebugError(f"Expected `{name}` as comma-separated numbers (e.g. 1e-4,5e-4), but got {text!r}.") from None


def parse_ints(text: str, name: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CfdebugError(f"Expected `{name}` as comma-separated integers (e.g. 0,1,2), but got {text!r}.") from None


def parse_seeds(text: str, name: str) -> list[int]:
    """Comma-separated seeds, each in [0, 2^63) (:func:`check_int`), checked before any run exists."""
    return [check_int(seed, name, 0) for seed in parse_ints(text, name)]


def parse_list(text, name, convert, everything):
    if text is None:
        return None
    if text == "all":
        return tuple(everything)
    try:
        return tuple(convert(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise CfdebugError(f"Expected `{name}` as a comma-separated list or `all`, but got {text!r}.") from None


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
