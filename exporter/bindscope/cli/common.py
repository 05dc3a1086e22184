"""What both command lines share: the argument parser, exit codes, config loading."""

from __future__ import annotations

import argparse
import logging

from bindscope.config.load import Config, ConfigError, default_config, load_config

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


class EmptyConfigPath(ConfigError):
    """`--config.file=` with nothing after it, as an unset variable in a unit file gives:
    a usage error, never the embedded default."""

    def __init__(self) -> None:
        super().__init__(())

    def __str__(self) -> str:
        return (
            "error: --config.file is empty: name a YAML file, or leave the flag out "
            "for the embedded default (no declared services)"
        )


def load(path: str | None) -> Config:
    """The config at `path`, the embedded default when no path is given; raises
    ConfigError (exit 2 in both programs) for a bad file or an empty path."""
    if path is None:
        return default_config()
    if not path.strip():
        raise EmptyConfigPath()
    return load_config(path)
