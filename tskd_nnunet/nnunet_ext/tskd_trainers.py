"""The module nnU-Net imports from ``nnUNet_extTrainer``.

It re-exports our trainer classes so that each keeps one identity,
``tskd_nnunet.trainers.<module>.<Class>``, however nnU-Net imports this folder. Every public
trainer must be listed here to be found by ``nnUNetv2_train -tr`` and ``nnUNetv2_predict -tr``.
"""
from tskd_nnunet.trainers.base import TSKDPlainTrainer, TSKDPlainTrainer_demo, TSKDPlainTrainer_test  # noqa: F401
