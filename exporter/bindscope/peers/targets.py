"""The peers to watch: the config's static targets and those of Prometheus file_sd files.

Each file is parsed again only when its stat changes; a file that cannot be read or
parsed keeps its last good targets (as Prometheus does) and is reported.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterable
from typing import Any

import yaml

from bindscope.config.load import MAX_PEERS, PeersConfig, split_target

MAX_FILE = 1 << 20

_StatKey = tuple[int, int, int, int]  # device, inode, size, mtime_ns


class FileSDError(ValueError):
    pass


def parse_file_sd(text: str, path: str) -> tuple[str, ...]:
    """The targets of a file_sd file: `[{"targets": [...], "labels": {...}}, ...]`."""
    try:
        doc: Any = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError, RecursionError) as e:
        raise FileSDError(
            f"{path}: not {'JSON' if path.endswith('.json') else 'YAML'}: {e}"
        ) from None
    if doc is None:
        return ()
    if not isinstance(doc, list):
        raise FileSDError(f"{path}: expected a list of target groups")
    out: list[str] = []
    for i, group in enumerate(doc):
        if not isinstance(group, dict) or not isinstance(group.get("targets"), list):
            raise FileSDError(f"{path}: [{i}]: expected {{targets: [...], labels: {{...}}}}")
        for t in group["targets"]:
            if not isinstance(t, str):
                raise FileSDError(f"{path}: [{i}].targets: {t!r} is not HOST:PORT")
            try:
                split_target(t)
            except ValueError as e:
                raise FileSDError(f"{path}: [{i}].targets: {e}") from None
            out.append(t)
    return tuple(out)


class TargetList:
    def __init__(self) -> None:
        self._files: dict[str, tuple[_StatKey, tuple[str, ...]]] = {}

    def resolve(self, config: PeersConfig) -> tuple[tuple[str, ...], list[tuple[str, str]]]:
        """Every target once, in order, at most MAX_PEERS; and (file, message) per bad file."""
        errors: list[tuple[str, str]] = []
        found: list[str] = list(config.targets)
        seen_files: set[str] = set()
        for path in _expand(config.file_sd):
            seen_files.add(path)
            try:
                found.extend(self._read(path))
            except FileSDError as e:
                errors.append((path, str(e)))
                found.extend(self._files.get(path, ((0, 0, 0, 0), ()))[1])
        for gone in set(self._files) - seen_files:
            del self._files[gone]
        targets = tuple(dict.fromkeys(found))
        if len(targets) > MAX_PEERS:
            errors.append(("file_sd", f"{len(targets)} peers; the first {MAX_PEERS} are watched"))
        return targets[:MAX_PEERS], errors

    def _read(self, path: str) -> tuple[str, ...]:
        try:
            st = os.stat(path)
            key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            cached = self._files.get(path)
            if cached is not None and cached[0] == key:
                return cached[1]
            if st.st_size > MAX_FILE:
                raise FileSDError(f"{path}: larger than {MAX_FILE} bytes")
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read(MAX_FILE + 1)
        except OSError as e:
            raise FileSDError(f"{path}: {e.strerror}") from None
        targets = parse_file_sd(text, path)
        self._files[path] = (key, targets)
        return targets


def _expand(patterns: Iterable[str]) -> list[str]:
    """Plain paths as given (a missing one is an error to report); a * globs."""
    out: list[str] = []
    for p in patterns:
        out.extend(sorted(glob.glob(p)) if "*" in os.path.basename(p) else [p])
    return list(dict.fromkeys(out))
