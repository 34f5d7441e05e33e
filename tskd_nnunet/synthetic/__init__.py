"""Diffusion-generated transfer set: train a generator on one fold, sample an nnU-Net extension, check quality."""
