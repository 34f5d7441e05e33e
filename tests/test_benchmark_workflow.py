"""The Snakemake jobs are the plan that ``--dry-run`` prints (issue #29): for both real configs, the same runs, stages
and commands as ``BenchmarkRunner.matrix()`` / ``describe()``, and every committed run is done (no job)."""
import os
import subprocess

import pytest

from conftest import REPO
from tskd_nnunet.benchmark.config import load_config
from tskd_nnunet.benchmark.runner import BenchmarkRunner, committed_root
from tskd_nnunet.benchmark.workflow import BenchmarkWorkflow, jobs_of_dry_run, snakemake_command

# every profile of the real configs that the committed results or the running benchmark use
REAL = [(name, profile) for name in ("hc18_cpu", "chaos_t2_cpu") for profile in ("cpu", "cpu_short", "cpu_cuda")]


def _runner(name: str, profile: str, workdir) -> BenchmarkRunner:
    cfg = load_config(os.path.join(REPO, "benchmarks", "configs", f"{name}.json"))
    return BenchmarkRunner(cfg, profile, str(workdir), committed=committed_root(cfg, profile, None, False))


def _described(runner: BenchmarkRunner):
    """(convert command, plan commands, {(stage, fold): [commands]}, [(budget, fold, method, status, command)])
    read back from the text --dry-run prints."""
    convert, plans, stages, runs = None, [], {}, []
    for line in runner.describe().splitlines():
        if line.startswith("convert: "):
            convert = line.split(": ", 2)[2]
        elif line.startswith("  $ "):
            plans.append(line[4:])
        elif line.startswith("stage "):
            head, _, cmd = line.partition(": ")
            _, st, _, fold = head.split()
            if not cmd.startswith("given weights"):
                stages.setdefault((st, int(fold)), []).append(cmd.split(": ", 1)[1])
        elif line.startswith("  budget "):
            words = line.split()
            status = line[line.index("[") + 1:line.index("]")]
            runs.append((words[1], int(words[3]), words[4], status, line.split(": ", 1)[1]))
    return convert, plans, stages, runs


@pytest.mark.parametrize("name,profile", REAL)
def test_workflow_jobs_are_the_dry_runs_runs_stages_and_commands(name, profile, tmp_path):
    runner = _runner(name, profile, tmp_path / "w")
    wf = BenchmarkWorkflow(runner)
    jobs = wf.jobs()
    convert, plans, stages, runs = _described(runner)
    by_rule = {}
    for j in jobs:
        by_rule.setdefault(j.rule, []).append(j)
    assert [" ".join(c) for j in by_rule["convert"] for c in j.commands] == [convert]
    assert [" ".join(c) for j in by_rule["plan"] for c in j.commands] == plans
    assert {j.key: [" ".join(c) for c in j.commands] for j in by_rule.get("stage", [])} == stages
    # the runs, in the plan's order, each with the nnUNetv2_train command --dry-run prints
    assert [(str(b), f, m) for b, f, m in runner.matrix()] == [(str(j.key[0]), j.key[2], j.key[1])
                                                               for j in by_rule["train"]]
    assert [(b, f, m) for b, f, m, _, _ in runs] == [(str(j.key[0]), j.key[2], j.key[1]) for j in by_rule["train"]]
    for (_, _, _, _, described), j in zip(runs, by_rule["train"]):
        assert described.endswith(" ".join(j.commands[0]))
    # every run passes train, predict, evaluate, measure and commit; nothing runs twice
    for rule in ("predict", "evaluate", "measure", "commit"):
        assert [j.key for j in by_rule[rule]] == [j.key for j in by_rule["train"]]
    assert len({j.output for j in jobs}) == len(jobs)
    # a committed run needs nothing: Snakemake sees its committed settings.json and has no job for it
    for b, f, m, status, _ in runs:
        commit = next(j for j in by_rule["commit"] if (str(j.key[0]), j.key[2], j.key[1]) == (b, f, m))
        assert (status == "committed") == (commit.inputs == () and os.path.isfile(commit.output))
    # every run committed in the repository is one of them (HC18 and CHAOS cpu_short: 9 or more each)
    in_store = {(str(s["budget"]), int(s["fold"]), s["method"]) for s in runner.store.done_runs()}
    assert {(b, f, m) for b, f, m, status, _ in runs if status == "committed"} == in_store
    assert len(in_store) >= 9 or profile != "cpu_short"


@pytest.mark.parametrize("name,profile", [("hc18_cpu", "cpu_short"), ("chaos_t2_cpu", "cpu_short"), ("hc18_cpu", "cpu")])
def test_snakemake_has_a_job_for_every_pending_run_and_none_for_a_committed_one(name, profile, tmp_path):
    """Snakemake's own dry run of the engine's Snakefile on an empty work directory (a fresh clone): the jobs still
    to do are exactly the runs the runner lists as not committed, their stages, and the committed teachers they
    need a model of; nothing is written into the work directory."""
    runner = _runner(name, profile, tmp_path / "w")
    wf = BenchmarkWorkflow(runner)
    config = {"config": runner.cfg.path, "profile": profile, "workdir": runner.workdir,
              "committed": runner.store.root, "no_committed": False}
    cmd = snakemake_command(config, str(tmp_path / "scratch"), wf.targets(), dry_run=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    jobs = jobs_of_dry_run(proc.stdout)
    keyed = {}
    for rule, w in jobs:
        keyed.setdefault(rule, set()).add((w["budget"], w["method"], int(w["fold"])) if "method" in w else
                                          (w["stage"], int(w["fold"])) if "stage" in w else tuple(w.values()))
    pending = {(str(b), m, f) for b, f, m in runner.matrix() if runner.run_status(b, m, f) != "committed"}
    committed = {(str(b), m, f) for b, f, m in runner.matrix()} - pending
    assert keyed.get("commit", set()) == pending == keyed.get("evaluate", set())
    needed = {(b, dep, f) for b, m, f in pending for dep in runner.cfg.method_defs[m].get("needs", [])}
    assert keyed.get("train", set()) == pending | (needed & committed)
    assert keyed.get("stage", set()) == {(s, f) for b, m, f in pending for s in wf.stages_of(m)}
    assert ("plan" in keyed) == bool(pending) and ("convert" in keyed) == bool(pending)
    if profile == "cpu_short":
        assert committed and len(keyed.get("commit", ())) < len(wf.matrix)
    assert not os.path.exists(runner.workdir)


def test_a_student_trained_longer_than_its_teacher_is_a_method_of_the_config(tmp_path):
    """A student trained longer than its teacher (once a script of its own): a method with its own schedule, beside
    the profile's teacher."""
    import json

    raw = json.loads(open(os.path.join(REPO, "benchmarks", "configs", "hc18_cpu.json")).read())
    raw["method_defs"] = {"tskd_long": {"trainer": "{params[student_trainer]}", "data": "pool", "needs": ["teacher"],
                                        "env": {"TSKD_TEACHER_TRAINER": "{params[teacher_trainer]}"},
                                        "schedule": "50,50,5"}}
    raw["profiles"]["cpu_short"] = {"methods": {"20": ["tskd_long"]}}
    path = tmp_path / "long.json"
    path.write_text(json.dumps(raw))
    cfg = load_config(str(path))
    runner = BenchmarkRunner(cfg, "cpu_short", str(tmp_path / "w"), committed=str(tmp_path / "c"))
    assert [m for _, _, m in runner.matrix()] == ["teacher", "tskd_long"]
    assert runner.identity(20, "teacher")["schedule"] == "20,15,4"  # the teacher stays the profile's run
    assert runner.identity(20, "tskd_long")["schedule"] == "50,50,5"
    assert runner.method_env(20, "tskd_long", 0)["TSKD_SCHEDULE"] == "50,50,5"
    assert runner.method_env(20, "teacher", 0)["TSKD_SCHEDULE"] == "20,15,4"
    assert "TSKD_SCHEDULE=50,50,5" in runner.describe()
    raw["method_defs"]["tskd_long"]["schedule"] = 50
    path.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="must be a TSKD_SCHEDULE string"):
        load_config(str(path))
