"""Plain-text Tables 1 and 2 and the benchmark paragraph (what ``python -m cfdebug xcr`` prints)."""

from __future__ import annotations

import sys
from typing import Sequence

__all__ = ["format_table1", "format_table2", "format_bench", "print_table1", "print_table2"]


def _fmt(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _table(headers: Sequence[str], rows: list[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.rjust(w) for h, w in zip(headers, widths))
    body = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join([line, "-" * len(line), *body])


def format_table1(result: dict) -> str:
    """Table 1 as text: k, β, mode, accuracy, Avg Drop, Avg Inc, fidelity, sufficiency."""
    rows = [
        [str(r["k"]), "–" if r["beta"] is None else f"{r['beta']:g}", r["mode"], _fmt(r["accuracy"]), _fmt(r["avg_drop"]),
         _fmt(r["avg_inc"]), _fmt(r["fidelity"]), _fmt(r["sufficiency"])]
        for r in result["table1"]
    ]
    title = "Table 1: explanation metrics on the test split (accuracy: approximator on T(x); random: black box on T(x))"
    return title + "\n" + _table(["k", "β", "mode", "accuracy", "Avg Drop", "Avg Inc", "fidelity", "sufficiency"], rows)


def format_table2(result: dict) -> str:
    """Table 2 as text: accuracy, ECE, NLL, Brier, clean and corrupt, per method (mean over seeds)."""
    rows = [
        [r["method"], _fmt(r["clean_acc"]), _fmt(r["corrupt_acc"]), _fmt(r["clean_ece"]), _fmt(r["corrupt_ece"]),
         _fmt(r["clean_nll"]), _fmt(r["corrupt_nll"]), _fmt(r["clean_brier"]), _fmt(r["corrupt_brier"])]
        for r in result["table2"]
    ]
    n = result["table2"][0]["n_seeds"] if result["table2"] else 0
    title = f"Table 2: calibration, clean and corrupted test images (mean over {n} seed{'s' if n != 1 else ''}; +TS = temperature fitted on val)"
    text = title + "\n" + _table(["method", "acc clean", "acc corrupt", "ECE clean", "ECE corrupt", "NLL clean", "NLL corrupt",
                                  "Brier clean", "Brier corrupt"], rows)
    if result.get("settings"):
        text += "\n" + result["settings"]
    return text


def format_bench(out: dict) -> str:
    """One paragraph for :func:`~cfdebug.xcr.bench.bench_xcr`'s result (what ``cfdebug bench xcr`` prints)."""
    verdict = "meets" if out["ratio"] >= out["target_ratio"] else "misses"
    return (
        f"XCR selector vs captum Occlusion (window 3×{out['patch_size']}×{out['patch_size']}, stride {out['patch_size']}, "
        f"top-{out['k']} of {out['d']} patches) on {out['n_images']} test images, device {out['device']}:\n"
        f"  selector  {out['selector_masks_per_s']:10.1f} masks/s   Avg Drop {out['selector_avg_drop']:.3f}   fidelity {out['selector_fidelity']:.3f}\n"
        f"  Occlusion {out['occlusion_masks_per_s']:10.1f} masks/s   Avg Drop {out['occlusion_avg_drop']:.3f}   fidelity {out['occlusion_fidelity']:.3f}\n"
        f"  ratio {out['ratio']:.0f}× ({verdict} the target ≥ {out['target_ratio']:.0f}×)"
    )


def print_table1(result: dict, file=None) -> str:
    """Print :func:`format_table1` (to stdout by default) and return the text."""
    text = format_table1(result)
    print(text, file=file or sys.stdout)
    return text


def print_table2(result: dict, file=None) -> str:
    """Print :func:`format_table2` (to stdout by default) and return the text."""
    text = format_table2(result)
    print(text, file=file or sys.stdout)
    return text
