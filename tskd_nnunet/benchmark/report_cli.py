"""``tskd_report``: the benchmark report from result tables, from a committed results folder, or two committed
folders' profile agreement. Apart from report.py so the report itself imports neither of the other two."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

import pandas as pd

from tskd_nnunet.benchmark.committed import write_committed_report
from tskd_nnunet.benchmark.profile_agreement import write_profile_agreement
from tskd_nnunet.benchmark.report import BASELINE, METRICS, write_report


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="tskd_report", description="Benchmark report (Markdown, CSV, PNG) from result tables, "
                                                               "or from a benchmark's committed results folder.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("-results", help="long-format results CSV (dataset, method, budget, fold/seed, "
                                      "case, class, dice, nsd, hd95, optional clinical columns)")
    src.add_argument("--from-committed", metavar="DIR", default=None,
                     help="a committed results folder of tskd_benchmark (runs/*/cases.csv + settings.json + "
                          "matrix.json, e.g. documentation/benchmarks/hc18_cpu); the report is rebuilt from these "
                          "files alone, into DIR unless -o is given")
    src.add_argument("--compare-profiles", nargs=2, metavar=("SHORT", "LONG"), default=None,
                     help="two committed folders of one benchmark (e.g. documentation/benchmarks/hc18_cpu_short "
                          "documentation/benchmarks/hc18_cpu): do they rank the arms the same way? Writes "
                          "profile_agreement.md/.csv into SHORT unless -o is given")
    p.add_argument("-runs", default=None, help="run status CSV (method, budget, fold/seed, status, params, "
                                               "latency_ms, error)")
    p.add_argument("-o", "--output-dir", default=None)
    p.add_argument("--baseline", default=BASELINE)
    p.add_argument("--resamples", type=int, default=10000, help="bootstrap resamples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--title", default="Benchmark report")
    p.add_argument("--metric", default="dice", choices=METRICS, help="with --compare-profiles (default: dice)")
    a = p.parse_args(argv)
    if not (a.compare_profiles or a.from_committed or a.output_dir):
        p.error("-o/--output-dir is required with -results")
    try:
        if a.compare_profiles:
            written = write_profile_agreement(*a.compare_profiles, a.output_dir, a.metric, a.baseline, a.resamples,
                                              a.seed)
        elif a.from_committed:
            written = write_committed_report(a.from_committed, a.output_dir, a.resamples, a.seed)
        else:
            runs = pd.read_csv(a.runs, keep_default_na=True) if a.runs else None
            written = write_report(pd.read_csv(a.results), runs, a.output_dir, a.baseline, None, None, a.resamples,
                                   a.seed, a.title)
    except FileNotFoundError as e:
        print(f"tskd_report: error: {e}", file=sys.stderr)
        return 2
    main_file = next(v for k, v in written.items() if k.endswith(".md"))
    print(f"wrote {main_file} and {len(written) - 1} more files")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
