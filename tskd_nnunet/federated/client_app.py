"""The Flower ClientApp run at each site (inside the site's SuperNode, with the site's nnU-Net folders).

Messages (``message_type``) it answers; none of its replies holds an image, a label or a case identifier:

- ``query.fingerprint``: nnU-Net's dataset fingerprint of the site (spacings, shapes, intensity statistics), its
  case count and the dataset.json fields sites must share.
- ``query.plan``: plan and preprocess with the merged fingerprint; reply: the plans sha256.
- ``query.init``: the trainable tensors of a freshly built teacher (the federation's round 0).
- ``train``: E local epochs from the global tensors; reply: the trainable tensors, the labeled case count and
  nnU-Net's pseudo-Dice of the global (before) and local (after) model at this site.
- ``query.finish``: install the global teacher as the site's nnU-Net model folder.

Node config (``flower-supernode --node-config``, set by ``tskd_fed_client``): ``site`` (name in the server's
log), ``device``, ``status-file`` (where the site records the federation's progress; ``tskd_fed_client`` stops
its SuperNode when it says finished).

``TSKD_FED_FAULT=nan@R`` (a drill, at one site): the update this site sends in round R is all NaN, so that a
federation's operators can see the server refuse it (tests/test_federated_flower.py does exactly that).
"""
from __future__ import annotations

import json
import multiprocessing
import os
import time
from typing import Any, Dict, Optional

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from tskd_nnunet import config
from tskd_nnunet.atomic_io import atomic_write_json, read_json
from tskd_nnunet.federated import fingerprint as fpr
from tskd_nnunet.federated import site as site_ops

app = ClientApp()

# This process runs gRPC threads; a fork of it can inherit a lock one of them holds. nnU-Net's pools that use the
# default start method (preprocessing's file listing) forked it and hung in the child: start them with spawn, as
# nnU-Net's own heavy pools do.
multiprocessing.set_start_method("spawn", force=True)


def _site(context: Context) -> str:
    return str(context.node_config.get("site", f"node-{context.node_id}"))


def _device(context: Context) -> torch.device:
    return torch.device(str(context.node_config.get("device", "cpu")))


def _record_status(context: Context, **fields: Any) -> None:
    path = context.node_config.get("status-file")
    if path:
        status = read_json(str(path), default={})
        status.update(fields, updated=time.time())
        atomic_write_json(str(path), status)


def _reply(msg: Message, context: Context, arrays: Optional[Dict[str, torch.Tensor]] = None,
           **config: Any) -> Message:
    content = RecordDict({"info": ConfigRecord({"site": _site(context), **config})})
    if arrays is not None:
        content["arrays"] = ArrayRecord(arrays)
    return Message(content=content, reply_to=msg)


def _task(msg: Message) -> site_ops.SiteTask:
    return site_ops.SiteTask.from_config(dict(msg.content["task"]))


@app.query("fingerprint")
def fingerprint(msg: Message, context: Context) -> Message:
    dataset = int(msg.content["task"]["dataset"])
    info = fpr.site_fingerprint(dataset, num_processes=int(os.environ.get("nnUNet_def_n_proc", "1")))
    _record_status(context, phase="fingerprint", dataset=info["dataset_name"], num_cases=info["num_cases"])
    return _reply(msg, context, num_cases=info["num_cases"], dataset_name=info["dataset_name"],
                  fingerprint=json.dumps(info["fingerprint"]), dataset_json=json.dumps(info["dataset_json"]))


@app.query("plan")
def plan(msg: Message, context: Context) -> Message:
    task = _task(msg)
    p = msg.content["plan"]
    identifier, digest = fpr.plan_with_merged(task.dataset, json.loads(str(p["fingerprint"])), int(p["total_cases"]),
                                              [task.configuration], str(p["planner"]), task.plans,
                                              num_processes=int(os.environ.get("nnUNet_def_n_proc", "1")),
                                              cpu_plan=(int(p["cpu_plan_size"]), int(p["cpu_plan_batch"]))
                                              if int(p.get("cpu_plan_size", 0)) else None)
    _record_status(context, phase="planned", plans=identifier, plans_sha256=digest)
    return _reply(msg, context, plans=identifier, plans_sha256=digest)


@app.query("init")
def init(msg: Message, context: Context) -> Message:
    task = _task(msg)
    with site_ops.site_lock(task):
        state = site_ops.initial_state(task, _device(context))
    return _reply(msg, context, arrays=state)


@app.train()
def train(msg: Message, context: Context) -> Message:
    task, rnd = _task(msg), int(msg.content["round"]["round"])
    _record_status(context, phase="training", round=rnd)
    global_state = dict(msg.content["arrays"].to_torch_state_dict())
    with site_ops.site_lock(task):
        state, metrics = site_ops.local_round(task, global_state, _device(context))
        if config.fed_fault_round() == rnd:
            state = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in state.items()}
        site_ops.keep_sent(site_ops.output_folder(task), rnd, state)
    _record_status(context, phase="trained", round=rnd)
    return _reply(msg, context, arrays=state, num_cases=metrics["num_train"], metrics=json.dumps(metrics))


@app.query("finish")
def finish(msg: Message, context: Context) -> Message:
    task = _task(msg)
    provenance = json.loads(str(msg.content["round"]["provenance"]))
    global_state = dict(msg.content["arrays"].to_torch_state_dict())
    with site_ops.site_lock(task):
        folder, metrics = site_ops.install_global(task, global_state, _device(context), provenance)
    _record_status(context, phase="finished", model_folder=folder, rounds=provenance.get("rounds"))
    return _reply(msg, context, model_folder=folder, metrics=json.dumps(metrics))
