"""How nnU-Net finds our trainers (see tskd_nnunet_autoregister.py for the start-up hook).

``pip install .`` drops ``tskd_nnunet_autoregister.pth`` into site-packages, so every nnU-Net
command of that environment searches ``tskd_nnunet/nnunet_ext`` through ``nnUNet_extTrainer``.
Without it (``TSKD_NO_AUTOREGISTER=1``, or an editable install, which does not carry .pth files),
nnU-Net reports "Could not find requested nnunet trainer"; the fix is one line:
``export nnUNet_extTrainer=$(tskd_trainer_dir)``.

What it finds there: every ``nnUNetTrainer`` subclass defined in a module of ``tskd_nnunet.trainers``
(``trainer_classes``); a new trainer is a class in such a module, nothing else to edit.
"""
import importlib
import inspect
import os
import pkgutil
from typing import Dict

TRAINER_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "nnunet_ext")


def print_trainer_dir() -> None:
    """Console entry ``tskd_trainer_dir``."""
    print(TRAINER_DIR)


def trainer_classes() -> Dict[str, type]:
    """Every nnU-Net trainer class defined in a module of ``tskd_nnunet.trainers``, by name (the classes
    themselves, not copies: ``tskd_nnunet/nnunet_ext/tskd_trainers.py`` re-exports them for nnU-Net)."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    import tskd_nnunet.trainers as package
    found: Dict[str, type] = {}
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for name, obj in vars(module).items():
            if (inspect.isclass(obj) and issubclass(obj, nnUNetTrainer) and obj.__module__ == module.__name__
                    and not name.startswith("_")):
                if name in found:
                    raise RuntimeError(f"trainer class {name} is defined in {found[name].__module__} and "
                                       f"{module.__name__}; nnU-Net finds trainers by name. Fix: rename one")
                found[name] = obj
    return found
