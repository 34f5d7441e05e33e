"""``python -m tskd_nnunet.export {export,predict} ARGS``: the two console commands without installing."""
import sys

from tskd_nnunet.export.cli import export_main, predict_main

if __name__ == "__main__":
    commands = {"export": export_main, "predict": predict_main}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        sys.exit("usage: python -m tskd_nnunet.export {export,predict} ARGS  (= tskd_export / tskd_predict_onnx)")
    name = sys.argv.pop(1)
    sys.exit(commands[name]())
