#!/usr/bin/env python
"""Plot a certified-training curve (VRA / clean accuracy vs wall time) from the recipe's ``eval_metrics.csv``.

    python benchmarks/plot_training_curve.py outputs/cifar10_6c2f/eval_metrics.csv \
        benchmarks/results/cifar10_6c2f_curve.png --title "CIFAR-10 6C2F, ε = 36/255"

``eval_metrics.csv`` is written by :class:`hf_gloro.trainer.CertifiedMetricsCSVCallback` (one row per
evaluation: ``elapsed_s, epoch, step, eval_clean_accuracy, eval_vra, …``). Rows of other prefixes (``test_``)
are ignored for the curve.
"""

from __future__ import annotations

import argparse
import csv

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv")
    parser.add_argument("png")
    parser.add_argument("--title", default="certified training")
    args = parser.parse_args()
    with open(args.csv, newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("eval_vra")]
    minutes = [float(row["elapsed_s"]) / 60 for row in rows]
    figure, axis = plt.subplots(figsize=(7, 4.2))
    axis.plot(minutes, [float(row["eval_clean_accuracy"]) for row in rows], label="clean accuracy (validation)")
    axis.plot(minutes, [float(row["eval_vra"]) for row in rows], label="VRA at ε (validation)", linewidth=2)
    for key in rows[0]:
        if key.startswith("eval_vra@") and rows[0][key]:
            axis.plot(minutes, [float(row[key]) for row in rows], linestyle="--", label=key.replace("eval_", ""))
    axis.set_xlabel("wall time (minutes)")
    axis.set_ylabel("fraction of validation images")
    axis.set_title(args.title)
    axis.grid(alpha=0.3)
    axis.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(args.png, dpi=120)
    print(f"wrote {args.png} ({len(rows)} evaluations)")


if __name__ == "__main__":
    main()
