"""What both command lines share: the argument parser, exit codes, config loading."""

from __future__ import annotations

import argparse
import logging

from bindscope.config.load import Config, default_config, load_config

log = logging.getLogger("bindscope")

EXIT_OK, EXIT_PROBLEM, EXIT_USAGE = 0, 1, 2


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit code 2 (no usage dump)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


class Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, but not "(default: None)" where the help text says it in words."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def load(path: str | None) -> Config:
    return load_config(path) if path else default_config()
