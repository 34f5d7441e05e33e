"""Config -> Snakemake rules: the jobs of one benchmark, the file each leaves when done, what each needs first,
and the exact commands it stands for. The Snakefile beside this module makes rules of them; each rule runs one
step (tskd_nnunet.benchmark.step → actions.py), and the jobs' commands are the plan's (``BenchmarkRunner``, whose
``describe()`` is what ``--dry-run`` prints; tests/test_benchmark_workflow.py holds them equal for the real configs).

Done is a file: a run found in the committed folder has its committed ``settings.json`` as its output and needs
nothing, so Snakemake sees it done on any machine; its settings must match the config (the runner's identity
check) or planning stops naming the folder to delete. Layout and decisions: documentation/benchmarking.md.
"""
from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from tskd_nnunet.atomic_io import atomic_write_json
from tskd_nnunet.benchmark.config import ALL, DATA_SCOPES, Budget, load_config
from tskd_nnunet.benchmark.commands import fill_cmd
from tskd_nnunet.benchmark.runner import BenchmarkRunner, committed_root, parse_budgets

# the Snakemake rules, in the order a run passes them
RULES = ("convert", "plan", "budget", "labeled_only", "stage", "train", "predict", "evaluate", "measure", "commit")
WILDCARDS = {"budget": rf"\d+|{ALL}", "fold": r"\d+", "method": r"[A-Za-z0-9_.\-]+?", "stage": r"[A-Za-z0-9_.\-]+",
             "scope": "|".join(DATA_SCOPES)}


@dataclass(frozen=True)
class Job:
    rule: str
    key: Tuple[Any, ...]                      # (budget, method, fold), (stage, fold), (budget, scope), ...
    output: str
    inputs: Tuple[str, ...]
    commands: Tuple[Tuple[str, ...], ...] = ()  # what the job runs underneath (shown by --dry-run)
    resources: Dict[str, int] = field(default_factory=dict)
    threads: int = 1


class BenchmarkWorkflow:
    """The jobs of one config, profile and work directory (``only`` / ``budgets`` restrict the matrix)."""

    def __init__(self, runner: BenchmarkRunner, only: Optional[Sequence[str]] = None,
                 budgets: Optional[Sequence[Budget]] = None):
        self.r = runner
        self.matrix = runner.matrix(only, budgets)
        for b, f, m in self.matrix:  # identity check up front: a committed run made otherwise stops the plan
            runner.committed_settings(b, m, f)

    # ------------------------------------------------------------- the file each job leaves when done
    def path(self, rule: str, *key: Any) -> str:
        r, w = self.r, self.r.workdir
        if rule == "convert":
            return os.path.join(w, "stages", "convert.json")
        if rule == "plan":
            return os.path.join(w, "stages", "plan_and_preprocess.json")
        if rule == "budget":
            return os.path.join(os.path.dirname(r.budget_root(*key)), "root.json")
        if rule == "labeled_only":
            return os.path.join(r.labeled_only_base(*key), "state.json")
        if rule == "stage":
            return os.path.join(r.stage_dir(*key), "done.json")
        b, m, f = key
        if rule == "commit" and r.store is not None:
            return os.path.join(r.store.run_dir(m, b, f), "settings.json")
        names = {"train": "trained.json", "predict": "predictions", "evaluate": "scores.csv",
                 "measure": "measure.json", "commit": "done.json"}
        return os.path.join(r.run_dir(b, m, f), names[rule])

    def pattern(self, rule: str) -> str:
        """The rule's output with Snakemake wildcards, e.g. ``.../runs/b{budget}/{method}/fold_{fold}/trained.json``."""
        keys = {"budget": ("{budget}", "{scope}"), "labeled_only": ("{budget}", "{fold}"),
                "stage": ("{stage}", "{fold}")}.get(rule, ("{budget}", "{method}", "{fold}"))
        return self.path(rule, *keys) if rule not in ("convert", "plan") else self.path(rule)

    # ------------------------------------------------------------- what each job needs first
    def budget_of(self, text: str) -> Budget:
        return next(b for b in self.r.cfg.budgets if str(b) == str(text))

    def stages_of(self, method: str) -> List[str]:
        """The method's per-fold stages and theirs, dependencies first."""
        out: List[str] = []

        def visit(s: str) -> None:
            for dep in self.r.cfg.stage_defs[s].get("stages", []):
                visit(dep)
            if s not in out and self.r.stage_needed(s):
                out.append(s)

        for s in self.r.cfg.method_defs[method].get("stages", []):
            visit(s)
        return out

    def inputs(self, rule: str, *key: Any) -> List[str]:
        cfg = self.r.cfg
        if rule == "convert":
            return []
        if rule == "plan":
            return [self.path("convert")] if cfg.convert is not None else []
        if rule in ("budget", "labeled_only"):
            return [self.path("plan")]
        if rule == "stage":
            stage, fold = key
            return [self.path("plan")] + [self.path("stage", s, fold) for s in cfg.stage_defs[stage].get("stages", [])
                                          if self.r.stage_needed(s)]
        b, m, f = key
        b = self.budget_of(b)
        f = int(f)
        if rule == "commit" and self.r.store is not None and self.r.committed_settings(b, m, f) is not None:
            return []  # committed: done, whatever this work directory holds
        spec = cfg.method_defs[m]
        if rule == "train":
            root = (self.path("labeled_only", b, f) if spec.get("plan_on") == "labeled"
                    else self.path("budget", b, spec.get("data", "labeled")))
            # a needed run (the teacher) finished and committed first, as in the runner's order, and its model here
            return ([self.path("plan"), root] + [self.path("stage", s, f) for s in self.stages_of(m)]
                    + [self.path(x, b, dep, f) for dep in spec.get("needs", []) for x in ("commit", "train")])
        before = {"predict": ["train"], "evaluate": ["predict"], "measure": ["train"],
                  "commit": ["train", "evaluate", "measure"]}[rule]
        return [self.path(x, b, m, f) for x in before]

    # ------------------------------------------------------------- the jobs and what they run
    def step(self, rule: str, *key: Any) -> List[str]:
        """The command of one job: ``python -m tskd_nnunet.benchmark.step RULE KEY ... --config ...``."""
        r = self.r
        where = ["--committed", r.store.root] if r.store is not None else ["--no-committed"]
        # the key right after the rule: argparse takes no positionals after the options
        return [sys.executable, "-m", "tskd_nnunet.benchmark.step", rule, *[str(k) for k in key], "--config",
                r.cfg.path, "--profile", r.profile_name, "--workdir", r.workdir, *where]

    def shell(self, rule: str, *key: Any) -> str:
        return shlex.join(self.step(rule, *key))

    def resources(self, rule: str) -> Dict[str, int]:
        """Per job: memory and GPUs (on a cuda profile a job that runs a network takes one); a profile's
        ``"resources": {RULE: {...}}`` overrides them."""
        gpu = int(self.r.device.startswith("cuda") and rule in ("stage", "train", "predict", "measure"))
        res = {"mem_mb": 8000 if rule in ("stage", "train") else 4000, "gpu": gpu}
        return {**res, **{k: v for k, v in self.r.profile.get("resources", {}).get(rule, {}).items() if k != "threads"}}

    def threads(self, rule: str) -> int:
        return int(self.r.profile.get("resources", {}).get(rule, {}).get("threads", 1))

    def jobs(self) -> List[Job]:
        """Every job of the matrix, done or not, in run order: convert, plan, stages, then run by run."""
        r, cfg = self.r, self.r.cfg
        out: List[Job] = []

        def add(rule: str, *key: Any, commands: Sequence[Sequence[str]] = ()) -> None:
            if not any(j.rule == rule and j.key == key for j in out):
                out.append(Job(rule, key, self.path(rule, *key), tuple(self.inputs(rule, *key)),
                               tuple(tuple(c) for c in commands), self.resources(rule), self.threads(rule)))

        if cfg.convert is not None:
            add("convert", commands=[fill_cmd(cfg.convert, r.fields(), "convert")])
        add("plan", commands=r.plan_commands(r.fields()))
        stages = list(dict.fromkeys(s for _, _, m in self.matrix for s in self.stages_of(m)))
        for st in stages:
            for f in cfg.folds:
                add("stage", st, f, commands=r.stage_commands(st, f))
        for b, f, m in self.matrix:
            spec = cfg.method_defs[m]
            if spec.get("plan_on") == "labeled":
                add("labeled_only", b, f)
            else:
                add("budget", b, spec.get("data", "labeled"))
            add("train", b, m, f, commands=[r.train_command(b, m, f)])
            for rule in ("predict", "evaluate", "measure", "commit"):
                add(rule, b, m, f)
        return out

    def targets(self, skip_failed: bool = False) -> List[str]:
        """What ``tskd_benchmark`` asks Snakemake for: every run's commit (``--skip-failed``: not the failed ones)."""
        return [self.path("commit", b, m, f) for b, f, m in self.matrix
                if not (skip_failed and self.r.run_status(b, m, f) == "failed")]


def workflow_from_config(config: Dict[str, Any]) -> BenchmarkWorkflow:
    """The workflow of Snakemake's ``config``: ``config`` (the benchmark config file), ``profile``, ``workdir``,
    ``committed`` (a folder) or ``no_committed``, ``only`` and ``budgets`` (lists), as tskd_benchmark's options."""
    cfg = load_config(config["config"])
    profile = str(config.get("profile", "cpu"))
    workdir = config.get("workdir") or os.path.join("benchmark_work", f"{cfg.name}_{profile}")
    runner = BenchmarkRunner(cfg, profile, workdir, committed=committed_root(cfg, profile, config.get("committed"),
                                                                             bool(config.get("no_committed"))))
    return BenchmarkWorkflow(runner, config.get("only") or None, parse_budgets(config.get("budgets"), cfg))


SNAKEFILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "Snakefile")


def snakemake_command(config: Dict[str, Any], metadir: str, targets: Sequence[str] = (), jobs: int = 1,
                      executor: Optional[str] = None, dry_run: bool = False, extra: Sequence[str] = ()) -> List[str]:
    """The ``snakemake`` command of one tskd_benchmark call. ``config`` goes into ``METADIR/tskd_benchmark.json``
    (Snakemake's metadata and lock live in METADIR: the work directory, or a scratch folder for a dry run). Locally
    ``jobs`` jobs run at once (default one); with an executor (e.g. slurm) at most ``jobs`` are submitted at once.
    ``--keep-going``: a failed run does not stop the others (today's runner goes on too); ``--rerun-incomplete``:
    a killed job starts again and nnU-Net continues from its checkpoint; ``mtime`` alone triggers reruns, so a
    fresh clone (no metadata) trusts the committed files."""
    os.makedirs(metadir, exist_ok=True)
    cfg_file = os.path.join(metadir, "tskd_benchmark.json")
    atomic_write_json(cfg_file, config)
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", SNAKEFILE, "--directory", metadir, "--configfile",
           cfg_file, "--keep-going", "--rerun-incomplete", "--rerun-triggers", "mtime", "--printshellcmds"]
    cmd += (["--executor", executor, "--jobs", str(jobs)] if executor else ["--cores", str(jobs)])
    return cmd + (["--dry-run"] if dry_run else []) + list(extra) + list(targets)


def jobs_of_dry_run(output: str) -> List[Tuple[str, Dict[str, str]]]:
    """(rule, wildcards) of every job in the output of ``snakemake --dry-run`` (rules without wildcards: {})."""
    jobs: List[Tuple[str, Dict[str, str]]] = []
    for line in output.splitlines():
        words = line.strip().split(" ", 1)
        if words[0] in ("rule", "localrule") and len(words) == 2 and words[1].endswith(":"):
            jobs.append((words[1][:-1], {}))
        elif jobs and line.strip().startswith("wildcards: "):
            jobs[-1][1].update(kv.split("=", 1) for kv in line.strip()[len("wildcards: "):].split(", "))
    return jobs
