"""Accuracy per minute: candidate configurations, each trained and tested once on the real data, so the choice of
the shipped defaults can be reproduced.

Each candidate is a real `fmnist train --arch ARCH --dry-run OVERRIDES...` process (tracking off, everything
else as shipped), run one after the other; the wall time includes start-up, data, any feature extraction,
training, export and the test evaluation. Rows are appended to benchmarks/accuracy.csv (every candidate ever
tried stays there) and printed as a Markdown table.

    python benchmarks/accuracy.py cnn "model.widths=[64,128,256] train.epochs=6" "train.epochs=20"
    python benchmarks/accuracy.py --table   # the table of every row so far
"""
from __future__ import annotations

import argparse
import csv
import re
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from fmnist.errors import reported

RESULTS = Path(__file__).with_name("accuracy.csv")
FIELDS = ["date", "arch", "overrides", "test_accuracy", "macro_f1", "best_epoch", "train_seconds", "wall_seconds",
          "feature_cache", "note"]
SUMMARY = re.compile(r"test accuracy (?P<accuracy>[\d.]+), macro F1 (?P<f1>[\d.]+), ECE [\d.]+, best epoch "
                     r"(?P<epoch>\d+), (?P<seconds>\d+) s")


def run(arch: str, overrides: str, note: str) -> dict:
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "fmnist", "train", "--arch", arch, "--dry-run",
                          *shlex.split(overrides)], capture_output=True, text=True)
    wall = time.perf_counter() - start
    found = SUMMARY.search(out.stdout)
    if out.returncode or not found:
        raise SystemExit(f"{arch} {overrides}: failed\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    cache = "hit" if "from the cache" in out.stdout else "miss" if "(computed)" in out.stdout else ""
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"), "arch": arch, "overrides": overrides,
            "test_accuracy": found["accuracy"], "macro_f1": found["f1"], "best_epoch": found["epoch"],
            "train_seconds": found["seconds"], "wall_seconds": f"{wall:.0f}", "feature_cache": cache, "note": note}


def table(rows: list[dict]) -> str:
    lines = ["| arch | configuration (over the shipped defaults of its time) | test accuracy | wall min | "
             "accuracy per minute | note |", "|---|---|---|---|---|---|"]
    for r in rows:
        minutes = float(r["wall_seconds"]) / 60
        cells = [r["arch"], f"`{r['overrides'] or '(defaults)'}`", r["test_accuracy"], f"{minutes:.1f}",
                 f"{float(r['test_accuracy']) / minutes:.3f}", r["note"]]
        # Markdown splits a row at every bare | (even in code), so a note's KL(p || q) would make new cells
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("arch", nargs="?")
    ap.add_argument("candidates", nargs="*", help="each one string of section.key=value overrides")
    ap.add_argument("--note", default="", help="kept with each row, e.g. what the candidate tests")
    ap.add_argument("--table", action="store_true", help="print the table of every row so far")
    args = ap.parse_args()
    rows = list(csv.DictReader(RESULTS.open())) if RESULTS.is_file() else []
    for overrides in args.candidates:
        row = run(args.arch, overrides, args.note)
        print(table([row]).splitlines()[-1], flush=True)
        rows.append(row)
        new = not RESULTS.is_file()
        with RESULTS.open("a", newline="") as f:
            writer = csv.DictWriter(f, FIELDS, lineterminator="\n")  # the file's own line ends
            if new:
                writer.writeheader()
            writer.writerow(row)
    if args.table or not args.candidates:
        print(table(rows))


if __name__ == "__main__":
    with reported("accuracy.py"):
        main()
