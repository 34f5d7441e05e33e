"""Folder searched by nnU-Net (nnUNet_extTrainer). Only re-exporting modules live here."""
