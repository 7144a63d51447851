"""Compare evaluation runs: one Markdown table with a row per run, and one grid with a row per run.

    python -m evaluate.compare runs/eval-var runs/eval-mmd8192 runs/eval-mmd8192-adapted \
        --grid comparison.png --out comparison.md

A metric a run left out is shown as '—' with a footnote that gives the reason and the file to supply.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from common.config import exit_on_input_error
from evaluate.grid import compose_grid, grid_row, load_png, save_png

# column -> (format of the value, whether higher is better); U is shown in percent
COLUMNS = {
    "E": ("{:.4f}", False),
    "U": ("{:.1%}", True),
    "PSNR": ("{:.2f}", True),
    "SSIM": ("{:.4f}", True),
    "LPIPS": ("{:.4f}", False),
    "r-FID": ("{:.2f}", False),
    "r-IS": ("{:.1f}", True),
}
MISSING = "—"


def load_report(run: str | Path) -> dict[str, Any]:
    """Read report.json from a run directory (or the report file itself), noting the directory it came from."""
    path = Path(run)
    report_path = path if path.is_file() else path / "report.json"
    if not report_path.is_file():
        raise FileNotFoundError(f"{report_path} not found; give a run directory written by evaluate/run.py")
    try:
        report = json.loads(report_path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{report_path} is not valid JSON ({error}); rerun evaluate/run.py for that run") from None
    if not isinstance(report, dict) or "metrics" not in report or "label" not in report:
        raise ValueError(f"{report_path} is not an evaluation report: it has no 'metrics' or 'label'")
    report["_dir"] = str(report_path.parent)
    return report


def _cell(report: dict, column: str, footnotes: dict[str, int]) -> str:
    value = report["metrics"].get(column)
    if value is not None and not (isinstance(value, float) and math.isnan(value)):
        return COLUMNS[column][0].format(value)
    reason = report.get("left_out", {}).get(column, "not computed by this run")
    number = footnotes.setdefault(reason, len(footnotes) + 1)
    return f"{MISSING} [{number}]"


def format_table(reports: list[dict[str, Any]]) -> str:
    """Return a Markdown table, one row per report, with footnotes for left-out metrics."""
    arrows = {name: "↑" if higher else "↓" for name, (_, higher) in COLUMNS.items()}
    header = ["run", "N"] + [f"{name} {arrows[name]}" for name in COLUMNS]
    footnotes: dict[str, int] = {}
    rows = [[report["label"], str(report.get("n", ""))] + [_cell(report, c, footnotes) for c in COLUMNS]
            for report in reports]

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    if footnotes:
        lines.append("")
        lines += [f"[{number}] {reason}" for reason, number in footnotes.items()]
    return "\n".join(lines)


def combined_grid(reports: list[dict[str, Any]]) -> torch.Tensor:
    """Stack the originals row of the first run and the reconstruction row of every run: (3, H, W) uint8."""
    first = reports[0]["grid"]
    rows = []
    for report in reports:
        grid = report.get("grid")
        if grid is None:
            raise ValueError(f"run {report['_dir']} has no reconstruction grid in its report")
        if grid["keys"] != first["keys"] or grid["tile"] != first["tile"]:
            raise ValueError(
                f"run {report['_dir']} shows samples {grid['keys'][:3]}... at {grid['tile']}px but the first run "
                f"shows {first['keys'][:3]}... at {first['tile']}px; compare runs on the same evaluation set"
            )
        image = load_png(Path(report["_dir"]) / grid["file"])
        if not rows:
            rows.append(grid_row(image, 0, len(grid["keys"]), grid["tile"]))
        rows.append(grid_row(image, 1, len(grid["keys"]), grid["tile"]))
    return compose_grid(rows)


@dataclass
class CompareConfig:
    """Compare evaluation runs in one table and one reconstruction grid."""

    runs: tuple[str, ...]
    grid: str | None = None
    out: str | None = None


def main(cfg: CompareConfig) -> str:
    # read every report first, so a bad run directory fails before anything is written
    reports = [load_report(run) for run in cfg.runs]
    for flag, path in (("--grid", cfg.grid), ("--out", cfg.out)):
        if path and Path(path).is_dir():
            raise IsADirectoryError(f"{flag} {path} is a folder; give a file path inside it")

    # the table, printed and optionally saved
    table = format_table(reports)
    print(table)
    if cfg.out:
        Path(cfg.out).write_text(table + "\n")

    # the grid: rows in table order under one row of originals
    if cfg.grid:
        save_png(combined_grid(reports), cfg.grid)
        labels = ", ".join(r["label"] for r in reports)
        print(f"\ngrid {cfg.grid}: originals, then {labels}")
    return table


def _parse(argv: list[str] | None = None) -> CompareConfig:
    """Parse `RUN1 RUN2 ... [--grid OUT.png] [--out table.md]`; plain argparse, because the runs are positional."""
    import argparse

    parser = argparse.ArgumentParser(description=CompareConfig.__doc__)
    parser.add_argument("runs", nargs="+", help="evaluation run directories, in table order")
    parser.add_argument("--grid", help="PNG with the originals on top and one row of reconstructions per run")
    parser.add_argument("--out", help="also write the table to this Markdown file")
    args = parser.parse_args(argv)
    return CompareConfig(tuple(args.runs), args.grid, args.out)


if __name__ == "__main__":
    with exit_on_input_error():
        main(_parse())
