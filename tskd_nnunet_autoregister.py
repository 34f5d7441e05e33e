"""Start-up hook (run by ``tskd_nnunet_autoregister.pth``): let nnU-Net find our trainers.

nnU-Net >= 2.8 searches the folders in ``nnUNet_extTrainer`` (os.pathsep separated) after its own
trainer tree, in ``nnUNetv2_train`` and ``nnUNetv2_predict`` alike. This appends ours. It locates
the package without importing it (no torch at interpreter start, and no pinning of the installed
copy over a source checkout). ``TSKD_NO_AUTOREGISTER=1`` turns it off.
"""
import importlib.util
import os


def trainer_dir():
    spec = importlib.util.find_spec("tskd_nnunet")
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(list(spec.submodule_search_locations)[0], "nnunet_ext")


def register(environ=None):
    """Add our trainer folder to ``nnUNet_extTrainer`` unless present or disabled. True if added."""
    env = os.environ if environ is None else environ
    # config.TRUE_VALUES (not imported: no package import at interpreter start); a value outside the yes/no set
    # is refused when a trainer starts (config.check_environment), this hook must never fail
    if env.get("TSKD_NO_AUTOREGISTER", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    folder = trainer_dir()
    current = [p for p in env.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
    if folder is None or folder in current:
        return False
    env["nnUNet_extTrainer"] = os.pathsep.join(current + [folder])
    return True
