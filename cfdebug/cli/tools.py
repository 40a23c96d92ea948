"""The commands around the work: ``export-demo``, ``models``, ``bench`` and ``serve``."""

from __future__ import annotations

import argparse

from ..config import DEMO_DATASETS
from ..serve import DEFAULT_HOST, DEFAULT_PORT
from ..store import json_text
from .options import workspace_config

def cmd_export_demo(args) -> dict:
    from ..data import export_imagefolder

    counts = export_imagefolder(args.directory, bias=args.bias, seed=args.data_seed, bed=args.bed)
    print(f"wrote {args.bed}{f' (bias {args.bias})' if args.bed == 'biased-digits' else ''} to {args.directory}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    print(f"use it with: python -m cfdebug extract --data {args.directory}")
    return {"directory": str(args.directory), "counts": counts}


def cmd_models(args) -> dict:
    from ..models import available_models

    names = available_models()
    print("\n".join(names))
    return {"models": names}


def cmd_bench(args) -> dict | None:
    from .. import bench

    ws_config = workspace_config(args)
    if args.rss_child is not None:  # the fresh process `bench extract` measures RSS in
        print(json_text(bench.peak_rss_child(ws_config, args.rss_child), what="RSS measurement"))
        return None
    n = bench.DEFAULT_N[args.what] if args.n is None else args.n
    if args.threads is None:
        return _run_bench(bench, args, ws_config, n)
    from ..runtime import fixed_threads

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
    from ..serve import serve

    serve(args.host, args.port, args.root or (), args.read_only, args.streamlit_args)


def add_export_demo(sub, ws, common) -> None:
    p = sub.add_parser("export-demo", parents=[common], help="write Biased Digits as an ImageFolder tree (DIR/train/<class>/*.png, DIR/val/…, DIR/test/…)")
    p.add_argument("directory", help="an empty or new folder")
    p.add_argument("--bias", type=float, default=0.9, help="shortcut strength in train/val (default 0.9; 0 = clean digits)")
    p.add_argument("--bed", default="biased-digits", choices=DEMO_DATASETS, help="which embedded set to export (default biased-digits; --bias applies to it only)")
    p.add_argument("--data-seed", type=int, default=0, help="split seed (default 0)")
    p.set_defaults(func=cmd_export_demo)


def add_models(sub, ws, common) -> None:
    p = sub.add_parser("models", parents=[common], help="list the model names --model accepts")
    p.set_defaults(func=cmd_models)


def add_bench(sub, ws, common) -> None:
    p = sub.add_parser("bench", parents=[ws, common], help="benchmarks that print ratios against a baseline measured in the same run")
    p.add_argument("what", choices=["extract", "cfe", "treat", "xcr"], help="extract: extraction vs plain inference time, and peak RSS at N vs 10×N images; cfe: CFE fit + mask prediction vs one extraction pass, and Grad-CAM batched vs one image at a time; treat: a treatment epoch vs a CE-only epoch; xcr: selector masks/s vs captum Occlusion, and both Avg Drops")
    p.add_argument("--epochs-per-repeat", type=int, default=2, help="bench treat: epochs per timed run (default 2)")
    p.add_argument("--n", type=int, default=None, help="images: for extract the timing and the smaller RSS run (default 2000); for cfe the Grad-CAM images (default 128); for xcr (default 64)")
    p.add_argument("--limit", type=int, default=None, help="bench cfe: only the first N training images for both sides of the ratio (default: all), e.g. vgg16 at --input-size 224")
    p.add_argument("--repeats", type=int, default=3, help="timing repeats; the fastest of each is compared (default 3)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads for the whole bench (default: torch's own count); a fixed count on a shared machine")
    p.add_argument("--rss-child", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_bench)


def add_serve(sub, ws, common) -> None:
    p = sub.add_parser("serve", help="start the dashboard (127.0.0.1 unless --host says otherwise); Streamlit options after --",
                       epilog="Sharing: put it behind a reverse proxy with authentication; --read-only for demos. Docs: README.md.")
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST}: this machine only; 0.0.0.0 shares it)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument("--root", action="append", metavar="DIR", help="a further folder the dashboard may read weights and datasets from (repeatable; the start folder and the workdir always are)")
    p.add_argument("--read-only", action="store_true", help="no launching or cancelling runs, only the preset workspaces (demos)")
    p.add_argument("streamlit_args", nargs="*", metavar="-- STREAMLIT_OPTION", help="further `streamlit run` options, after --")
    p.set_defaults(func=cmd_serve)
