"""``tskd_benchmark``: run a (method x label budget x fold) matrix through nnU-Net's commands and ours.

    tskd_benchmark CONFIG.json [--profile cpu|gpu] [--workdir DIR] [--only METHOD ...] [--budgets B ...]
                               [--committed DIR | --no-committed] [--dry-run] [--report-only] [--skip-failed]
                               [--park] [--jobs N] [--executor slurm] [SNAKEMAKE OPTIONS]

Every step is a Snakemake job (tskd_nnunet/benchmark/Snakefile), run here one at a time unless --jobs N, or by an
executor plugin (--executor slurm); options this command does not know go to Snakemake as they are.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from typing import Any, List, Optional, Sequence

from tskd_nnunet.benchmark.config import Budget, BenchmarkConfigError, load_config
from tskd_nnunet.benchmark.model_transfer import park
from tskd_nnunet.benchmark.results import write_benchmark_report
from tskd_nnunet.benchmark.runner import BenchmarkError, BenchmarkRunner, committed_root, parse_budgets
from tskd_nnunet.benchmark.workflow import BenchmarkWorkflow, snakemake_command


def _snakemake(runner: BenchmarkRunner, a: Any, budgets: Optional[Sequence[Budget]], extra: List[str],
               dry_run: bool = False) -> int:
    """Run (or dry-run: in a scratch folder, nothing written to the work directory) the matrix through Snakemake.
    Its metadata and lock live in WORKDIR/.snakemake_tskd: one tskd_benchmark per work directory."""
    wf = BenchmarkWorkflow(runner, a.only, budgets)  # the identity check of committed runs, before anything runs
    config = {"config": runner.cfg.path, "profile": runner.profile_name, "workdir": runner.workdir,
              "committed": runner.store.root if runner.store else None, "no_committed": runner.store is None,
              "only": a.only, "budgets": [str(b) for b in budgets] if budgets else None, "skip_failed": a.skip_failed}
    with tempfile.TemporaryDirectory() as scratch:
        cmd = snakemake_command(config, scratch if dry_run else os.path.join(runner.workdir, ".snakemake_tskd"),
                                wf.targets(a.skip_failed), a.jobs, a.executor, dry_run, extra)
        return subprocess.run(cmd).returncode


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="tskd_benchmark", description=__doc__.split("\n\n")[0],
                                epilog="Layout, resumption and decisions: documentation/benchmarking.md")
    p.add_argument("config", help="benchmark config (JSON), e.g. benchmarks/configs/hc18_cpu.json")
    p.add_argument("--profile", default="cpu", help="cpu (short TSKD_SCHEDULE, -device cpu) or gpu (nnU-Net's full "
                                                    "schedule, -device cuda), or one defined in the config")
    p.add_argument("--workdir", default=None, help="where runs, logs and the report go (default benchmark_work/<name>_<profile>)")
    p.add_argument("--only", nargs="+", default=None, metavar="METHOD",
                   help="run only these methods (and the methods they need)")
    p.add_argument("--budgets", nargs="+", default=None, metavar="BUDGET",
                   help="run only these budgets of the config (e.g. 10 all)")
    p.add_argument("--committed", default=None, metavar="DIR",
                   help="committed results folder (overrides the config's \"committed\"): finished runs are written "
                        "there and a run found there is done, on any machine; the report is rebuilt there from it")
    p.add_argument("--no-committed", action="store_true", help="ignore the config's \"committed\" folder")
    p.add_argument("--dry-run", action="store_true", help="print the planned stages and runs with their status and "
                                                          "commands, and the jobs Snakemake would run; run nothing")
    p.add_argument("--report-only", action="store_true", help="write the report from what is finished; run nothing")
    p.add_argument("--skip-failed", action="store_true", help="do not retry runs that failed before")
    p.add_argument("--park", action="store_true",
                   help="copy the latest checkpoint of every unfinished training into the committed folder's partial/ "
                        "(commit it; a later run on any machine continues from it); runs nothing")
    p.add_argument("--jobs", type=int, default=1, help="jobs at once (locally) or submitted at once (--executor); "
                                                       "default 1")
    p.add_argument("--executor", default=None, help="a Snakemake executor plugin, e.g. slurm "
                                                    "(documentation/benchmarking.md, \"Engine: Snakemake\")")
    p.add_argument("--engine", choices=("snakemake",), default="snakemake",
                   help="the only engine since issue #29; accepted so that older command lines keep working")
    a, extra = p.parse_known_args(argv)
    try:
        cfg = load_config(a.config)
        if a.only:
            bad = [m for m in a.only if m not in cfg.method_defs]
            if bad:
                raise BenchmarkConfigError(f"--only {bad}: unknown method(s); known: {sorted(cfg.method_defs)}")
        budgets = parse_budgets(a.budgets, cfg)
        workdir = a.workdir or os.path.join("benchmark_work", f"{cfg.name}_{a.profile}")
        runner = BenchmarkRunner(cfg, a.profile, workdir,
                                 committed=committed_root(cfg, a.profile, a.committed, a.no_committed))
        if a.dry_run:
            print(runner.describe(a.only, budgets), flush=True)
            return _snakemake(runner, a, budgets, extra, dry_run=True)
        if a.park:  # beside a running training: reads its checkpoint_latest, which nnU-Net replaces atomically
            print(f"parked {park(runner, a.only, budgets)} unfinished run(s)")
            return 0
        if a.report_only:
            print(f"Report: {write_benchmark_report(runner)}")
            return 0
        if "--unlock" in extra:  # after a kill: Snakemake's own lock, removed by Snakemake
            return _snakemake(runner, a, budgets, extra)
        _snakemake(runner, a, budgets, extra)
        counts = {"done": 0, "failed": 0, "not run": 0}  # not run: never started, or stopped (killed, locked)
        for b, f, m in runner.matrix(a.only, budgets):
            status = runner.run_status(b, m, f)
            counts["done" if status in ("done", "committed") else "failed" if status == "failed" else "not run"] += 1
        report = write_benchmark_report(runner)
    except (BenchmarkError, BenchmarkConfigError) as e:
        print(f"tskd_benchmark: error: {e}", file=sys.stderr)
        return 2
    print(f"\n{counts['done']} runs done, {counts['failed']} failed, {counts['not run']} not run. Report: {report}")
    return 1 if counts["failed"] or counts["not run"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
