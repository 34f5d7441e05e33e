"""Data helpers around nnU-Net's preprocessed folders (transfer set, extension, unlabeled cases)."""
