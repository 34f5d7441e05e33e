"""Trainer classes for nnU-Net (found through tskd_nnunet/nnunet_ext, see discovery.py)."""
