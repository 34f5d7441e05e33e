"""Federated TS-KD teacher with Flower (documentation/federated.md): sites plan on a merged nnU-Net fingerprint,
train the LoRA teacher locally and send only its trainable tensors; the server checks and averages them.

Modules: ``fingerprint`` (merge, site planning), ``updates`` (trainable state, checks, weighted mean),
``checkpoint`` (atomic round checkpoints, resume), ``site`` (nnU-Net trainer calls at a site),
``server_app`` / ``client_app`` (Flower ServerApp / ClientApp), ``cli`` (tskd_fed_server, tskd_fed_client,
tskd_fed_credentials).
"""
