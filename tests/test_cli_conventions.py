"""Every console script of setup.py answers --help, and its shared arguments follow nnU-Net's spelling
as the table in documentation/conventions.md ("Command-line conventions") says.

Runs in-process (the entry-point functions of this checkout, no reinstall): argparse's parse_known_args
is wrapped to record each command's parser, then --help is given and its SystemExit caught.
"""
from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import os
import re
import sys
from typing import Dict, List, Optional, Tuple

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# concept -> (dests that carry it, nnU-Net's option spelling, positional dests allowed instead)
SHARED = {
    "dataset": ({"dataset_id", "datasets", "dataset", "dataset_name_or_id", "d"}, "-d", {"dataset_name_or_id"}),
    "configuration": ({"configuration", "c"}, "-c", {"configuration"}),
    "fold": ({"fold", "f"}, "-f", {"fold"}),
    "plans": ({"plans", "p"}, "-p", set()),
    "trainer": ({"trainer", "tr"}, "-tr", set()),
    "device": ({"device"}, "-device", set()),
    "processes": ({"num_processes", "np"}, "-np", set()),
}
POSITIONAL_NAMES = {"dataset_name_or_id": "DATASET", "configuration": "CONFIGURATION", "fold": "FOLD"}


def console_scripts() -> List[Tuple[str, str, str]]:
    """(name, module, function) of every console script in setup.py."""
    tree = ast.parse(open(os.path.join(REPO, "setup.py")).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "entry_points":
            entries = ast.literal_eval(node.value)["console_scripts"]
            out = []
            for e in entries:
                name, target = (s.strip() for s in e.split("="))
                module, func = target.split(":")
                out.append((name, module, func))
            return out
    raise AssertionError("no entry_points in setup.py")


def table_rows() -> Dict[str, Dict[str, str]]:
    """Rows of the CLI table in documentation/conventions.md, by command."""
    text = open(os.path.join(REPO, "documentation", "conventions.md")).read()
    rows = {}
    for line in text.splitlines():
        m = re.match(r"^\| `(tskd_\w+)` \|(.*)\|\s*$", line)
        if m:
            cells = [c.strip() for c in m.group(2).split("|")]
            rows[m.group(1)] = {"positional": cells[0], "shared": cells[1], "deprecated": cells[2],
                                "follows": cells[3]}
    return rows


def _strip(cell: str) -> List[str]:
    return [w for w in cell.replace("`", "").replace(",", " ").split() if w not in ("—", "-")]


def capture_parser(name: str, module: str, func: str, monkeypatch, capsys) -> Tuple[Optional[argparse.ArgumentParser],
                                                                                       str]:
    """Call the entry point with --help; return the parser it built (None if it has none) and its output."""
    seen: List[argparse.ArgumentParser] = []
    original = argparse.ArgumentParser.parse_known_args

    def recording(self, args=None, namespace=None):
        if not seen:
            seen.append(self)
        return original(self, args, namespace)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", recording)
    monkeypatch.setattr(sys, "argv", [name, "--help"])
    fn = getattr(importlib.import_module(module), func)
    takes_argv = bool(inspect.signature(fn).parameters)
    try:
        fn(["--help"]) if takes_argv else fn()
    except SystemExit as e:
        assert e.code in (0, None), f"{name} --help exited with {e.code}"
    out = capsys.readouterr().out
    return (seen[0] if seen else None), out


def describe(parser: argparse.ArgumentParser) -> Tuple[List[str], List[str], List[str]]:
    """(positionals as in the table, shared nnU-Net flags found, every visible option string)."""
    positional, shared, options = [], [], []
    for a in parser._actions:
        if a.help == argparse.SUPPRESS or isinstance(a, argparse._HelpAction):
            continue
        if not a.option_strings:
            label = POSITIONAL_NAMES.get(a.dest) or (a.metavar if isinstance(a.metavar, str) else a.dest.upper())
            positional.append(f"[{label}]" if a.nargs == "?" else label)
            continue
        options += a.option_strings
        for dests, flag, _ in SHARED.values():
            if a.dest in dests:
                shared.append(flag if flag in a.option_strings else a.option_strings[0])
    return positional, shared, options


SCRIPTS = console_scripts()


def test_table_lists_every_console_script():
    rows = table_rows()
    assert sorted(rows) == sorted(n for n, _, _ in SCRIPTS)


@pytest.mark.parametrize("name,module,func", SCRIPTS, ids=[s[0] for s in SCRIPTS])
def test_help_and_shared_flags_follow_the_table(name, module, func, monkeypatch, capsys):
    parser, out = capture_parser(name, module, func, monkeypatch, capsys)
    row = table_rows()[name]
    if parser is None:  # a command without arguments
        assert _strip(row["positional"]) == [] and _strip(row["shared"]) == [], name
        return
    assert "usage:" in out, f"{name} --help printed no usage"
    positional, shared, options = describe(parser)
    assert positional == _strip(row["positional"]), f"{name}: positionals differ from the table"
    assert sorted(shared) == sorted(_strip(row["shared"])), f"{name}: shared flags differ from the table"
    if not row["follows"].startswith("yes"):
        return  # a listed deviation (a command owned elsewhere, not renamed yet)
    for concept, (dests, flag, positional_ok) in SHARED.items():
        for a in parser._actions:
            if a.help == argparse.SUPPRESS or a.dest not in dests:
                continue
            if a.option_strings:
                assert flag in a.option_strings, f"{name}: the {concept} is spelled {a.option_strings}, not {flag}"
            else:
                assert a.dest in positional_ok, f"{name}: positional {a.dest} should be {flag}"
    assert "-n" not in options, f"{name}: -n is ambiguous across our commands; spell the option out"


def test_deprecated_spellings_still_work(capsys):
    from dataset_conversion.common import add_common_args
    from tskd_nnunet.cli_args import NNUNetStyleParser
    from tskd_nnunet.evaluation.cli import build_parser
    from tskd_nnunet.pretrain import cli as pretrain_cli

    p = NNUNetStyleParser(prog="conv")
    add_common_args(p, None, None)
    assert p.parse_args(["-d", "600", "-n", "Old"]).name == "Old"
    assert p.parse_args(["-d", "600", "--name", "New"]).name == "New"
    with pytest.raises(SystemExit):
        p.parse_args(["-d", "600"])  # --name is required here, by either spelling
    with pytest.raises(SystemExit):
        p.parse_args(["-d", "600", "-n", "A", "--name", "B"])  # both spellings: refused
    args = build_parser().parse_args(["-ref", "r", "-pred", "p", "-djfile", "d", "-o", "o"])
    assert (args.ref, args.pred) == ("r", "p")
    cnn = pretrain_cli._cnn_parser("cnn", "")
    pretrain_cli._common(cnn, 1e-3, 2)
    assert cnn.parse_args(["501", "2d", "--fold", "3", "--steps", "1", "-o", "x"]).fold == 3
    assert cnn.parse_args(["501", "2d", "all", "--steps", "1", "-o", "x"]).fold is None
    assert "is deprecated" in capsys.readouterr().err
