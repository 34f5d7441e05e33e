"""The argument parser of our console commands: nnU-Net's spellings, old spellings as hidden aliases.

The shared flags follow nnU-Net (documentation/conventions.md, "Command-line conventions"):
``DATASET CONFIGURATION FOLD`` positional where ``nnUNetv2_train`` has them, else ``-d``/``-c``/``-f``;
``-p`` plans, ``-tr`` trainer, ``-device``, ``-np`` processes. A spelling we used before stays accepted
as a *deprecated alias*: hidden from ``--help``, it prints one warning line and fills the new argument.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, List, Optional, Sequence, Tuple


class NNUNetStyleParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` plus :meth:`add_deprecated_alias` and :meth:`require`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._aliases: List[Tuple[str, str, str]] = []  # (old spelling, dest, new spelling)
        self._required: List[Tuple[str, str]] = []      # (dest, spelling): required, old or new spelling

    def add_deprecated_alias(self, old: str, dest: str, new: str, **kwargs: Any) -> None:
        """Accept ``old`` (hidden) for the argument stored in ``dest`` and spelled ``new`` in --help."""
        self.add_argument(old, dest=f"_deprecated_{dest}", default=None, help=argparse.SUPPRESS, **kwargs)
        self._aliases.append((old, dest, new))

    def require(self, dest: str, spelling: str) -> None:
        """``dest`` must be given, by its new or its deprecated spelling (argparse's own check sees only one)."""
        self._required.append((dest, spelling))

    def parse_known_args(self, args: Optional[Sequence[str]] = None, namespace: Any = None):
        ns, rest = super().parse_known_args(args, namespace)
        for old, dest, new in self._aliases:
            value = getattr(ns, f"_deprecated_{dest}", None)
            if hasattr(ns, f"_deprecated_{dest}"):
                delattr(ns, f"_deprecated_{dest}")
            if value is None:
                continue
            if getattr(ns, dest, None) not in (None, self.get_default(dest)):
                self.error(f"{old} is the deprecated spelling of {new}: give only {new}")
            print(f"{self.prog}: warning: {old} is deprecated, use {new}", file=sys.stderr)
            setattr(ns, dest, value)
        missing = [spelling for dest, spelling in self._required if getattr(ns, dest, None) is None]
        if missing:
            self.error(f"the following arguments are required: {', '.join(missing)}")
        return ns, rest
