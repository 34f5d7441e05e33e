"""Deployable students: ONNX export (fp32, int8) of a trained nnU-Net model folder, and nnU-Net's own
prediction pipeline with an onnxruntime session in place of the PyTorch network.

- ``onnx_export``: ``export_model_folder`` (the ``tskd_export`` command).
- ``onnx_predictor``: ``OnnxPredictor`` (an ``nnUNetPredictor``) and the ``tskd_predict_onnx`` command.

See documentation/export.md.
"""
