"""Every config validates itself on construction, with a message naming the field; the CLI can
translate field names to its flags; config.py stays free of torch and of cfdebug.xcr."""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from cfdebug import config as C
from cfdebug.errors import CfdebugError

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_and_demo_configs_construct():
    for cls in (C.DataConfig, C.ModelConfig, C.TrainConfig, C.ExtractConfig, C.WorkspaceConfig, C.CFEConfig, C.MCFilterConfig,
                C.DetectConfig, C.FinetuneConfig, C.TreatmentConfig, C.SelectorConfig, C.XCRConfig):
        cls()
    C.XCRConfig.demo()
    C.SelectorConfig.demo()
    # What the tests, the demo and the CLI's defaults use.
    C.DataConfig(source="clean-digits", input_size=16, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), bias=0.0, val_fraction=0.0)
    C.DataConfig(input_size=4, mean=[0.5, 0.5, 0.5], bias=1.0)  # load_data refuses < 8 px with its own message
    C.WorkspaceConfig(device="cuda:1", workdir=str(ROOT))
    C.WorkspaceConfig(device="cpu", workdir=ROOT)  # a Path is a folder too
    C.ModelConfig(name="vgg11", weights="w.pt", layer="features.20")


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: C.DataConfig(val_fraction=-3), "Expected `data.val_fraction` to be in [0, 1), but got -3."),
        (lambda: C.DataConfig(val_fraction=1.0), "Expected `data.val_fraction` to be in [0, 1), but got 1.0."),
        (lambda: C.DataConfig(bias=7), "Expected `data.bias` to be in [0, 1], but got 7."),
        (lambda: C.DataConfig(format="zip"), "Expected `data.format` to be one of auto, digits, imagefolder, cub, cifar, but got 'zip'."),
        (lambda: C.DataConfig(source=""), "Expected `data.source` to be a non-empty string, but got ''."),
        (lambda: C.DataConfig(input_size=0), "Expected `data.input_size` to be None or an integer in 1..4096 (pixels), but got 0."),
        (lambda: C.DataConfig(input_size=5000), "Expected `data.input_size` to be None or an integer in 1..4096 (pixels), but got 5000."),
        (lambda: C.DataConfig(input_size=32.0), "Expected `data.input_size` to be None or an integer in 1..4096 (pixels), but got 32.0."),
        (lambda: C.DataConfig(mean=(0.5, 0.5)), "Expected `data.mean` to be None or three finite numbers (one per RGB channel), but got (0.5, 0.5)."),
        (lambda: C.DataConfig(mean=(0.5, float("nan"), 0.5)), "Expected `data.mean` to be None or three finite numbers (one per RGB channel), but got (0.5, nan, 0.5)."),
        (lambda: C.DataConfig(std=(0.2, 0.0, 0.2)), "Expected `data.std` to be None or three finite numbers > 0 (one per RGB channel), but got (0.2, 0.0, 0.2)."),
        (lambda: C.DataConfig(seed=-1), "Expected `data.seed` to be a non-negative integer, but got -1."),
        (lambda: C.ModelConfig(name=""), "Expected `model.name` to be a non-empty string, but got ''."),
        (lambda: C.ModelConfig(weights=""), "Expected `model.weights` to be None or a non-empty string, but got ''."),
        (lambda: C.ModelConfig(layer=3), "Expected `model.layer` to be None or a non-empty string, but got 3."),
        (lambda: C.TrainConfig(epochs=0), "Expected `train.epochs` to be a positive integer, but got 0."),
        (lambda: C.TrainConfig(lr=0.0), "Expected `train.lr` to be a positive number, but got 0.0."),
        (lambda: C.TrainConfig(weight_decay=-1e-4), "Expected `train.weight_decay` to be a non-negative number, but got -0.0001."),
        (lambda: C.TrainConfig(batch_size=0), "Expected `train.batch_size` to be a positive integer, but got 0."),
        (lambda: C.TrainConfig(seed=True), "Expected `train.seed` to be a non-negative integer, but got True."),
        (lambda: C.ExtractConfig(batch_size=-5), "Expected `extract.batch_size` to be a positive integer, but got -5."),
        (lambda: C.ExtractConfig(num_workers=-1), "Expected `extract.num_workers` to be a non-negative integer, but got -1."),
        (lambda: C.WorkspaceConfig(device="tpu"), "Expected `device` to be auto, cpu, cuda or cuda:N, but got 'tpu'."),
        (lambda: C.WorkspaceConfig(device="cuda:x"), "Expected `device` to be auto, cpu, cuda or cuda:N, but got 'cuda:x'."),
        (lambda: C.WorkspaceConfig(workdir=""), "Expected `workdir` to be a non-empty string, but got ''."),
        (lambda: C.WorkspaceConfig(data={"source": "x"}), "Expected `data` to be a DataConfig, but got dict."),
        (lambda: C.XCRConfig(retrain=C.FinetuneConfig(), n_bins=0), "Expected `n_bins` to be a positive integer, but got 0."),
    ],
)
def test_bad_values_are_refused_naming_the_field(build, message):
    with pytest.raises(CfdebugError, match="^" + re.escape(message) + "$"):
        build()


def test_xcr_retraining_schedule_is_a_validated_finetune_config():
    with pytest.raises(CfdebugError, match="`momentum`"):
        C.XCRConfig(retrain=replace(C.XCRConfig().retrain, momentum=1.0))
    with pytest.raises(CfdebugError, match="`weight_decay`"):
        C.XCRConfig.demo(weight_decay=-1)
    assert C.XCRConfig.demo(lr=5e-4).retrain.lr == 5e-4


def test_workspace_config_round_trips_through_its_dict():
    config = C.WorkspaceConfig(data=C.DataConfig(mean=(0.1, 0.2, 0.3), std=(1, 1, 1), input_size=64), device="cpu", workdir="/tmp/x")
    assert C.workspace_config_from_dict(C.config_dict(config)) == config
    with pytest.raises(CfdebugError, match="`data.bias`"):
        C.workspace_config_from_dict({"data": {"bias": 2.0}})


def test_check_against_counts_patches_without_importing_the_selector():
    assert C.XCRConfig.demo().check_against(32) == 256
    with pytest.raises(CfdebugError, match=r"`k` to be an integer in 1\.\.64"):
        C.XCRConfig.demo(table1_ks=(16, 100)).check_against(16)
    with pytest.raises(CfdebugError, match="divide the image size 31×31"):
        C.XCRConfig.demo().check_against(31)


def test_config_module_imports_neither_torch_nor_xcr():
    code = (
        "import sys, cfdebug.config as c; c.XCRConfig.demo().check_against(32); "
        "bad = [m for m in sys.modules if m == 'torch' or m.startswith('cfdebug.xcr')]; "
        "assert not bad, bad"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------------------------- CLI names
def test_for_cli_maps_field_names_to_flags():
    assert C.flag_for("data.input_size") == "--input-size" and C.flag_for("train.batch_size") is None
    assert C.for_cli("Expected `data.val_fraction` to be in [0, 1), but got -3.") == "Expected `--val-fraction` to be in [0, 1), but got -3."
    assert C.for_cli("Expected `device` to be auto, cpu, cuda or cuda:N, but got 'tpu'.") == "Expected `--device` to be auto, cpu, cuda or cuda:N, but got 'tpu'."
    untouched = "Expected `train.batch_size` to be a positive integer, but got 0 (`k` too)."
    assert C.for_cli(untouched) == untouched
    assert C.rename_fields("`data.bias` and `model.name`", {"data.bias": "Shortcut strength"}) == "`Shortcut strength` and `model.name`"


def test_every_mapped_flag_exists_on_the_cli():
    from cfdebug.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    extract = sub.choices["extract"]
    assert set(C.CLI_FLAGS.values()) <= set(extract._option_string_actions)
    # Each mapped field is a real field of the workspace config.
    for name in C.CLI_FLAGS:
        obj = C.WorkspaceConfig()
        for part in name.split("."):
            assert hasattr(obj, part), name
            obj = getattr(obj, part)
