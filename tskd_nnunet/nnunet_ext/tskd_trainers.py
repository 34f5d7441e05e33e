"""The module nnU-Net imports from ``nnUNet_extTrainer``.

It re-exports our trainer classes so that each keeps one identity,
``tskd_nnunet.trainers.<module>.<Class>``, however nnU-Net imports this folder. Every public
trainer must be listed here to be found by ``nnUNetv2_train -tr`` and ``nnUNetv2_predict -tr``.
"""
from tskd_nnunet.trainers.base import TSKDPlainTrainer, TSKDPlainTrainer_demo, TSKDPlainTrainer_test  # noqa: F401
from tskd_nnunet.trainers.distill import (DistillTrainer, DistillTrainer_cwd, DistillTrainer_feat, DistillTrainer_small,  # noqa: F401
                                         DistillTrainer_T4, DistillTrainer_test, DistillTrainer_demo, DistillTrainer_tiny,
                                         TaskAgnosticDistillTrainer, TaskAgnosticDistillTrainer_test)
from tskd_nnunet.trainers.distill import DistillTrainer_vittiny, DistillTrainer_vittiny_test  # noqa: F401
from tskd_nnunet.trainers.distill import DistillTrainer_twostage, DistillTrainer_twostage_test  # noqa: F401
from tskd_nnunet.trainers.teacher import (ViTFullFTTeacherTrainer, ViTFullFTTeacherTrainer_test,  # noqa: F401
                                          ViTLoRATeacherTrainer, ViTLoRATeacherTrainer_demo, ViTLoRATeacherTrainer_r4,
                                          ViTLoRATeacherTrainer_r16, ViTLoRATeacherTrainer_test)
from tskd_nnunet.trainers.teacher import (LiteMedSAMTeacherTrainer, LiteMedSAMTeacherTrainer_frozen,  # noqa: F401
                                          LiteMedSAMTeacherTrainer_fullft, LiteMedSAMTeacherTrainer_last,
                                          LiteMedSAMTeacherTrainer_demo, LiteMedSAMTeacherTrainer_test, LiteMedSAMTeacherTrainer_unetr,
                                          LiteMedSAMTeacherTrainer_unetr_frozen, LiteMedSAMTeacherTrainer_unetr_last,
                                          LiteMedSAMTeacherTrainer_unetr_test)
from tskd_nnunet.trainers.distill_synthetic import (DistillTrainer_nosyn, DistillTrainer_syn, DistillTrainer_syn_test,  # noqa: F401
                                                   DistillTrainer_unl)
