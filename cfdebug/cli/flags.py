"""The CLI's flag map: which flag sets which config field, and messages rewritten to name flags.

Library messages name config fields (``Expected `data.val_fraction` to be in [0, 1), …``); the
CLI shows the flag that sets each one instead (:func:`for_cli`), the dashboard its widget labels
(:func:`rename_fields` with its own map). Imports no torch: the dashboard imports it.
"""

from __future__ import annotations

import re

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


#: The treat flag of each :class:`TreatmentSchedule` field and treat-spec grid (their messages name them).
TREAT_FLAGS = {"epochs": "--treat-epochs", "lr": "--treat-lr", "batch_size": "--treat-batch-size", "trainable": "--trainable",
               "seed": "--seeds", "lambdas1": "--lambda1", "lambdas2": "--lambda2", "seeds": "--seeds"}


#: The xcr flag of each XCR config field its messages name (``epochs`` and ``lr`` are the retraining's).
XCR_FLAGS = {"k": "--k", "beta": "--beta", "patch_size": "--patch-size", "mode": "--mode", "seeds": "--seeds",
             "corruptions": "--corruptions", "severities": "--severities", "cifar10c_dir": "--cifar10c", "init": "--init",
             "max_corrupt_images": "--max-corrupt-images", "epochs": "--xcr-epochs", "lr": "--xcr-lr"}


#: The revise flag of each :class:`ReviseConfig` field.
REVISE_FLAGS = {"epochs": "--revise-epochs", "lr": "--revise-lr", "fill": "--fill", "rrr_lambda": "--rrr-lambda",
                "filter_lambda": "--filter-lambda", "jitter": "--jitter"}
