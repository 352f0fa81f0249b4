"""`ppx-export <command> --help` documents every option, and names each default worth naming."""

from __future__ import annotations

import argparse

from personaplex_edge.export.cli import _parser


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_every_option_of_every_command_has_help_and_its_default() -> None:
    commands = _subcommands()
    assert {"synth", "onnx", "quantize", "verify", "engines", "inspect"} <= set(commands)
    for name, parser in commands.items():
        text = parser.format_help()
        for action in parser._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS:
                continue
            flag = action.option_strings[-1]
            assert action.help, f"ppx-export {name} {flag}: no help"
            if action.default not in (None, False, argparse.SUPPRESS) and "default" not in action.help:
                assert f"(default: {action.default})" in " ".join(text.split()), (name, flag)


def test_onnx_help_names_the_dtype_default_and_explains_out_and_quiet() -> None:
    text = " ".join(_subcommands()["onnx"].format_help().split())
    assert "fp32 or fp16 (default: fp32)" in text
    assert "--out OUT build directory to write" in text
    assert "--quiet no progress bars" in text
    assert "(default: None)" not in text and "(default: False)" not in text
