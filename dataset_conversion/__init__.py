"""Converters from public dataset layouts to nnU-Net v2 raw format, plus label-budget splits.

Each ``DatasetXXX_Name`` module is a command (``python -m dataset_conversion.Dataset501_HC18 --help``);
``label_budget`` writes ``splits_final.json`` and the unlabeled pool. See documentation/dataset_conversion.md.
"""
from dataset_conversion.common import ConversionError

__all__ = ["ConversionError"]
