"""Every config validates itself on construction, with a message naming the field; configs are
frozen and round-trip through their dicts (and JSON); the config package stays free of torch and
of cfdebug.xcr."""

from __future__ import annotations

import dataclasses
import json
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
        # paper A
        (lambda: C.CFEConfig(epochs=0), "Expected `epochs` to be a positive integer, but got 0."),
        (lambda: C.CFEConfig(lr=-1e-3), "Expected `lr` to be a positive number, but got -0.001."),
        (lambda: C.CFEConfig(momentum=1.0), "Expected `momentum` to be in [0, 1), but got 1.0."),
        (lambda: C.CFEConfig(sparsity_lambda=-2.0), "Expected `sparsity_lambda` to be a non-negative number, but got -2.0."),
        (lambda: C.CFEConfig(mask_threshold=float("inf")), "Expected `mask_threshold` to be in [0, 1), but got inf."),
        (lambda: C.MCFilterConfig(tau=1.5), "Expected `tau` to be in [0, 1], but got 1.5."),
        (lambda: C.DetectConfig(freq_threshold=1.0), "Expected `freq_threshold` to be in [0, 1), but got 1.0."),
        (lambda: C.DetectConfig(skip_threshold=-0.1), "Expected `skip_threshold` to be in [0, 1], but got -0.1."),
        (lambda: C.DetectConfig(flag_row="best"), "Expected `flag_row` to be one of avg_recall, avg_f1, recall_cut, but got 'best'."),
        (lambda: C.DetectConfig(score_metric="auroc"), "Expected `score_metric` to be one of recall, precision, f1, but got 'auroc'."),
        (lambda: C.DetectConfig(rerank_top_k=0), "Expected `rerank_top_k` to be a positive integer, but got 0."),
        (lambda: C.DetectConfig(ablation_class=-1), "Expected `ablation_class` to be None or a class index >= 0, but got -1."),
        (lambda: C.FinetuneConfig(dropout=1.0), "Expected `dropout` to be in [0, 1), but got 1.0."),
        (lambda: C.FinetuneConfig(trainable="body"), "Expected `trainable` to be one of block+head, head, all, but got 'body'."),
        (lambda: C.FinetuneConfig(optimizer="rmsprop"), "Expected `optimizer` to be one of sgd, adam, but got 'rmsprop'."),
        (lambda: C.FinetuneConfig(batch_size=2.5), "Expected `batch_size` to be a positive integer, but got 2.5."),
        (lambda: C.TreatmentSchedule(theta=1.0), "Expected `theta` to be in [0, 1), but got 1.0."),
        (lambda: C.TreatmentSchedule(epochs=0), "Expected `epochs` to be a positive integer, but got 0."),
        (lambda: C.TreatmentConfig(lambda1=2.0), "Expected `lambda1` to be in [0, 1], but got 2.0."),
        (lambda: C.TreatmentConfig(lambda2=-1e-5), "Expected `lambda2` to be in [0, 1], but got -1e-05."),
        (lambda: C.TreatmentSchedule().with_lambdas(1e-3, 3.0), "Expected `lambda2` to be in [0, 1], but got 3.0."),
        # paper B
        (lambda: C.SelectorConfig(k=0), "Expected `k` to be a positive integer, but got 0."),
        (lambda: C.SelectorConfig(tau=0.0), "Expected `tau` to be a positive number, but got 0.0."),
        (lambda: C.SelectorConfig(mode="Hard"), "Expected `mode` to be one of Topk, Softmax, but got 'Hard'."),
        (lambda: C.SelectorConfig(schedule="step"), "Expected `schedule` to be one of constant, cosine, but got 'step'."),
        (lambda: C.XCRConfig(seeds=()), "Expected `seeds` to hold at least one seed, but it is empty."),
        (lambda: C.XCRConfig(seeds=(0, 0)), "Expected `seeds` to hold distinct values, but got [0, 0]."),
        (lambda: C.XCRConfig(severities=(6,)), "Expected `severities` to hold integers in 1..5, but got 6."),
        (lambda: C.XCRConfig(corruptions=("fog",), severities=()),
         "Expected both `corruptions` and `severities` to be empty (clean evaluation only) or both non-empty."),
        (lambda: C.XCRConfig(init="imagenet"), "Expected `init` to be one of pretrained, scratch, but got 'imagenet'."),
        (lambda: C.XCRConfig(random_baseline="yes"), "Expected `random_baseline` to be true or false, but got 'yes'."),
        (lambda: C.XCRConfig(selector={"k": 8}), "Expected `selector` to be a SelectorConfig, but got dict."),
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


def test_an_unknown_corruption_is_refused_with_the_valid_names():
    with pytest.raises(CfdebugError, match="^Expected `corruptions` to hold names from gaussian_noise, .*, but got 'fogg'.$"):
        C.XCRConfig(corruptions=("fog", "fogg"))


def test_configs_are_frozen():
    for config in (C.DataConfig(), C.TreatmentConfig(), C.XCRConfig(), C.DetectConfig()):
        field = dataclasses.fields(config)[0].name
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(config, field, getattr(config, field))


def test_lists_from_json_become_tuples_and_hash():
    config = C.XCRConfig(seeds=[2, 0], severities=[1, 3], corruptions=["fog"], table1_ks=[16], table1_betas=[0.1])
    assert (config.seeds, config.severities, config.corruptions, config.table1_ks) == ((2, 0), (1, 3), ("fog",), (16,))
    assert hash(config) == hash(C.XCRConfig(seeds=(2, 0), severities=(1, 3), corruptions=("fog",), table1_ks=(16,), table1_betas=(0.1,)))
    assert C.DataConfig(mean=[0.1, 0.2, 0.3]).mean == (0.1, 0.2, 0.3)


def test_workspace_config_resolves_the_beds_training_epochs():
    assert C.WorkspaceConfig(data=C.DataConfig(source="hard-digits")).train.epochs == C.BED_TRAIN_EPOCHS["hard-digits"]
    assert C.WorkspaceConfig().train.epochs == C.DEFAULT_TRAIN_EPOCHS
    assert C.WorkspaceConfig(train=C.TrainConfig(epochs=3), data=C.DataConfig(source="hard-digits")).train.epochs == 3


def test_xcr_config_round_trips_through_its_dict_and_json():
    config = C.XCRConfig.demo(selector=C.SelectorConfig.demo(k=16), seeds=(0, 4), severities=(2,), corruptions=("fog", "snow"), random_baseline=True, epochs=2)
    as_json = json.loads(json.dumps(C.config_dict(config)))
    assert C.xcr_config_from_dict(as_json) == config
    assert C.xcr_config_from_dict(config) is config


def test_xcr_config_reads_an_old_flat_retraining_schedule_and_refuses_unknown_keys():
    old = {k: v for k, v in C.config_dict(C.XCRConfig()).items() if k != "retrain"}
    assert C.xcr_config_from_dict({**old, "epochs": 4, "lr": 5e-4}).retrain == dataclasses.replace(C.XCRConfig().retrain, epochs=4, lr=5e-4)
    with pytest.raises(CfdebugError, match="under `retrain` or flat"):
        C.xcr_config_from_dict({**C.config_dict(C.XCRConfig()), "epochs": 4})
    with pytest.raises(CfdebugError, match="^Unknown XCR config keys colour; expected some of "):
        C.xcr_config_from_dict({"colour": 1})
    with pytest.raises(CfdebugError, match="^Unknown selector config keys kk; "):
        C.xcr_config_from_dict({"selector": {"kk": 1}})
    with pytest.raises(CfdebugError, match="Expected the XCR config to be a dict"):
        C.xcr_config_from_dict([1, 2])


def test_workspace_config_from_a_dict_of_another_shape_names_the_problem():
    with pytest.raises(CfdebugError, match="^Expected a workspace config as a JSON object, but got list.$"):
        C.workspace_config_from_dict([])
    with pytest.raises(CfdebugError, match="unexpected keyword argument 'colour'"):
        C.workspace_config_from_dict({"model": {"colour": "red"}})


def test_treatment_config_is_a_schedule_plus_one_pair_of_loss_weights():
    schedule = C.TreatmentSchedule(epochs=3, lr=3e-4, seed=2, theta=0.4)
    run = schedule.with_lambdas(1e-2, 1e-4, seed=5)
    assert (run.lambda1, run.lambda2, run.seed, run.epochs, run.lr, run.theta) == (1e-2, 1e-4, 5, 3, 3e-4, 0.4)
    assert schedule.with_lambdas(0.0, 0.0).seed == 2
    assert run.schedule == dataclasses.replace(schedule, seed=5)
    assert "lambda1" not in C.config_dict(schedule) and "lambda2" not in C.config_dict(schedule)
    # a treatment config round-trips through its dict (what run_treatment stores)
    assert C.TreatmentConfig(**json.loads(json.dumps(C.config_dict(run)))) == run


def test_config_package_imports_neither_torch_nor_xcr():
    code = (
        "import sys, cfdebug.config as c; c.XCRConfig.demo(); c.TreatmentSchedule().with_lambdas(0.1, 0.2); "
        "bad = [m for m in sys.modules if m == 'torch' or m.startswith('cfdebug.xcr')]; "
        "assert not bad, bad"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
