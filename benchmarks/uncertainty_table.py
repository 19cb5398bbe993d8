"""Combine the ``uncertainty.json`` of several run folders into one Markdown table and one figure.

Each run folder must have been evaluated with ``pyrolora evaluate RUN_DIR --ood DATA`` (or ``--uncertainty``)::

    python benchmarks/uncertainty_table.py "MAP=runs/map" "B-LoRA-XS=runs/blora" --plot runs/accuracy_coverage.png

Prints the per-score table (AURC, selective accuracy, AUROC, AUPR, Spearman with rater disagreement) and the mean
uncertainty decomposition of every method, in distribution and on the shifted data.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pyrolora.evaluation.plots import accuracy_coverage_plot
from pyrolora.evaluation.uncertainty import format_uncertainty_table
from pyrolora.runs.report import UNCERTAINTY_FILE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="NAME=RUN_DIR (or RUN_DIR, named by its folder)")
    parser.add_argument("--plot", type=Path, help="write the accuracy-coverage curves of all runs here")
    args = parser.parse_args()
    reports = {}
    for item in args.runs:
        name, _, folder = item.rpartition("=")
        folder = Path(folder)
        reports[name or folder.name] = json.loads((folder / UNCERTAINTY_FILE).read_text(encoding="utf-8"))
    first = next(iter(reports.values()))
    print(f"split: {first.get('split')}  ({first['num_examples']} examples)   OOD: {first.get('ood')}", end="")
    print(f"  ({first.get('num_ood_examples', 0)} examples)\n")
    print(format_uncertainty_table(reports))
    print("\n| method | data | total entropy | expected entropy (aleatoric) | mutual information (epistemic) |")
    print("|---|---|---:|---:|---:|")
    for name, report in reports.items():
        for where, d in report["decomposition"].items():
            cells = f"{d['total_entropy']:.4f} | {d['expected_entropy']:.4f} | {d['mutual_information']:.2e}"
            print(f"| {name} | {'in-distribution' if where == 'in' else 'shifted'} | {cells} |")
    if args.plot:
        accuracy_coverage_plot(reports, args.plot)
        print(f"\nwrote {args.plot}")


if __name__ == "__main__":
    main()
