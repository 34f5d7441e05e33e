"""Console commands (nnU-Net naming style):

    tskd_pretrain_mae  -d 501 [502 ...] -c 2d [-f K] --arch vit_tiny --resolution 128 --steps N -o mae.pth
    tskd_pretrain_moco -d 501 [502 ...] -c 2d [-f K] --arch vit_tiny --resolution 128 --steps N -o moco.pth
    tskd_pretrain_cnn_mim  DATASET CONFIGURATION [FOLD] [-p nnUNetPlans] [-tr nnUNetTrainer] --steps N -o cnn_mim.pth
    tskd_pretrain_cnn_moco DATASET CONFIGURATION [FOLD] [-p nnUNetPlans] [-tr nnUNetTrainer] --steps N -o cnn_moco.pth

all with [--resume] [--overwrite] [-device cuda|cpu]. A fold (0-4; ``all``, the default, excludes nothing)
leaves out that fold's validation cases. ``--fold K`` is the deprecated spelling of ``-f K`` / ``FOLD``.
ViT outputs are timm-format files for TSKD_TEACHER_WEIGHTS / TSKD_STUDENT_WEIGHTS; CNN outputs are for
``nnUNetv2_train ... -pretrained_weights``.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, Dict, List, Optional

import torch

from tskd_nnunet.cli_args import NNUNetStyleParser

_FOLD_HELP = "exclude this fold's validation cases (honest benchmarks: pretrain per fold); all (default): none"


def _fold(value: str) -> Optional[int]:
    """A fold number, or None for ``all`` (nnU-Net's name for 'every training case')."""
    if value == "all":
        return None
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"fold must be a number or 'all', not {value!r}") from None


def _common(parser: argparse.ArgumentParser, default_lr: float, default_bs: int) -> None:
    parser.add_argument("-o", "--output", required=True, help="output .pth (loss curve and resume state beside it)")
    parser.add_argument("--steps", type=int, required=True, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=default_bs)
    parser.add_argument("--lr", type=float, default=default_lr, help=f"peak learning rate (AdamW), default {default_lr}")
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--warmup", type=float, default=0.05, help="fraction of steps of linear LR warm-up")
    parser.add_argument("--no-pool", action="store_true", help="leave out the unlabeled-pool cases")
    parser.add_argument("--extensions", nargs="*", default=["synthetic", "unlabeled"],
                        help="extension sources to include (default: synthetic unlabeled; none: --extensions)")
    parser.add_argument("--save-every", type=int, default=100, help="resume-state interval in steps")
    parser.add_argument("--resume", action="store_true", help="continue from <output stem>.state.pth")
    parser.add_argument("--overwrite", action="store_true", help="start over even if the output exists")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-device", "--device", default="cuda", choices=["cuda", "cpu", "mps"],
                        help="as nnUNetv2_train's -device (default cuda)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bar")


def _vit_parser(prog: str, doc: str) -> NNUNetStyleParser:
    p = NNUNetStyleParser(prog=prog, description=doc)
    p.add_argument("-d", "--datasets", nargs="+", required=True, help="dataset ids or names (pooled)")
    p.add_argument("-c", "--configuration", default="2d")
    p.add_argument("-f", dest="fold", type=_fold, default=None, help=_FOLD_HELP)
    p.add_deprecated_alias("--fold", "fold", "-f", type=_fold)
    p.add_argument("-p", "--plans", default="nnUNetPlans")
    p.add_argument("--arch", default="vit_tiny", help="vit_tiny | vit_small | vit_base (or a timm vit_* name)")
    p.add_argument("--arch-overrides", default=None, help='JSON, e.g. \'{"depth": 2, "embed_dim": 64, "num_heads": 2}\'')
    p.add_argument("--resolution", type=int, default=128, help="square input size (multiple of 16)")
    p.add_argument("--in-chans", type=int, default=3, help="ViT input channels (3 = what the teacher expects)")
    p.add_argument("--balance", choices=["case", "dataset"], default="case",
                   help="draw uniformly over cases (default) or first over datasets")
    return p


def _cnn_parser(prog: str, doc: str) -> NNUNetStyleParser:
    p = NNUNetStyleParser(prog=prog, description=doc)
    p.add_argument("dataset_name_or_id")
    p.add_argument("configuration", help="a 2D configuration, e.g. 2d")
    p.add_argument("fold", nargs="?", type=_fold, default=None, help=_FOLD_HELP)
    p.add_deprecated_alias("--fold", "fold", "FOLD", type=_fold)
    p.add_argument("-p", "--plans", default="nnUNetPlans")
    p.add_argument("-tr", "--trainer", default="nnUNetTrainer",
                   help="the trainer you will fine-tune with (its build_network_architecture is used)")
    return p


def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: -device cuda but no CUDA device is visible. Fix: pass -device cpu")
    return torch.device(name)


def _run(build: Callable[[argparse.Namespace], Any], parser: argparse.ArgumentParser, argv: Optional[List[str]],
         corpus_kwargs: Callable[[argparse.Namespace, Any], Dict[str, Any]], objective_name: str) -> None:
    from tskd_nnunet.pretrain.corpus import PretrainCorpus
    from tskd_nnunet.pretrain.loop import LoopConfig, run_pretraining
    args = parser.parse_args(argv)
    try:
        device = _device(args.device)
        torch.manual_seed(args.seed)
        objective, signature = build(args)
        corpus = PretrainCorpus(fold=args.fold, include_pool=not args.no_pool, extensions=tuple(args.extensions),
                                plans=args.plans, seed=args.seed, **corpus_kwargs(args, objective))
        summary = corpus.summary()
        print(f"{objective_name}: {len(corpus)} cases {summary}" + (f", fold {args.fold}" if args.fold is not None else ""))
        cfg = LoopConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                         warmup_fraction=args.warmup, save_every=args.save_every, seed=args.seed, resume=args.resume,
                         overwrite=args.overwrite, progress=not args.no_progress,
                         signature=dict(signature, objective=objective_name, batch_size=args.batch_size,
                                        fold=args.fold, datasets=sorted(summary)))
        run_pretraining(objective, corpus, args.output, cfg, device,
                        meta={"corpus": summary, "fold": args.fold, "configuration": args.configuration})
    except ValueError as e:  # PretrainError (corpus, plans, run folder) and malformed arguments
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)


def _vit_objective(args: argparse.Namespace, kind: str):
    from tskd_nnunet.pretrain.vit import create_vit, parse_overrides
    overrides = parse_overrides(args.arch_overrides)
    encoder = create_vit(args.arch, args.resolution, args.in_chans, overrides)
    sig = {"arch": args.arch, "overrides": overrides, "resolution": args.resolution, "in_chans": args.in_chans}
    if kind == "mae":
        from tskd_nnunet.pretrain.mae import MAE
        obj = MAE(encoder, args.arch, args.resolution, args.in_chans, overrides, mask_ratio=args.mask_ratio,
                  norm_pix=not args.no_norm_pix, decoder_dim=args.decoder_dim, decoder_depth=args.decoder_depth,
                  decoder_heads=args.decoder_heads)
        sig.update(mask_ratio=args.mask_ratio, decoder=[args.decoder_dim, args.decoder_depth, args.decoder_heads])
    else:
        from tskd_nnunet.pretrain.moco import ViTMoCoV3
        obj = ViTMoCoV3(encoder, args.arch, args.resolution, args.in_chans, overrides,
                        freeze_patch_embed=not args.train_patch_embed, dim=args.dim, mlp_dim=args.mlp_dim,
                        temperature=args.temperature, momentum=args.momentum)
        sig.update(dim=args.dim, mlp_dim=args.mlp_dim)
    return obj, sig


def _vit_corpus(args: argparse.Namespace, objective: Any) -> Dict[str, Any]:
    return dict(datasets=args.datasets, configuration=args.configuration, resolution=args.resolution,
                mode="resize", in_chans=args.in_chans, balance=args.balance)


def _moco_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dim", type=int, default=256, help="output dim of projector/predictor")
    p.add_argument("--mlp-dim", type=int, default=4096, help="hidden dim of projector/predictor")
    p.add_argument("--temperature", type=float, default=0.2)
    p.add_argument("--momentum", type=float, default=0.99, help="base EMA momentum (cosine schedule to 1)")


def mae_main(argv: Optional[List[str]] = None) -> None:
    p = _vit_parser("tskd_pretrain_mae", "MAE pretraining of a timm ViT on a pooled nnU-Net corpus (timm-format output)")
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--no-norm-pix", action="store_true", help="plain pixel loss instead of per-patch normalised")
    p.add_argument("--decoder-dim", type=int, default=256)
    p.add_argument("--decoder-depth", type=int, default=4)
    p.add_argument("--decoder-heads", type=int, default=8)
    _common(p, default_lr=1.5e-3, default_bs=64)
    _run(lambda a: _vit_objective(a, "mae"), p, argv, _vit_corpus, "mae")


def moco_main(argv: Optional[List[str]] = None) -> None:
    p = _vit_parser("tskd_pretrain_moco", "MoCo v3 pretraining of a timm ViT on a pooled nnU-Net corpus (timm-format output)")
    _moco_args(p)
    p.add_argument("--train-patch-embed", action="store_true",
                   help="train the patch projection (MoCo v3 freezes it at random init for stability)")
    _common(p, default_lr=1.5e-3, default_bs=64)
    _run(lambda a: _vit_objective(a, "moco_v3"), p, argv, _vit_corpus, "moco_v3")


def _cnn_objective(args: argparse.Namespace, kind: str):
    from tskd_nnunet.pretrain.cnn_mim import CNNMIM, build_planned_network
    planned = build_planned_network(args.dataset_name_or_id, args.configuration, args.plans, args.trainer)
    sig = {"dataset": planned.dataset_name, "plans": args.plans, "trainer": args.trainer}
    if kind == "mim":
        sig["mask_ratio"] = args.mask_ratio
        return CNNMIM(planned, mask_ratio=args.mask_ratio), sig
    from tskd_nnunet.pretrain.cnn_moco import CNNMoCoV3
    sig.update(dim=args.dim, mlp_dim=args.mlp_dim)
    return CNNMoCoV3(planned, dim=args.dim, mlp_dim=args.mlp_dim, temperature=args.temperature,
                     momentum=args.momentum), sig


def _cnn_corpus(args: argparse.Namespace, objective: Any) -> Dict[str, Any]:
    planned = objective.planned
    return dict(datasets=[args.dataset_name_or_id], configuration=args.configuration,
                resolution=planned.patch_size, mode="crop", in_chans=planned.num_input_channels)


def cnn_mim_main(argv: Optional[List[str]] = None) -> None:
    p = _cnn_parser("tskd_pretrain_cnn_mim", "Masked image modelling (SparK-style) of the planned nnU-Net network; "
                    "output loads with nnUNetv2_train ... -pretrained_weights")
    p.add_argument("--mask-ratio", type=float, default=0.6)
    _common(p, default_lr=2e-4, default_bs=8)
    _run(lambda a: _cnn_objective(a, "mim"), p, argv, _cnn_corpus, "cnn_mim")


def cnn_moco_main(argv: Optional[List[str]] = None) -> None:
    p = _cnn_parser("tskd_pretrain_cnn_moco", "MoCo v3 with the planned nnU-Net encoder; output loads with "
                    "nnUNetv2_train ... -pretrained_weights")
    _moco_args(p)
    _common(p, default_lr=2e-4, default_bs=32)
    _run(lambda a: _cnn_objective(a, "moco"), p, argv, _cnn_corpus, "cnn_moco_v3")
