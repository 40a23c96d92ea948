"""XCR retraining and report (paper B): batch doubling, identical schedules, temperature scaling,
Tables 1–2 on a small slice of the demo, the Occlusion benchmark, and user mistakes."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from cfdebug import xcr as xcr_api
from cfdebug.config import FinetuneConfig, config_dict
from cfdebug.errors import CfdebugError
from cfdebug.metrics import apply_temperature
from cfdebug.xcr import retrain as xcr_retrain
from cfdebug.xcr.retrain import XCRConfig, counterfactual_batches, override_xcr_config, xcr_config_from_dict
from cfdebug.xcr.selector import SelectorConfig, apply_mask

TINY_SELECTOR = SelectorConfig.demo(k=32, beta=0.001, epochs=1)
TINY = XCRConfig.demo(
    selector=TINY_SELECTOR, epochs=1, corruptions=("gaussian_noise", "contrast"), severities=(1, 5),
    table1_ks=(32,), table1_betas=(0.001,),
)


def small_workspace(ws, n_train: int = 192, n_val: int = 64, n_test: int = 96, input_size: int | None = None):
    """The demo workspace on a stratified-enough slice of each split (a new data fingerprint, so
    nothing collides with the full demo's cache entries)."""
    small = copy.copy(ws)
    splits = {name: ws.data.splits[name].subset(np.arange(n)) for name, n in (("train", n_train), ("val", n_val), ("test", n_test))}
    small.data = replace(ws.data, splits=splits, fingerprint=ws.data.fingerprint + f"-small{n_train}-{n_val}-{n_test}",
                         input_size=input_size or ws.data.input_size)
    return small


@pytest.fixture(scope="module")
def small(demo_workspace):
    return small_workspace(demo_workspace)


@pytest.fixture(scope="module")
def tiny_report(small):
    return xcr_api.run_xcr_report(small, TINY)


# ---------------------------------------------------------------------------------- retraining
def test_counterfactual_batches_appends_masked_copies_with_the_same_labels():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(4, 3, 8, 8, generator=g)
    labels = torch.tensor([3, 1, 4, 1])
    indices = torch.tensor([5, 0, 2, 7])
    masks = np.random.default_rng(0).random((10, 16)) > 0.5
    before = images.clone()
    out_images, out_labels = counterfactual_batches(masks, 2)(images, labels, indices)
    assert out_images.shape == (8, 3, 8, 8)
    assert torch.equal(out_labels, torch.cat([labels, labels]))
    assert torch.equal(out_images[:4], images)
    assert torch.equal(out_images[4:], apply_mask(images, torch.as_tensor(masks[indices.numpy()]), 2))
    assert torch.equal(images, before)  # inputs are not modified


@pytest.mark.slow
def test_vanilla_and_xcr_share_schedule_and_data_order_and_xcr_doubles_batches(small, monkeypatch):
    calls = []
    real = xcr_retrain.finetune

    def recording(workspace, config, **kwargs):
        record = {"config": config, "indices": [], "sizes": [], "labels": []}
        calls.append(record)
        transform = kwargs.get("batch_transform")

        def loss_fn(batch):
            record["indices"].append(batch.indices.tolist())
            record["sizes"].append(len(batch.images))
            record["labels"].append(batch.labels.tolist())
            ce = torch.nn.functional.cross_entropy(batch.logits, batch.labels)
            return {"loss": ce, "ce": ce}

        kwargs["loss_fn"] = loss_fn
        assert (transform is None) == (len(calls) == 1)
        return real(workspace, config, **kwargs)

    monkeypatch.setattr(xcr_retrain, "finetune", recording)
    config = override_xcr_config(TINY, batch_size=64)
    masks = xcr_retrain.training_masks(small, config)
    assert masks.shape == (len(small.data.splits["train"]), 256) and (masks.sum(1) == 32).all()
    vanilla = xcr_retrain.vanilla_retrain(small, config, seed=3)
    xcr = xcr_retrain.counterfactual_retrain(small, config, 3, masks)
    assert calls[0]["config"] == calls[1]["config"]
    assert calls[0]["config"].trainable == "all" and calls[0]["config"].seed == 3
    assert calls[0]["indices"] == calls[1]["indices"]  # same seed → same data order
    assert calls[1]["sizes"] == [2 * n for n in calls[0]["sizes"]]  # 1:1 originals and T(x)
    for labels in calls[1]["labels"]:
        half = len(labels) // 2
        assert labels[:half] == labels[half:]
    assert vanilla.model is not small.model and xcr.model is not small.model


def test_temperature_scaling_lowers_validation_nll(demo_workspace):
    ws = demo_workspace
    t = xcr_retrain.fit_val_temperature(ws.model, ws.data, ws.device)
    assert t > 0 and t != 1.0
    assert xcr_retrain.val_nll(ws.model, ws.data, ws.device, t) < xcr_retrain.val_nll(ws.model, ws.data, ws.device, 1.0)


def test_config_round_trips_through_json():
    config = XCRConfig.demo(seeds=(0, 2), random_baseline=True)
    again = xcr_config_from_dict(json.loads(json.dumps(config_dict(config))))
    assert again == config
    with pytest.raises(CfdebugError, match="Unknown XCR config keys"):
        xcr_config_from_dict({"epoch": 3})


def test_override_routes_selector_fields_and_ignores_unset_values():
    config = xcr_retrain.override_xcr_config(TINY, k=16, beta=0.01, selector_epochs=2, epochs=4, seeds=[1, 2], severities=None)
    assert (config.selector.k, config.selector.beta, config.selector.epochs) == (16, 0.01, 2)
    assert config.retrain.epochs == 4 and config.seeds == (1, 2) and config.severities == TINY.severities
    assert config.retrain == replace(TINY.retrain, epochs=4)
    with pytest.raises(CfdebugError, match="Unknown XCR settings"):
        xcr_retrain.override_xcr_config(TINY, epoch=3)


def test_config_holds_the_retraining_schedule_and_reads_old_flat_run_json():
    config = XCRConfig.demo(seeds=(4, 5))
    assert isinstance(config.retrain, FinetuneConfig)
    assert (config.retrain.epochs, config.retrain.optimizer, config.retrain.trainable, config.retrain.dropout) == (3, "adam", "all", 0.0)
    assert xcr_retrain.retrain_schedule(config, 5) == replace(config.retrain, seed=5)
    # A run.json written before `retrain` existed holds the schedule flat.
    old = {k: v for k, v in config_dict(config).items() if k != "retrain"}
    old.update(epochs=3, lr=1e-3, optimizer="adam", momentum=0.9, weight_decay=0.0, batch_size=64, trainable="all")
    assert xcr_config_from_dict(old) == config
    with pytest.raises(CfdebugError, match="both"):
        xcr_config_from_dict({**config_dict(config), "epochs": 2})
    with pytest.raises(CfdebugError, match="Unknown retrain config keys seeds"):
        xcr_config_from_dict({"retrain": {"seeds": 1}})
    # The schedule is validated as any FinetuneConfig (momentum and weight decay were not, before).
    with pytest.raises(CfdebugError, match="`momentum`"):
        XCRConfig.demo(momentum=1.5)
    with pytest.raises(CfdebugError, match="`weight_decay`"):
        override_xcr_config(config, weight_decay=-1.0)
    with pytest.raises(CfdebugError, match="`retrain` to be a FinetuneConfig"):
        XCRConfig(retrain={"epochs": 3})


def test_softmax_mode_random_masks_are_soft_maps(small):
    config = replace(TINY, selector=replace(TINY_SELECTOR, mode="Softmax"))
    masks = xcr_retrain.training_masks(small, config, "random")
    assert masks.dtype == np.float32 and np.allclose(masks.sum(1), 1.0)
    images, labels = counterfactual_batches(masks, 2)(torch.ones(2, 3, 32, 32), torch.tensor([0, 1]), torch.tensor([0, 1]))
    assert images.shape == (4, 3, 32, 32) and float(images[2:].max()) == pytest.approx(1 / 32)


# ---------------------------------------------------------------------------------- report
def test_report_has_the_tables_with_numbers_in_range(small, tiny_report):
    r = tiny_report
    assert {"table1", "table2", "per_corruption", "reliability", "per_seed", "selector", "settings"} <= set(r)
    json.dumps(r, allow_nan=False)  # plain JSON

    assert {row["mode"] for row in r["table1"]} == {"XCR", "VIBI", "random"}
    for row in r["table1"]:
        assert set(xcr_api.TABLE1_COLUMNS) <= set(row)
        for key in ("accuracy", "avg_drop", "avg_inc", "fidelity"):
            assert 0.0 <= row[key] <= 1.0, (key, row)
        assert -1.0 <= row["sufficiency"] <= 1.0
    assert [row["beta"] for row in r["table1"] if row["mode"] == "random"] == [None]

    assert [row["method"] for row in r["table2"]] == ["vanilla", "vanilla+TS", "xcr", "xcr+TS"]
    for row in r["table2"]:
        assert list(row)[: len(xcr_api.TABLE2_COLUMNS)] == list(xcr_api.TABLE2_COLUMNS)
        for split in ("clean", "corrupt"):
            assert 0.0 <= row[f"{split}_acc"] <= 1.0
            assert 0.0 <= row[f"{split}_ece"] <= 1.0
            assert 0.0 <= row[f"{split}_brier"] <= 2.0
            assert row[f"{split}_nll"] >= 0.0
    # Temperature scaling changes calibration, never the predicted class.
    by = {row["method"]: row for row in r["table2"]}
    assert by["vanilla"]["clean_acc"] == by["vanilla+TS"]["clean_acc"]
    assert by["xcr"]["corrupt_acc"] == by["xcr+TS"]["corrupt_acc"]

    assert len(r["per_corruption"]) == 4 * 2 * 2  # methods × corruptions × severities
    for row in r["per_corruption"]:
        assert row["corruption"] in ("gaussian_noise", "contrast") and row["severity"] in (1, 5)
        assert 0 <= row["accuracy"] <= 1 and 0 <= row["ece"] <= 1 and 0 <= row["brier"] <= 2
    mean_acc = np.mean([row["accuracy"] for row in r["per_corruption"] if row["method"] == "xcr"])
    assert by["xcr"]["corrupt_acc"] == pytest.approx(mean_acc)
    for kind in ("clean", "corrupt"):
        bins = r["reliability"][kind]["vanilla"]
        assert len(bins["count"]) == 15
    assert sum(r["reliability"]["clean"]["xcr"]["count"]) == len(small.data.splits["test"])
    assert "Table 2" in xcr_api.format_table2(r) and "Table 1" in xcr_api.format_table1(r)


def test_default_table1_trains_no_selector_beyond_the_retrainings(small, tiny_report):
    """The default config (Table 1 grid unset): the XCR and random rows at the run's own k and β,
    no VIBI selector; its selector is the one the retraining uses (cached by the report above)."""
    r = xcr_api.run_xcr_report(small, replace(TINY, table1_ks=None, table1_betas=None))
    assert [(row["mode"], row["k"]) for row in r["table1"]] == [("XCR", 32), ("random", 32)]
    assert "Table 1 at that k, β (XCR and random masks)" in r["settings"]


def test_report_is_cached(small, tiny_report):
    again = xcr_api.run_xcr_report(small, TINY)
    assert again["cache_hit"] is True and again["table2"] == tiny_report["table2"]


def test_bench_reports_both_explainers(small):
    # Speed (the ratio) is measured by `python -m cfdebug bench xcr`, not asserted in a unit test.
    out = xcr_api.bench_xcr(small, n_images=4, batch_size=4, config=TINY_SELECTOR, repeats=2)
    assert out["n_images"] == 4 and out["k"] == 32 and out["d"] == 256
    assert out["selector_seconds"] > 0 and out["occlusion_seconds"] > 0 and out["ratio"] > 0
    assert 0 <= out["selector_avg_drop"] <= 1 and 0 <= out["occlusion_avg_drop"] <= 1
    assert "masks/s" in xcr_api.format_bench(out)


def test_scoring_in_chunks_equals_scoring_at_once(small):
    images, labels, _ = xcr_api.test_images(small)
    models, temperatures = {"m": [small.model]}, {"m": [1.7]}
    at_once = xcr_api.score_models(models, temperatures, [(images, labels)], small.data, "cpu")
    chunked = xcr_api.score_models(models, temperatures, [(images[:40], labels[:40]), (images[40:], labels[40:])], small.data, "cpu")
    logits = xcr_api.predict_images(small.model, images, small.data, "cpu")
    for key, temperature in ((("m", 0), 1.0), (("m+TS", 0), 1.7)):
        want = xcr_api.calibration_metrics(apply_temperature(logits, temperature), labels, with_bins=True)
        assert at_once[key].compute()["ece"] == want["ece"] and at_once[key].compute()["nll"] == want["nll"]
        got = chunked[key].compute()
        for metric in ("accuracy", "ece", "nll", "brier"):
            assert got[metric] == pytest.approx(want[metric], rel=1e-12, abs=1e-12)
        assert got["bins"]["count"].tolist() == want["bins"]["count"].tolist()


@pytest.mark.slow
def test_registered_run_logs_progress_and_checkpoints(demo_workspace, workdir):
    from cfdebug.runs import RunRegistry

    registry = RunRegistry(workdir)
    config = override_xcr_config(TINY, table1_ks=(), corruptions=(), severities=(), batch_size=128)
    record = registry.create("xcr", {"workspace": config_dict(demo_workspace.config), "xcr": config_dict(config)})
    # use_cache=False: another test may already have stored a report for this config (then nothing trains)
    result = xcr_api.run_xcr_report(demo_workspace, config, registry=registry, run_id=record.run_id, use_cache=False)
    assert result["table1"] == [] and result["per_corruption"] == [] and result["reliability"]["corrupt"] == {}
    assert all(row["corrupt_acc"] is None for row in result["table2"])
    rows = registry.progress(record.run_id)
    assert any("fraction" in row for row in rows) and any(row.get("method") == "xcr" for row in rows)
    # The run measures its own steps first: its first row says what it will take, its bar moves with the work.
    assert rows[0]["message"].startswith("whole run estimated at ") and result["estimate"]["seconds"] > 0
    assert (record.run_dir / "xcr-seed0" / "checkpoint.pt").is_file()
    assert (record.run_dir / "vanilla-seed0" / "checkpoint.pt").is_file()
    with pytest.raises(CfdebugError, match="both `registry` and `run_id`"):
        xcr_api.run_xcr_report(demo_workspace, config, registry=registry)


# ---------------------------------------------------------------------------------- user mistakes
@pytest.mark.parametrize("k", [0, -3])
def test_k_not_positive_is_refused(k):
    with pytest.raises(CfdebugError, match="`k`"):
        XCRConfig.demo(selector=SelectorConfig.demo(k=k))


def test_k_larger_than_d_is_refused_before_training(small):
    config = replace(TINY, selector=replace(TINY_SELECTOR, k=257))
    with pytest.raises(CfdebugError, match=r"1\.\.256"):
        xcr_api.run_xcr_report(small, config)
    with pytest.raises(CfdebugError, match=r"1\.\.256"):
        xcr_api.run_xcr_report(small, replace(TINY, table1_ks=(16, 300)))


def test_patch_size_that_does_not_divide_the_image_is_refused(small):
    config = replace(TINY, selector=replace(TINY_SELECTOR, patch_size=5, k=4))
    with pytest.raises(CfdebugError, match="divide the image size 32×32"):
        xcr_api.run_xcr_report(small, config)


def test_images_too_small_for_the_corruptions_are_refused(demo_workspace):
    tiny_images = small_workspace(demo_workspace, input_size=4)
    config = replace(TINY, selector=replace(TINY_SELECTOR, k=2), table1_ks=(2,))
    with pytest.raises(CfdebugError, match="at least 8×8"):
        xcr_api.run_xcr_report(tiny_images, config)


def test_cifar10c_file_whose_length_does_not_match_the_labels_is_refused(small, tmp_path):
    np.save(tmp_path / "gaussian_noise.npy", np.zeros((5 * 7, 32, 32, 3), np.uint8))
    config = replace(TINY, corruptions=("gaussian_noise",), cifar10c_dir=str(tmp_path))
    with pytest.raises(CfdebugError, match="holds 35"):
        xcr_api.run_xcr_report(small, config)


def test_bad_config_values_are_refused():
    with pytest.raises(CfdebugError, match="severities"):
        XCRConfig.demo(severities=(0,))
    with pytest.raises(CfdebugError, match="corruptions"):
        XCRConfig.demo(corruptions=("gaussian_blurr",))
    with pytest.raises(CfdebugError, match="seeds"):
        XCRConfig.demo(seeds=())
