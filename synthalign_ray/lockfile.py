"""The install locks in `locks/` (written by `scripts/lock.sh` with `uv pip compile --generate-hashes`):
read them, cut them into the pieces `scripts/install.sh` installs one after the other, check them against
pyproject.toml's ranges, and compare an installed environment with the lock it was installed from.

Standard library only at import: install.sh runs it with the new venv's bare python, before anything
else is installed (`python -m synthalign_ray.lockfile select LOCK --only torch`). The range check uses
`packaging`, which the locked stack installs, and imports it where it is used.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import re
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

from synthalign_ray.errors import UserError

# The record install.sh leaves in the venv: which lock it installed, for `synthalign doctor`.
INSTALL_RECORD = "synthalign-lock.json"
# A lock entry starts at a column-0 `name==version` line; its `--hash` and `# via` lines follow, indented.
ENTRY_START = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>\S+)")


class LockError(UserError, ValueError):
    """A lock file that cannot be read, or does not agree with what it should."""


def normalize(name: str) -> str:
    """PEP 503's normalised project name, as lock files and installed metadata are compared by."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class LockEntry:
    name: str  # normalised
    version: str
    text: str  # the entry's lines as in the lock: the pin, its hashes, its `# via` comments


def read_lock(path: str | Path) -> dict[str, LockEntry]:
    """Every pinned package of a lock, by normalised name. A line that is neither a pin, a continuation
    nor a comment is an error naming the file and line."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as error:
        raise LockError(f"{path}: cannot read the lock ({error.strerror or error})") from None
    entries: dict[str, LockEntry] = {}
    current: list[str] = []
    start = 0

    def close() -> None:
        if current:
            match = ENTRY_START.match(current[0])
            name = normalize(match["name"])
            if name in entries:
                raise LockError(f"{path}:{start}: {name} is pinned twice")
            entries[name] = LockEntry(name, match["version"].rstrip("\\").strip(), "\n".join(current) + "\n")

    for number, line in enumerate(lines, 1):
        if ENTRY_START.match(line):
            close()
            current, start = [line], number
        elif line.startswith((" ", "\t")) and current:
            current.append(line)
        elif line.strip() and not line.lstrip().startswith("#"):
            raise LockError(f"{path}:{number}: not a `name==version` pin: {line.strip()[:80]}")
    close()
    if not entries:
        raise LockError(f"{path}: no pinned package")
    return entries


def select(entries: dict[str, LockEntry], only: list[str] | None = None, without: list[str] | None = None) -> str:
    """The lock's text for a subset of its entries (hashes kept, so pip's --require-hashes still holds).
    Every name asked for must be in the lock."""
    only_names = {normalize(n) for n in only} if only else None
    without_names = {normalize(n) for n in without or []}
    missing = sorted(((only_names or set()) | without_names) - entries.keys())
    if missing:
        raise LockError(f"not in the lock: {', '.join(missing)}")
    return "".join(
        e.text for e in entries.values() if (only_names is None or e.name in only_names) and e.name not in without_names
    )


def pyproject_requirements(pyproject: str | Path, extras: list[str]) -> list[str]:
    """pyproject.toml's dependencies plus those of the given extras, as written there."""
    project = tomllib.loads(Path(pyproject).read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in extras:
        try:
            requirements += project["optional-dependencies"][extra]
        except KeyError:
            raise LockError(f"{pyproject}: no extra {extra!r}") from None
    return requirements


def disagreements(entries: dict[str, LockEntry], requirements: list[str], environment: dict[str, str] | None = None) -> list[str]:
    """What a lock gets wrong against declared requirements: a dependency it does not pin, or pins
    outside the declared range. Requirements whose marker does not apply to `environment` (the lock's
    target: Linux, CPython 3.11) are skipped. Local version labels (torch's `+cpu`) satisfy a range on
    the public version, as pip decides too."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    problems = []
    for text in requirements:
        requirement = Requirement(text)
        if requirement.marker is not None and not requirement.marker.evaluate(environment or {}):
            continue
        entry = entries.get(normalize(requirement.name))
        if entry is None:
            problems.append(f"{requirement.name}: declared as {text!r}, not in the lock")
        elif not requirement.specifier.contains(Version(entry.version), prereleases=True):
            problems.append(f"{requirement.name}: the lock pins {entry.version}, outside {text!r}")
    return problems


def installed_drift(entries: dict[str, LockEntry]) -> list[tuple[str, str, str | None]]:
    """(name, locked version, installed version or None) for every locked package whose installed
    version differs, in this interpreter's environment."""
    drift = []
    for entry in entries.values():
        try:
            installed = importlib.metadata.version(entry.name)
        except importlib.metadata.PackageNotFoundError:
            installed = None
        if installed != entry.version:
            drift.append((entry.name, entry.version, installed))
    return drift


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_install_record(lock: str, device: str, prefix: str | Path = sys.prefix) -> None:
    """Record in a venv the lock install.sh installed into it (its path in the repo and its sha256)."""
    record = {"lock": lock, "sha256": file_sha256(lock), "device": device}
    (Path(prefix) / INSTALL_RECORD).write_text(json.dumps(record) + "\n")


def install_record(prefix: str | Path = sys.prefix) -> dict | None:
    """What install.sh wrote into this venv about the lock it installed (None: not installed by it)."""
    try:
        return json.loads((Path(prefix) / INSTALL_RECORD).read_text())
    except (OSError, ValueError):
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lockfile.py", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    pick = commands.add_parser("select", help="print a subset of a lock's entries, hashes included")
    pick.add_argument("lock")
    pick.add_argument("--only", nargs="+")
    pick.add_argument("--without", nargs="+")
    note = commands.add_parser("record", help="record in this interpreter's venv which lock was installed")
    note.add_argument("lock")
    note.add_argument("device")
    args = parser.parse_args(argv)
    try:
        if args.command == "record":
            write_install_record(args.lock, args.device)
        else:
            sys.stdout.write(select(read_lock(args.lock), args.only, args.without))
    except LockError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
