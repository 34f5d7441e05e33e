"""How nnU-Net finds our trainers (see tskd_nnunet_autoregister.py for the start-up hook).

``pip install .`` drops ``tskd_nnunet_autoregister.pth`` into site-packages, so every nnU-Net
command of that environment searches ``tskd_nnunet/nnunet_ext`` through ``nnUNet_extTrainer``.
Without it (``TSKD_NO_AUTOREGISTER=1``, or an editable install, which does not carry .pth files),
nnU-Net reports "Could not find requested nnunet trainer"; the fix is one line:
``export nnUNet_extTrainer=$(tskd_trainer_dir)``.
"""
import os

TRAINER_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "nnunet_ext")


def print_trainer_dir() -> None:
    """Console entry ``tskd_trainer_dir``."""
    print(TRAINER_DIR)
