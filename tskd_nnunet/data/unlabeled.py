"""``tskd_preprocess_unlabeled``: real images without labels -> the ``unlabeled`` extension.

    tskd_preprocess_unlabeled DATASET -c CONFIGURATION --fold K|all [-p PLANS] [-i FOLDER]

Input: raw images named like nnU-Net's imagesTr, ``<case>_<XXXX><file_ending>`` (one file per channel
of dataset.json, ``file_ending`` from dataset.json), by default in
``$nnUNet_raw/DatasetXXX/imagesUnlabeled``. Each case is preprocessed exactly as nnU-Net preprocesses
a training case, by the preprocessor class the plans name (``configuration_manager.preprocessor_class``
-> ``run_case``), and written as ``unl_<case>`` into
``tskd_extension/<plans>_<configuration>/fold_<k>/unlabeled/``. These images belong to no split, so
they may serve every fold: ``--fold all`` writes every fold of ``splits_final.json`` and nnU-Net's
``fold_all``. Case names that also occur in imagesTs are refused (they would leak test images into
training).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
from typing import Dict, List, Optional, Sequence, Union

from tqdm import tqdm

from tskd_nnunet.data.extension import (ExtensionError, ExtensionWriter, dataset_name, list_extension_cases,
                                        read_manifest, write_manifest)
from tskd_nnunet.data.splits import num_folds

DEFAULT_INPUT_DIRNAME = "imagesUnlabeled"


def find_unlabeled_cases(folder: str, file_ending: str, num_channels: int) -> Dict[str, List[str]]:
    """``{case: [channel files in order]}`` for files ``<case>_<XXXX><file_ending>``; every case must
    have all channels."""
    if not os.path.isdir(folder):
        raise ExtensionError(f"input folder {folder} does not exist. Fix: put unlabeled images there as "
                             f"<case>_0000{file_ending} or pass -i FOLDER")
    pattern = re.compile(r"^(.+)_(\d{4})" + re.escape(file_ending) + "$")
    found: Dict[str, Dict[int, str]] = {}
    ignored = []
    for name in sorted(os.listdir(folder)):
        m = pattern.match(name)
        if m is None:
            if not name.startswith("."):
                ignored.append(name)
            continue
        found.setdefault(m.group(1), {})[int(m.group(2))] = os.path.join(folder, name)
    if not found:
        raise ExtensionError(f"no images named <case>_0000{file_ending} in {folder}"
                             f"{' (found e.g. ' + ignored[0] + ')' if ignored else ''}. Fix: name them like imagesTr")
    cases = {}
    for case, chans in found.items():
        missing = [c for c in range(num_channels) if c not in chans]
        extra = [c for c in chans if c >= num_channels]
        if missing or extra:
            raise ExtensionError(f"case {case} in {folder} has channel files {sorted(chans)} but dataset.json has "
                                 f"{num_channels} channel(s). Fix: provide {case}_0000..{case}_{num_channels - 1:04d}"
                                 f"{file_ending}")
        cases[case] = [chans[c] for c in range(num_channels)]
    return cases


def _folds(base: str, fold: Union[int, str]) -> List[Union[int, str]]:
    if str(fold) != "all":
        return [int(fold)]
    return list(range(num_folds(base, ExtensionError))) + ["all"]


def preprocess_unlabeled(dataset_name_or_id: Union[int, str], configuration: str, fold: Union[int, str],
                         input_folder: Optional[str] = None, plans: str = "nnUNetPlans",
                         progress: bool = True) -> List[str]:
    """Preprocess every case of ``input_folder`` into the fold(s)' ``unlabeled`` extension; returns the
    extension folders. Cases already complete in a folder are skipped (re-runs resume)."""
    name = dataset_name(dataset_name_or_id)
    base = os.path.join(os.environ["nnUNet_preprocessed"], name)
    with open(os.path.join(base, "dataset.json")) as f:
        dataset_json = json.load(f)
    file_ending = dataset_json["file_ending"]
    if input_folder is None:
        raw = os.environ.get("nnUNet_raw")
        if not raw:
            raise ExtensionError("nnUNet_raw is not set and no -i FOLDER was given. Fix: export nnUNet_raw or pass -i")
        input_folder = os.path.join(raw, name, DEFAULT_INPUT_DIRNAME)
    cases = find_unlabeled_cases(input_folder, file_ending, len(dataset_json["channel_names"]))

    raw_test = os.path.join(os.environ.get("nnUNet_raw") or "", name, "imagesTs")
    if os.path.isdir(raw_test):
        test_ids = {m.group(1) for m in (re.match(r"^(.+)_\d{4}" + re.escape(file_ending) + "$", n)
                                         for n in os.listdir(raw_test)) if m}
        leaked = sorted(set(cases) & test_ids)
        if leaked:
            raise ExtensionError(f"{len(leaked)} unlabeled case(s) in {input_folder} have the names of test cases in "
                                 f"{raw_test} ({', '.join(leaked[:5])}). Fix: never train on test images; remove them")

    writers = [ExtensionWriter(name, plans, configuration, k, "unlabeled") for k in _folds(base, fold)]
    w0 = writers[0]
    preprocessor = w0.configuration_manager.preprocessor_class(verbose=False)
    todo = [c for c in sorted(cases) if any(not w.has_case("unl_" + c) for w in writers)]
    print(f"Preprocessing {len(todo)} of {len(cases)} unlabeled case(s) from {input_folder} with "
          f"{type(preprocessor).__name__} ({plans} {configuration}) -> {len(writers)} fold folder(s)")
    for case in tqdm(todo, desc="unlabeled", unit="case", disable=not progress):
        try:
            data, _, props = preprocessor.run_case(cases[case], None, w0.plans_manager, w0.configuration_manager,
                                                   dataset_json)
        except Exception as e:  # unreadable image: name the file, not a stack trace
            raise ExtensionError(f"cannot preprocess {cases[case][0]} ({type(e).__name__}: {e}). Fix: check that the "
                                 f"file is a valid {file_ending} image like those in imagesTr") from None
        for w in writers:
            if not w.has_case("unl_" + case):
                w.write_case("unl_" + case, data, w.complete_properties(dict(props)))
    now = datetime.datetime.now().isoformat(timespec="seconds")
    for w in writers:
        m = read_manifest(w.folder)
        m.update({"source": "unlabeled", "dataset": name, "plans": plans, "configuration": configuration,
                  "fold": w.fold, "input_folder": os.path.abspath(input_folder),
                  "preprocessor": type(preprocessor).__name__, "num_cases": len(list_extension_cases(w.folder)),
                  "updated": now})
        m.setdefault("created", now)
        write_manifest(w.folder, m)
    return [w.folder for w in writers]


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="tskd_preprocess_unlabeled", description=__doc__.split("\n\n")[0])
    p.add_argument("dataset_name_or_id")
    p.add_argument("-c", "--configuration", required=True)
    p.add_argument("--fold", required=True, help="fold number, or 'all' for every fold of splits_final.json + fold_all")
    p.add_argument("-p", "--plans", default="nnUNetPlans")
    p.add_argument("-i", "--input", default=None,
                   help=f"folder of <case>_0000<file_ending> images (default $nnUNet_raw/DatasetXXX/{DEFAULT_INPUT_DIRNAME})")
    a = p.parse_args(argv)
    if a.fold != "all" and not a.fold.isdigit():
        p.error(f"--fold {a.fold!r} must be a fold number or 'all'")
    try:
        folders = preprocess_unlabeled(a.dataset_name_or_id, a.configuration, a.fold, a.input, a.plans)
    except ExtensionError as e:
        raise SystemExit(f"tskd_preprocess_unlabeled: {e}") from None
    print("Unlabeled extension:\n  " + "\n  ".join(folders))


if __name__ == "__main__":
    main()
