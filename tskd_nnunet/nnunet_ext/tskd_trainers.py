"""The module nnU-Net imports from ``nnUNet_extTrainer``.

It re-exports every nnU-Net trainer class defined in a module of ``tskd_nnunet.trainers``
(tskd_nnunet.discovery.trainer_classes), so that ``nnUNetv2_train -tr`` and ``nnUNetv2_predict -tr`` find a
new class without any list to edit, and each class keeps one identity,
``tskd_nnunet.trainers.<module>.<Class>``, however nnU-Net imports this folder.
"""
from tskd_nnunet.discovery import trainer_classes

globals().update(trainer_classes())
