"""Distillation pieces: losses (pixel and feature KD) and teacher loading. The trainer is
tskd_nnunet.trainers.distill."""
