"""Benchmarks: each prints a ratio against a baseline measured in the same run.

``extract``: (1) the time of a streaming extraction pass against plain inference over the
same images, batch size and model (target ≤ 1.15); (2) peak RSS of extraction in a fresh
process at N and at 10×N images (target < 1.2× growth: extraction streams to disk). Images
are synthesised from their index on the fly, so the dataset itself takes no memory.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .config import WorkspaceConfig
from .errors import CfdebugError


class SyntheticImages(torch.utils.data.Dataset):
    """``n`` deterministic pseudo-random images ``[3, size, size]`` made from their index."""

    def __init__(self, n: int, size: int):
        self.n, self.size = n, size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(i)
        return torch.randn(3, self.size, self.size, generator=g), 0, i


def _plain_inference(model, batches, device) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        for x, _, _ in batches:
            model(x.to(device)).float().cpu()
    return time.perf_counter() - start


def _time_extraction(model, layer, activation, batches, n, device) -> float:
    from .extract import stream_features

    with tempfile.TemporaryDirectory() as tmp:
        return stream_features(model, layer, batches, n, Path(tmp), device, activation)["seconds"]


def peak_rss_child(ws_config: WorkspaceConfig, n: int) -> dict:
    """Meant for a fresh process: extraction over ``n`` synthetic images; report its RSS (MiB)."""
    from .workspace import Workspace

    ws = Workspace(ws_config)
    batches = torch.utils.data.DataLoader(SyntheticImages(n, ws.data.input_size), batch_size=ws_config.extract.batch_size)
    import psutil

    before = psutil.Process().memory_info().rss / 1024  # KiB, like ru_maxrss on Linux
    _time_extraction(ws.model, ws.target.name, ws.target.activation, batches, n, ws.device)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"n": n, "peak_rss_mib": after / 1024, "rss_before_mib": before / 1024}


def _rss_in_child(ws_config: WorkspaceConfig, n: int) -> dict:
    """:func:`peak_rss_child` in a fresh ``python -m cfdebug bench extract --rss-child N`` process."""
    cfg = ws_config
    cmd = [sys.executable, "-m", "cfdebug", "bench", "extract", "--rss-child", str(n), "--model", cfg.model.name,
           "--data", cfg.data.source, "--workdir", cfg.workdir, "--device", cfg.device, "--batch-size", str(cfg.extract.batch_size)]
    if cfg.model.weights:
        cmd += ["--weights", cfg.model.weights]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise CfdebugError(f"The RSS measurement process failed: {out.stderr.strip()[-500:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_extract(ws_config: WorkspaceConfig, n: int = 2000, repeats: int = 3) -> dict:
    """Extraction vs plain inference time over ``n`` synthetic images (fastest of ``repeats``),
    and peak RSS of extraction in a fresh process at ``n`` and ``10 n`` images."""
    from .workspace import Workspace

    if n <= 0 or repeats <= 0:
        raise CfdebugError(f"Expected positive `--n` and `--repeats`, but got {n} and {repeats}.")
    batch_size = ws_config.extract.batch_size
    ws = Workspace(ws_config)
    data = SyntheticImages(n, ws.data.input_size)
    batches = torch.utils.data.DataLoader(data, batch_size=batch_size)
    cached = list(batches)  # the same tensors for both passes, so only the model work differs
    _plain_inference(ws.model, cached[:2], ws.device)  # warm-up
    plain, extract = [], []
    for _ in range(repeats):
        plain.append(_plain_inference(ws.model, cached, ws.device))
        extract.append(_time_extraction(ws.model, ws.target.name, ws.target.activation, cached, n, ws.device))
    ratio = min(extract) / min(plain)
    print(f"model {ws.config.model.name}, layer {ws.target.name}, {n} images of {ws.data.input_size}px, batch {batch_size}, device {ws.device}")
    print(f"plain inference: {min(plain):.3f} s ({n / min(plain):.0f} images/s); extraction: {min(extract):.3f} s")
    print(f"time ratio extraction / inference: {ratio:.3f}  (target <= 1.15: {'PASS' if ratio <= 1.15 else 'FAIL'})")
    rss = [_rss_in_child(ws_config, m) for m in (n, 10 * n)]
    growth = rss[1]["peak_rss_mib"] / rss[0]["peak_rss_mib"]
    delta = [max(0.0, r["peak_rss_mib"] - r["rss_before_mib"]) for r in rss]
    print(f"peak RSS: {rss[0]['peak_rss_mib']:.0f} MiB at N={rss[0]['n']}, {rss[1]['peak_rss_mib']:.0f} MiB at 10N={rss[1]['n']}")
    print(f"  (peak above the RSS just before extraction: {delta[0]:.1f} MiB at N vs {delta[1]:.1f} MiB at 10N)")
    print(f"peak RSS ratio 10N / N: {growth:.3f}  (target < 1.2: {'PASS' if growth < 1.2 else 'FAIL'})")
    return {
        "time_ratio": ratio, "plain_s": min(plain), "extract_s": min(extract), "n": n,
        "rss": rss, "rss_ratio": growth, "device": str(ws.device),
    }


#: ``bench cfe``'s target for (CFE fit + predict) / one extraction pass, by head kind: a pooled head
#: trains on ``[B, C]`` features; a map head (VGG) runs its FC layers once per image and class.
CFE_TARGET = {"pooled": 1.0, "map": 10.0}


def bench_cfe(ws_config: WorkspaceConfig, n: int = 128, repeats: int = 3, limit: int | None = None) -> dict:
    """CFE fit + mask prediction for all classes vs one extraction pass over the same training
    split (target ≤ 1×; fastest of ``repeats``), and Grad-CAM images/s on ``n`` training images
    batched vs one image at a time. ``limit``: only the first ``limit`` training images (both
    sides of the ratio), e.g. VGG16 at 224 px on a small set."""
    from .cfe import CFEConfig, fit_mc_heads, masked_head, predict_masks
    from .extract import stream_features
    from .gradcam import gradcam
    from .workspace import Workspace

    if limit is not None and limit <= 0:
        raise CfdebugError(f"Expected a positive `--limit`, but got {limit}; leave it out to use every training image.")
    batch_size = ws_config.extract.batch_size
    ws = Workspace(ws_config)
    train = ws.data.torch_split("train")
    if limit is not None and limit < len(train):
        train = torch.utils.data.Subset(train, range(limit))  # items keep their indices 0..limit-1
    batches = list(torch.utils.data.DataLoader(train, batch_size=batch_size))
    extract_s = min(_time_extraction(ws.model, ws.target.name, ws.target.activation, batches, len(train), ws.device) for _ in range(repeats))
    head = masked_head(ws.target, ws.device)
    with tempfile.TemporaryDirectory() as tmp:
        # A head that runs on feature maps (VGG) trains on the cached maps, read from disk.
        stream_features(ws.model, ws.target.name, batches, len(train), Path(tmp), ws.device, ws.target.activation, keep_maps=head.kind == "map")
        features = np.load(Path(tmp) / "features.npy")
        logits = np.load(Path(tmp) / "logits.npy")
        maps = np.load(Path(tmp) / "maps.npy", mmap_mode="r") if head.kind == "map" else None
        # Warm-up, as for the extraction pass: the first optimizer step of a process pays one-time
        # imports (~1-2 s on CPU) that are no part of fitting.
        warm = min(256, len(features))
        fit_mc_heads(features[:warm], head, ws.data.num_classes, CFEConfig(epochs=1), ws.device, head_inputs=None if maps is None else maps[:warm])
        fit_times = []
        for _ in range(repeats):
            start = time.perf_counter()
            heads, _ = fit_mc_heads(features, head, ws.data.num_classes, CFEConfig(), ws.device, head_inputs=maps)
            fit_times.append(time.perf_counter() - start)
        del maps
    fit_s = min(fit_times)
    start = time.perf_counter()
    predict_masks(heads, features, logits.argmax(1))
    predict_s = time.perf_counter() - start
    ratio = (fit_s + predict_s) / extract_s
    target = CFE_TARGET[head.kind]
    print(f"model {ws.config.model.name} on {ws.data.name}: {len(train)} training images, {ws.target.channels} filters, {ws.data.num_classes} classes, {head.kind} head, device {ws.device}, {torch.get_num_threads()} threads")
    print(f"extraction pass: {extract_s:.3f} s; CFE fit (all {ws.data.num_classes} MC heads, {CFEConfig().epochs} epochs): {fit_s:.3f} s; mask prediction: {predict_s:.3f} s")
    print(f"time ratio (CFE fit + predict) / extraction pass: {ratio:.3f}  (target <= {target:g}: {'PASS' if ratio <= target else 'FAIL'})")

    n = min(n, len(train))
    x = torch.stack([train[i][0] for i in range(n)])
    targets = torch.as_tensor(logits[:n].argmax(1))
    gradcam(ws.model, ws.target.name, x[:4], targets[:4], ws.device)  # warm-up
    start = time.perf_counter()
    gradcam(ws.model, ws.target.name, x, targets, ws.device, batch_size=batch_size)
    batched_s = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(n):
        gradcam(ws.model, ws.target.name, x[i : i + 1], targets[i : i + 1], ws.device, batch_size=1)
    single_s = time.perf_counter() - start
    print(f"Grad-CAM on {n} images: batched {n / batched_s:.0f} images/s, one at a time {n / single_s:.0f} images/s; speed-up {single_s / batched_s:.1f}x")
    return {
        "extract_s": extract_s, "cfe_fit_s": fit_s, "cfe_predict_s": predict_s, "cfe_ratio": ratio, "cfe_target": target, "head": head.kind,
        "gradcam_n": n, "gradcam_batched_ips": n / batched_s, "gradcam_single_ips": n / single_s, "gradcam_speedup": single_s / batched_s,
        "device": str(ws.device),
    }


def bench_treat(ws_config: WorkspaceConfig, epochs_per_repeat: int = 2, repeats: int = 3) -> dict:
    """Training time of a treatment epoch (CE − λ1·L_MC + λ2·L_nonMC) against a CE-only epoch
    of the identical schedule (target ≤ 1.10); the fastest epoch of each is compared, and the
    two kinds alternate (``repeats`` times, ``epochs_per_repeat`` epochs each) so machine load
    hits both alike."""
    from .config import FinetuneConfig, TreatmentConfig
    from .training import finetune
    from .treatment import training_sets, treatment_loss
    from .workspace import Workspace

    ws = Workspace(ws_config)
    sets = torch.from_numpy(training_sets(ws)).to(ws.device)
    treat_cfg = TreatmentConfig(epochs=epochs_per_repeat)
    ce_cfg = FinetuneConfig(epochs=epochs_per_repeat)

    def treat_loss(batch):
        return treatment_loss(batch.logits, batch.labels, batch.pooled, sets[batch.labels], treat_cfg.lambda1, treat_cfg.lambda2, treat_cfg.theta)

    treat_s, ce_s = [], []
    for _ in range(repeats):
        ce_s += [r["train_seconds"] for r in finetune(ws, ce_cfg).history]
        treat_s += [r["train_seconds"] for r in finetune(ws, treat_cfg, loss_fn=treat_loss).history]
    ratio = min(treat_s) / min(ce_s)
    print(f"model {ws.config.model.name} on {ws.data.name}, trainable {treat_cfg.trainable}, batch {treat_cfg.batch_size}, device {ws.device}")
    print(f"fastest training epoch: CE-only {min(ce_s):.3f} s, treatment {min(treat_s):.3f} s ({len(ce_s)} epochs each)")
    print(f"time ratio treatment / CE-only epoch: {ratio:.3f}  (target <= 1.10: {'PASS' if ratio <= 1.10 else 'FAIL'})")
    return {"ce_epoch_s": min(ce_s), "treat_epoch_s": min(treat_s), "ratio": ratio, "device": str(ws.device)}


def bench_xcr_selector(ws_config: WorkspaceConfig, n: int = 64) -> dict:
    """Selector masks/s vs captum Occlusion with the same patch size, and the Avg Drop of both."""
    from .workspace import Workspace
    from .xcr import bench_xcr, format_bench

    ws = Workspace(ws_config)
    out = bench_xcr(ws, n_images=n, batch_size=ws_config.extract.batch_size)
    print(format_bench(out))
    return out


#: ``--n``'s default for each ``python -m cfdebug bench WHAT`` (images; unused by ``treat``).
DEFAULT_N = {"extract": 2000, "cfe": 128, "treat": 0, "xcr": 64}
