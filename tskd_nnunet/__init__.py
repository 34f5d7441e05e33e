"""tskd-nnunet: task-specific knowledge distillation as a plugin to nnU-Net v2.

Kept import-light on purpose: the interpreter start-up hook (``tskd_nnunet_autoregister.pth``)
imports :mod:`tskd_nnunet.discovery`, which must not pull in torch.
"""
__version__ = "0.1.0"
