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


def _peak_rss_child(args) -> dict:
    """Run in a fresh process: extraction over ``args.rss_child`` synthetic images; report RSS."""
    from .cli import workspace_config
    from .workspace import Workspace

    ws = Workspace(workspace_config(args))
    n = args.rss_child
    batches = torch.utils.data.DataLoader(SyntheticImages(n, ws.data.input_size), batch_size=args.batch_size)
    import psutil

    before = psutil.Process().memory_info().rss / 1024  # KiB, like ru_maxrss on Linux
    _time_extraction(ws.model, ws.target.name, ws.target.activation, batches, n, ws.device)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"n": n, "peak_rss_mib": after / 1024, "rss_before_mib": before / 1024}


def bench_extract(args) -> dict:
    from .cli import workspace_config
    from .workspace import Workspace

    if args.rss_child is not None:
        result = _peak_rss_child(args)
        print(json.dumps(result))
        return None
    if args.n <= 0 or args.repeats <= 0:
        raise CfdebugError(f"Expected positive `--n` and `--repeats`, but got {args.n} and {args.repeats}.")
    ws = Workspace(workspace_config(args))
    data = SyntheticImages(args.n, ws.data.input_size)
    batches = torch.utils.data.DataLoader(data, batch_size=args.batch_size)
    cached = list(batches)  # the same tensors for both passes, so only the model work differs
    _plain_inference(ws.model, cached[:2], ws.device)  # warm-up
    plain, extract = [], []
    for _ in range(args.repeats):
        plain.append(_plain_inference(ws.model, cached, ws.device))
        extract.append(_time_extraction(ws.model, ws.target.name, ws.target.activation, cached, args.n, ws.device))
    ratio = min(extract) / min(plain)
    print(f"model {ws.config.model.name}, layer {ws.target.name}, {args.n} images of {ws.data.input_size}px, batch {args.batch_size}, device {ws.device}")
    print(f"plain inference: {min(plain):.3f} s ({args.n / min(plain):.0f} images/s); extraction: {min(extract):.3f} s")
    print(f"time ratio extraction / inference: {ratio:.3f}  (target <= 1.15: {'PASS' if ratio <= 1.15 else 'FAIL'})")
    rss = []
    for n in (args.n, 10 * args.n):
        cmd = [sys.executable, "-m", "cfdebug", "bench", "extract", "--rss-child", str(n), "--model", args.model,
               "--data", args.data, "--workdir", args.workdir, "--device", args.device, "--batch-size", str(args.batch_size)]
        if args.weights:
            cmd += ["--weights", args.weights]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            raise CfdebugError(f"The RSS measurement process failed: {out.stderr.strip()[-500:]}")
        rss.append(json.loads(out.stdout.strip().splitlines()[-1]))
    growth = rss[1]["peak_rss_mib"] / rss[0]["peak_rss_mib"]
    delta = [max(0.0, r["peak_rss_mib"] - r["rss_before_mib"]) for r in rss]
    print(f"peak RSS: {rss[0]['peak_rss_mib']:.0f} MiB at N={rss[0]['n']}, {rss[1]['peak_rss_mib']:.0f} MiB at 10N={rss[1]['n']}")
    print(f"  (peak above the RSS just before extraction: {delta[0]:.1f} MiB at N vs {delta[1]:.1f} MiB at 10N)")
    print(f"peak RSS ratio 10N / N: {growth:.3f}  (target < 1.2: {'PASS' if growth < 1.2 else 'FAIL'})")
    return {
        "time_ratio": ratio, "plain_s": min(plain), "extract_s": min(extract), "n": args.n,
        "rss": rss, "rss_ratio": growth, "device": str(ws.device),
    }


BENCHES = {"extract": bench_extract}


def run(what: str, args) -> dict:
    return BENCHES[what](args)
