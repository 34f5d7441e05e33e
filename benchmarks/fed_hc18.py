"""HC18 split into 3 hospitals by patient: local-only, federated and centralised LoRA teachers, and each site's
distilled student vs plain nnU-Net on its own labels (issue #30, documentation/federated.md "Measured on HC18").

    python benchmarks/fed_hc18.py prepare      # convert, split into sites, site nnU-Net folders
    python benchmarks/fed_hc18.py federate     # tskd_fed_server + 3 tskd_fed_client on 127.0.0.1 (real Flower);
                                               # with a committed global teacher: restore it at each site instead
    python benchmarks/fed_hc18.py train ARM    # central_teacher | local_teacher_K | student_K | plain_K
    python benchmarks/fed_hc18.py evaluate ARM # nnUNetv2_predict on the held-out test set, Dice/NSD/HD95 -> committed
    python benchmarks/fed_hc18.py pack         # the global teacher (fp16 trainable weights) -> committed
    python benchmarks/fed_hc18.py report       # tables (Dice per site, bytes per round) from the committed files
    python benchmarks/fed_hc18.py all          # every missing step in this order

Every step is an nnU-Net or tskd command in its own process with the site's nnUNet_raw/preprocessed/results;
a step whose output exists is skipped, so the script resumes after a stop. Results (per-case scores, the sites'
case lists, the federation's log and round record) go to ``--committed`` as each arm finishes.
Schedule: the benchmark's ``cpu_short`` profile (20 epochs x 15 iterations, 4 validation batches, batch 8, 2d_128);
the federation runs it as 4 rounds x 5 local epochs. Why: documentation/federated.md.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from tskd_nnunet.atomic_io import atomic_write_json, atomic_write_text, read_json  # noqa: E402
from tskd_nnunet.benchmark.config import METHODS, PROFILES  # noqa: E402
from tskd_nnunet.data.preprocessed_files import POOL_FILE  # noqa: E402
from tskd_nnunet.data.splits import write_splits  # noqa: E402

DATASET_ID, NAME = 501, "Dataset501_HC18"
CONFIGURATION, PLANS, BATCH, SIZE = "2d_128", "nnUNetPlans", 8, 128
PROFILE = PROFILES["cpu_short"]
SCHEDULE = PROFILE["schedule"]                        # "20,15,4"
ROUNDS, LOCAL_EPOCHS = 4, 5                           # 4 x 5 = the profile's 20 epochs
TEACHER = PROFILE["params"]["teacher_trainer"]        # LiteMedSAMTeacherTrainer_last
STUDENT = PROFILE["params"]["student_trainer"]        # DistillTrainer (the cpu_short student)
PLAIN = METHODS["nnUNetTrainer"]["trainer"]           # TSKDPlainTrainer
SITES = ["site_a", "site_b", "site_c"]
LABELED_PER_SITE, VAL_FRACTION, SEED = 10, 0.2, 0
BIN = Path(sys.executable).parent
DATA = REPO.parent / "shared" / "datasets" / "hc18_fetal_head_us"


class Study:
    def __init__(self, work: Path, committed: Path, device: str):
        self.work, self.committed, self.device = work, committed, device
        self.converted = work / "converted"

    # ------------------------------------------------------------------------------------------- folders
    def site_root(self, site: str) -> Path:
        return self.work / site

    def env(self, raw: Path, pp: Path, results: Path, **extra: str) -> Dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TSKD_")}
        env.update(PROFILE["env"], nnUNet_raw=str(raw), nnUNet_preprocessed=str(pp), nnUNet_results=str(results),
                   TSKD_SCHEDULE=SCHEDULE, **extra)
        return env

    def site_env(self, site: str, results: str = "nnUNet_results", **extra: str) -> Dict[str, str]:
        r = self.site_root(site)
        return self.env(r / "nnUNet_raw", r / "nnUNet_preprocessed", r / results, **extra)

    def arm_env(self, arm: str) -> Dict[str, str]:
        """Where arm ARM's model lives: the central root, a site's local-teacher results, or the site's own."""
        if arm == "central_teacher":
            c = self.work / "central"
            return self.env(c / "nnUNet_raw", c / "nnUNet_preprocessed", c / "nnUNet_results")
        kind, site = arm.rsplit("_", 1)
        site = f"site_{site}"
        if kind == "local_teacher":
            return self.site_env(site, "nnUNet_results_local")
        if kind == "student":
            return self.site_env(site, TSKD_TEACHER_TRAINER=TEACHER)
        return self.site_env(site)  # plain_K, fed_teacher_K

    @staticmethod
    def arm_trainer(arm: str) -> str:
        kind = arm.rsplit("_", 1)[0]
        return {"central": TEACHER, "local_teacher": TEACHER, "fed_teacher": TEACHER,
                "student": STUDENT, "plain": PLAIN}[kind]

    def model_folder(self, arm: str) -> Path:
        return (Path(self.arm_env(arm)["nnUNet_results"]) / NAME / f"{self.arm_trainer(arm)}__{PLANS}__{CONFIGURATION}"
                / "fold_0")

    # ------------------------------------------------------------------------------------------- prepare
    def prepare(self) -> None:
        raw = self.converted / NAME
        if not (raw / "dataset.json").is_file():
            run([sys.executable, "-m", "dataset_conversion.Dataset501_HC18", "--input", str(DATA),
                 "--test-fraction", "0.2", "--seed", "0", "--output-root", str(self.converted)],
                os.environ.copy(), self.work / "logs" / "convert.log")
        sites = self.split_sites(raw)
        for site in SITES:
            self.make_site(site, raw, sites[site])
        say(f"sites: " + ", ".join(f"{s} {len(c['labeled'])} labeled + {len(c['val'])} val + {len(c['pool'])} pool"
                                   for s, c in sites.items()))

    def split_sites(self, raw: Path) -> Dict[str, Dict[str, List[str]]]:
        """Training patients dealt to 3 sites (HC18 here: one image per exam, so a case is a patient); per site
        10 labeled, 20 % validation (labels used only for nnU-Net's pseudo-Dice), the rest unlabeled pool."""
        path = self.committed / "sites.json"
        sites = read_json(str(path), default=None)
        if sites is not None:
            return sites
        cases = sorted(p.name[:-len("_0000.nii.gz")] for p in (raw / "imagesTr").glob("*_0000.nii.gz"))
        rng = random.Random(SEED)
        rng.shuffle(cases)
        sites = {}
        for i, site in enumerate(SITES):
            own = cases[i::len(SITES)]
            n_val = round(VAL_FRACTION * len(own))
            sites[site] = {"labeled": sorted(own[n_val:n_val + LABELED_PER_SITE]), "val": sorted(own[:n_val]),
                           "pool": sorted(own[n_val + LABELED_PER_SITE:])}
        self.committed.mkdir(parents=True, exist_ok=True)
        atomic_write_json(str(path), sites)
        return sites

    def make_site(self, site: str, raw: Path, cases: Dict[str, List[str]]) -> None:
        """The site's nnUNet_raw (its own cases only, linked), and its split + pool beside the preprocessed data
        that the federation's planning writes."""
        root = self.site_root(site)
        dst = root / "nnUNet_raw" / NAME
        own = cases["labeled"] + cases["val"] + cases["pool"]
        for sub, suffix in (("imagesTr", "_0000.nii.gz"), ("labelsTr", ".nii.gz")):
            (dst / sub).mkdir(parents=True, exist_ok=True)
            for c in own:
                link = dst / sub / (c + suffix)
                if not link.exists():
                    link.symlink_to(raw / sub / (c + suffix))
        dj = json.loads((raw / "dataset.json").read_text())
        dj["numTraining"] = len(own)
        atomic_write_text(str(dst / "dataset.json"), json.dumps(dj, indent=2))
        pp = root / "nnUNet_preprocessed" / NAME
        pp.mkdir(parents=True, exist_ok=True)
        write_splits(str(pp), [{"train": cases["labeled"], "val": cases["val"]}])
        atomic_write_json(str(pp / POOL_FILE), [cases["pool"]])
        for d in ("nnUNet_results", "nnUNet_results_local"):
            (root / d).mkdir(exist_ok=True)

    # ------------------------------------------------------------------------------------------ federate
    def federate(self) -> None:
        fed = self.work / "fed"
        if all((self.model_folder(f"fed_teacher_{s[-1]}") / "federated.json").is_file() for s in SITES):
            say("federation: done")
            return
        if (self.committed / "federation" / "model.json").is_file():
            self.restore()
            return
        fed.mkdir(parents=True, exist_ok=True)
        port = 19092
        server_cmd = [str(BIN / "tskd_fed_server"), "-d", str(DATASET_ID), "-c", CONFIGURATION, "--plan-cpu",
                      str(SIZE), str(BATCH), "-tr", TEACHER, "--rounds", str(ROUNDS), "--local-epochs",
                      str(LOCAL_EPOCHS), "--num-sites", str(len(SITES)), "--min-sites", str(len(SITES)),
                      "--work-dir", str(fed / "server"), "--address", "127.0.0.1", "--fleet-port", str(port),
                      "--control-port", str(port + 1), "--serverappio-port", str(port - 1), "--insecure"]
        procs = [start(server_cmd, os.environ.copy(), fed / "server.out")]
        try:
            time.sleep(5)
            for i, site in enumerate(SITES):
                # three sites share two cores: one thread each, so that no site starves the others
                env = self.site_env(site, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
                procs.append(start([str(BIN / "tskd_fed_client"), "-d", str(DATASET_ID), "--site", site,
                                    "--superlink", f"127.0.0.1:{port}", "--insecure", "-device", self.device,
                                    "--work-dir", str(fed / site), "--clientappio-port", str(port + 10 + i)],
                                   env, fed / f"{site}.out"))
            codes = [p.wait() for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGTERM)
        if any(codes):
            raise SystemExit(f"federation failed (exit codes {codes}); see {fed}/*.out and {fed}/server/server.log")
        out = self.committed / "federation"
        out.mkdir(parents=True, exist_ok=True)
        for name in ("server.log", "federation.json"):
            shutil.copy(fed / "server" / name, out / name)
        for site in SITES:
            shutil.copy(self.model_folder(f"fed_teacher_{site[-1]}") / "federated.json", out / f"{site}_federated.json")
        self.pack_global_teacher()
        say("federation: done")

    def pack_global_teacher(self) -> dict:
        """The global teacher's weights (fp16, trainable part only: a few MB) into the committed folder, so that a
        later session on a new machine can distil the remaining students without federating again."""
        from tskd_nnunet.benchmark.committed_model import pack_model

        record = pack_model(str(self.model_folder("fed_teacher_a").parent), 0, str(self.committed / "federation"))
        atomic_write_json(str(self.committed / "federation" / "model.json"), record)
        return record

    def restore(self) -> None:
        """A new machine: every site plans and preprocesses with the committed federated plans (nnU-Net's own
        preprocessing), and the committed global teacher (fp16 trainable weights, restored as fp32) becomes each
        site's fed_teacher model folder with the site's federation record, as the federation left them."""
        from tskd_nnunet.benchmark.committed_model import restore_model

        fed = self.committed / "federation"
        plans = read_json(str(fed / "model" / "plans.json"))
        for key in ("tskd_teacher", "tskd_settings"):  # what the teacher trainer adds to its model folder's copy
            plans.pop(key, None)
        settings = {"model": read_json(str(fed / "model.json"))}
        for site in SITES:
            pp = self.site_root(site) / "nnUNet_preprocessed" / NAME
            if not (pp / plans["configurations"][CONFIGURATION]["data_identifier"]).is_dir():
                atomic_write_json(str(pp / f"{PLANS}.json"), plans)
                shutil.copy(fed / "model" / "dataset_fingerprint.json", pp / "dataset_fingerprint.json")
                shutil.copy(self.site_root(site) / "nnUNet_raw" / NAME / "dataset.json", pp / "dataset.json")
                env = self.site_env(site)
                env.pop("nnUNet_n_proc_DA")  # training only: nnU-Net's preprocessing breaks with it
                run([str(BIN / "nnUNetv2_preprocess"), "-d", str(DATASET_ID), "-c", CONFIGURATION, "-plans_name",
                     PLANS, "-np", "2"], env, self.work / "logs" / f"preprocess_{site}.log")
            fold = self.model_folder(f"fed_teacher_{site[-1]}")
            restore_model(str(fed), settings, str(fold.parent), 0)
            shutil.copy(fed / f"{site}_federated.json", fold / "federated.json")
            say(f"{site}: preprocessed with the federated plans, global teacher restored from {fed / 'model'}")

    # ------------------------------------------------------------------------------------------ train
    def make_central(self) -> None:
        """The ceiling: the three sites' preprocessed cases pooled (they share one plans file), 30 labeled."""
        c = self.work / "central"
        pp, src = c / "nnUNet_preprocessed" / NAME, self.site_root(SITES[0]) / "nnUNet_preprocessed" / NAME
        if (pp / "splits_final.json").is_file():
            return
        plans = json.loads((src / f"{PLANS}.json").read_text())
        ident = plans["configurations"][CONFIGURATION]["data_identifier"]
        (pp / ident).mkdir(parents=True, exist_ok=True)
        for f in (f"{PLANS}.json", "dataset.json", "dataset_fingerprint.json"):
            shutil.copy(src / f, pp / f)
        sites = read_json(str(self.committed / "sites.json"))
        for site in SITES:
            for sub in (ident, "gt_segmentations"):  # gt_segmentations: nnU-Net's final validation reads it
                (pp / sub).mkdir(exist_ok=True)
                for f in (self.site_root(site) / "nnUNet_preprocessed" / NAME / sub).iterdir():
                    if not (pp / sub / f.name).exists():
                        (pp / sub / f.name).symlink_to(f)
        raw = c / "nnUNet_raw" / NAME
        raw.mkdir(parents=True, exist_ok=True)
        shutil.copy(self.converted / NAME / "dataset.json", raw / "dataset.json")
        (c / "nnUNet_results").mkdir(exist_ok=True)
        write_splits(str(pp), [{"train": sorted(sum((sites[s]["labeled"] for s in SITES), [])),
                                "val": sorted(sum((sites[s]["val"] for s in SITES), []))}])

    def train(self, arm: str) -> None:
        if (self.model_folder(arm) / "checkpoint_final.pth").is_file():
            say(f"{arm}: trained")
            return
        if arm == "central_teacher":
            self.make_central()
        if arm.startswith("student_") and not (self.model_folder(f"fed_teacher_{arm[-1]}") / "federated.json").is_file():
            raise SystemExit(f"{arm} distils the federated teacher: run `fed_hc18.py federate` first")
        cmd = [str(BIN / "nnUNetv2_train"), str(DATASET_ID), CONFIGURATION, "0", "-tr", self.arm_trainer(arm),
               "-p", PLANS, "-device", self.device]
        run(cmd, self.arm_env(arm), self.work / "logs" / f"train_{arm}.log")
        say(f"{arm}: trained")

    # ------------------------------------------------------------------------------------------ evaluate
    def evaluate(self, arm: str) -> None:
        from tskd_nnunet.evaluation.clinical import evaluate_test_folder

        out = self.committed / "scores" / f"{arm}.csv"
        if out.is_file():
            say(f"{arm}: evaluated")
            return
        raw = self.converted / NAME
        pred = self.work / "predictions" / arm
        if not (pred / "done").is_file():
            shutil.rmtree(pred, ignore_errors=True)
            run([str(BIN / "nnUNetv2_predict"), "-i", str(raw / "imagesTs"), "-o", str(pred), "-d", str(DATASET_ID),
                 "-c", CONFIGURATION, "-p", PLANS, "-tr", self.arm_trainer(arm), "-f", "0", "-device", self.device,
                 "-npp", "1", "-nps", "1", "--disable_progress_bar"], self.arm_env(arm),
                self.work / "logs" / f"predict_{arm}.log")
            (pred / "done").write_text("")
        df = evaluate_test_folder(raw / "labelsTs", pred, raw / "dataset.json", 2.0, DATA / "pixel_size_and_HC.csv")
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(str(out), df.to_csv(index=False))
        say(f"{arm}: Dice {df['dice'].mean():.4f} over {df['case'].nunique()} test cases")

    # ------------------------------------------------------------------------------------------ report
    def bytes_per_round(self) -> Dict[str, float]:
        """What one site sends in one round (its trainable tensors, as Flower's ArrayRecord carries them) and what
        a FedAvg of a full nnU-Net would send (every tensor of the plain student's network). The server sends the
        same amount back to each site (the global weights)."""
        import torch
        from flwr.app import ArrayRecord

        def record_bytes(state: Dict[str, "torch.Tensor"]) -> int:
            return sum(len(arr.data) for arr in ArrayRecord(state).values())

        sent = self.model_folder("fed_teacher_a") / "federated_sent" / "round_0001.pt"
        teacher = torch.load(sent, map_location="cpu", weights_only=True)
        out = {"teacher_tensors": len(teacher), "teacher_params": sum(int(v.numel()) for v in teacher.values()),
               "teacher_bytes": record_bytes(teacher)}
        plain = self.model_folder("plain_a") / "checkpoint_final.pth"
        if plain.is_file():
            loaded = torch.load(plain, map_location="cpu", weights_only=False)["network_weights"]
            # nnU-Net's decoder holds the encoder, so its state dict names every encoder tensor twice (the file
            # stores them once): a FedAvg sends each tensor once
            net, seen = {}, set()
            for k, v in loaded.items():
                if v.untyped_storage().data_ptr() not in seen:
                    seen.add(v.untyped_storage().data_ptr())
                    net[k] = v
            out.update(nnunet_tensors=len(net), nnunet_params=sum(int(v.numel()) for v in net.values()),
                       nnunet_bytes=record_bytes(dict(net)))
        return out

    KINDS = {"local_teacher": "local teacher", "fed_teacher": "federated teacher",
             "central_teacher": "centralised teacher", "student": "student", "plain": "plain nnU-Net"}
    COLUMNS = {"local_teacher": "local teacher (10)", "fed_teacher": "federated teacher (30)",
               "central_teacher": "centralised teacher (30)", "student": "student of the federated teacher",
               "plain": "plain nnU-Net (10)"}  # the Dice table's headers
    # the study's questions, per site on the same test cases: (model, minus model, what the difference measures)
    CONTRASTS = [("federated teacher", "local teacher", "federation"),
                 ("centralised teacher", "federated teacher", "pooling the images"),
                 ("student", "plain nnU-Net", "distillation")]

    @staticmethod
    def site_arm(kind: str, site: str) -> str:
        """The arm that answers for SITE: the federated and centralised teachers are one model for every site."""
        return {"fed_teacher": "fed_teacher_a", "central_teacher": "central_teacher"}.get(kind, f"{kind}_{site[-1]}")

    def case_table(self, scores: Dict[str, "pd.DataFrame"]) -> "pd.DataFrame":
        """Per-case scores in the benchmark report's layout: a site is a dataset, the arms of its column are
        methods (the federated and centralised teachers stand in every site's column)."""
        import pandas as pd

        parts = []
        for site in SITES:
            for kind, label in self.KINDS.items():
                arm = self.site_arm(kind, site)
                if arm in scores:
                    per_case = scores[arm].groupby("case")[["dice", "nsd", "hd95"]].mean().reset_index()
                    parts.append(per_case.assign(dataset=site, budget="10 own", method=label))
        cols = ["dataset", "budget", "method", "case", "dice", "nsd", "hd95"]
        return pd.concat(parts, ignore_index=True)[cols] if parts else pd.DataFrame(columns=cols)

    def paired_lines(self, cv: "pd.DataFrame") -> List[str]:
        """The contrasts (mean paired difference, 95 % bootstrap CI, Wilcoxon) with the benchmark report's
        paired_contrasts; the two pooled teachers are the same models at every site, so that row is given once."""
        from tskd_nnunet.benchmark.report import paired_contrasts

        pc = paired_contrasts(cv, self.CONTRASTS, metrics=("dice",))
        pc = pc[(pc["what"] != "pooling the images") | (pc["dataset"] == SITES[0])]
        if pc.empty:
            return []
        out = ["", "Paired on the test cases (Dice of the model minus the other; 95 % bootstrap CI of the mean "
                   "difference; two-sided Wilcoxon signed-rank):", "",
               "| site | model | minus | what it measures | cases | mean difference (95 % CI) | Wilcoxon p |",
               "|---|---|---|---|---|---|---|"]
        for r in pc.itertuples():
            site = "all (same models)" if r.what == "pooling the images" else r.dataset
            out.append(f"| {site} | {r.method} | {r.minus} | {r.what} | {r.n_pairs} | {r.mean_diff:+.4f} "
                       f"({r.ci_lo:+.4f}, {r.ci_hi:+.4f}) | {r.p_value:.2g} |")
        return out

    def plot(self, cv: "pd.DataFrame") -> None:
        """report.png: per-case test Dice of every model, one panel per site (the benchmark report's box plots)."""
        import pandas as pd

        from tskd_nnunet.benchmark.plots import plot_boxplots

        summary = pd.DataFrame([{"dataset": site, "budget": "10 own", "method": label,
                                 "status": "done" if ((cv["dataset"] == site) & (cv["method"] == label)).any()
                                 else "MISSING"} for site in SITES for label in self.KINDS.values()])
        plot_boxplots(cv, summary, self.committed / "report.png")

    def report(self) -> None:
        import pandas as pd

        scores = {p.stem: pd.read_csv(p) for p in sorted((self.committed / "scores").glob("*.csv"))}
        cv = self.case_table(scores)
        dice = cv.groupby(["dataset", "method"])["dice"].mean()
        rows = []
        for site in SITES:
            row = {"site": site}
            for kind, label in self.COLUMNS.items():
                key = (site, self.KINDS[kind])
                row[label] = f"{dice[key]:.4f}" if key in dice.index else "not run"
            rows.append(row)
        lines = ["# HC18 in 3 sites: test Dice (80 held-out cases, the same for every model)", "",
                 f"Made by `python benchmarks/fed_hc18.py report` ({time.strftime('%Y-%m-%d')}). Schedule: cpu_short "
                 f"({SCHEDULE}; the federation {ROUNDS} rounds x {LOCAL_EPOCHS} local epochs), {CONFIGURATION}, batch "
                 f"{BATCH}, device {self.device}. The federated teacher is one model, installed at every site.", ""]
        cols = list(rows[0])
        lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(r[c] for c in cols) + " |" for r in rows]
        lines += ["", "Mean ± sd over test cases (Dice, NSD at 2 mm, HD95 mm, |HC error| mm):", "",
                  "| model | Dice | NSD | HD95 (mm) | abs HC error (mm) |", "|---|---|---|---|---|"]
        for arm, df in scores.items():
            per_case = df.groupby("case")[["dice", "nsd", "hd95", "hc_abs_diff_mm"]].mean()
            lines.append(f"| {arm} | " + " | ".join(f"{per_case[m].mean():.3f} ± {per_case[m].std():.3f}"
                                                      for m in per_case.columns) + " |")
        lines += self.paired_lines(cv)
        if len(cv):
            self.plot(cv)
            lines += ["", "![per-case test Dice by site](report.png)"]
        b = self.bytes_per_round() if (self.model_folder("fed_teacher_a") / "federated_sent").is_dir() else {}
        if b:
            lines += ["", "## Bytes per round per site (each way: the site's update up, the global weights down)", "",
                      "| what travels | tensors | parameters | bytes per round, each way |", "|---|---|---|---|",
                      f"| LoRA teacher's trainable state (this federation) | {b['teacher_tensors']} | "
                      f"{b['teacher_params']:,} | {b['teacher_bytes']:,} ({b['teacher_bytes'] / 2**20:.1f} MiB) |"]
            if "nnunet_bytes" in b:
                lines.append(f"| full nnU-Net ({CONFIGURATION} plans, FedAvg of every weight) | {b['nnunet_tensors']} "
                             f"| {b['nnunet_params']:,} | {b['nnunet_bytes']:,} ({b['nnunet_bytes'] / 2**20:.1f} MiB) |")
                lines += ["", f"Ratio teacher / full nnU-Net: {b['teacher_bytes'] / b['nnunet_bytes']:.3f}. Over "
                              f"{ROUNDS} rounds a site sends {ROUNDS * b['teacher_bytes'] / 2**20:.1f} MiB (full "
                              f"nnU-Net: {ROUNDS * b['nnunet_bytes'] / 2**20:.1f} MiB)."]
            atomic_write_json(str(self.committed / "bytes.json"), b)
        atomic_write_text(str(self.committed / "report.md"), "\n".join(lines) + "\n")
        say(f"report: {self.committed / 'report.md'}")


ARMS = (["central_teacher"] + [f"local_teacher_{s[-1]}" for s in SITES] + [f"student_{s[-1]}" for s in SITES]
        + [f"plain_{s[-1]}" for s in SITES])


def say(text: str) -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}", flush=True)


def start(cmd: List[str], env: Dict[str, str], log: Path) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(cmd, env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT, cwd=str(REPO),
                            start_new_session=True)


def run(cmd: List[str], env: Dict[str, str], log: Path) -> None:
    say(f"{' '.join(cmd[:3])} ... (log {log})")
    p = start(cmd, env, log)
    if p.wait():
        raise SystemExit(f"{Path(cmd[0]).name} failed (exit {p.returncode}); see {log}")


def main(argv: List[str] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("step", choices=["prepare", "federate", "pack", "train", "evaluate", "report", "all"])
    p.add_argument("arm", nargs="?", help=f"for train/evaluate: one of {', '.join(ARMS)} (evaluate: also fed_teacher_K)")
    p.add_argument("--work", default=str(REPO.parent / "tskd_work" / "fed_hc18"))
    p.add_argument("--committed", default=str(REPO / "documentation" / "benchmarks" / "federated_hc18"))
    p.add_argument("-device", dest="device", default="cpu")
    a = p.parse_args(argv)
    s = Study(Path(a.work).resolve(), Path(a.committed).resolve(), a.device)
    if a.step in ("prepare", "all"):
        s.prepare()
    if a.step in ("federate", "all"):
        s.federate()
    if a.step == "pack":
        print(s.pack_global_teacher())
    if a.step == "train":
        s.train(a.arm)
    if a.step == "evaluate":
        s.evaluate(a.arm)
    if a.step == "all":
        s.evaluate("fed_teacher_a")
        for arm in [f"student_{x[-1]}" for x in SITES] + [f"plain_{x[-1]}" for x in SITES] + ["central_teacher"] + \
                [f"local_teacher_{x[-1]}" for x in SITES]:
            s.train(arm)
            s.evaluate(arm)
    if a.step in ("report", "all"):
        s.report()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
