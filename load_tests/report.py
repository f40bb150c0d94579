#!/usr/bin/env python3
"""Turn perf_analyzer and locust outputs into one markdown summary and a PNG plot.

    python load_tests/report.py --perf results/perf_analyzer --locust results/locust/locust --out results/load

Reads ``<perf>/txt2img.csv`` and ``<perf>/denoise_step.csv`` (perf_analyzer -f) and
``<locust>_stats.csv`` (locust --csv); whatever is present is reported.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path


def read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path) as handle:
        return list(csv.DictReader(handle))


def perf_table(title: str, rows: list[dict[str, str]], unit: str) -> list[str]:
    lines = [f"## perf_analyzer: {title}", "", f"| concurrency | {unit}/s | p50 ms | p99 ms |", "|---|---|---|---|"]
    for row in rows:
        lines.append(
            f"| {row['Concurrency']} | {float(row['Inferences/Second']):.2f} | "
            f"{int(row['p50 latency']) / 1000:.1f} | {int(row['p99 latency']) / 1000:.1f} |"
        )
    return [*lines, ""]


def locust_table(rows: list[dict[str, str]]) -> list[str]:
    lines = [
        "## locust",
        "",
        "| request | count | failures | requests/s | p50 ms | p99 ms |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['Name']} | {row['Request Count']} | {row['Failure Count']} | "
            f"{float(row['Requests/s']):.2f} | {row['50%']} | {row['99%']} |"
        )
    return [*lines, ""]


def plot(rows: list[dict[str, str]], path: Path) -> bool:
    """Throughput and p99 latency of txt2img against concurrency; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    concurrency = [int(row["Concurrency"]) for row in rows]
    fig, throughput = plt.subplots(figsize=(7, 4))
    throughput.plot(concurrency, [float(row["Inferences/Second"]) for row in rows], "o-", color="tab:blue")
    throughput.set(xlabel="concurrency", ylabel="images/s", title="txt2img (perf_analyzer)")
    latency = throughput.twinx()
    latency.plot(concurrency, [int(row["p99 latency"]) / 1e6 for row in rows], "s--", color="tab:red")
    latency.set_ylabel("p99 latency (s)", color="tab:red")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--perf", type=Path, default=Path("results/perf_analyzer"))
    parser.add_argument("--locust", type=Path, default=Path("results/locust/locust"), help="locust --csv prefix")
    parser.add_argument("--out", type=Path, default=Path("results/load"))
    args = parser.parse_args(argv)
    txt2img = read_csv(args.perf / "txt2img.csv")
    denoise = read_csv(args.perf / "denoise_step.csv")
    locust = read_csv(args.locust.parent / f"{args.locust.name}_stats.csv")
    if not (txt2img or denoise or locust):
        print("no perf_analyzer or locust outputs found", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    lines = ["# stepdiff load report", ""]
    if txt2img:
        lines += perf_table("txt2img (closed loop)", txt2img, "images")
    if denoise:
        lines += perf_table("denoise_step (sequences; one inference = one step call)", denoise, "calls")
    if locust:
        lines += locust_table(locust)
    if txt2img and plot(txt2img, args.out / "txt2img.png"):
        lines += ["![txt2img throughput and p99 latency](txt2img.png)", ""]
    (args.out / "summary.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
