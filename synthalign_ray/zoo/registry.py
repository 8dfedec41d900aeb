"""The zoo's registry: where models are built, how a build is made atomic, and `zoo:NAME` resolution."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

ZOO_PREFIX = "zoo:"
DEFAULT_SEED = 0
_DONE_MARKER = ".zoo-complete.json"

# A fixed English corpus for offline tokenizers: every tokenizer in the zoo is trained on it, so tiny
# models tokenize real words into real sub-word pieces (a degenerate tokenizer fails the zoo tests).
CORPUS = """
a an the of in on at with and or to from by for over under near next behind between across through
is are was were be been has have had do does did can could will would should may might must
what which who where when why how describe explain tell me about this that these those image picture
photo scene shows showing there here it its they them their he she his her we you your i my our
man woman person people child children boy girl elderly couple family friends student teacher worker
dog cat bird birds duck ducks horse cow fish animal animals tree trees flower flowers grass garden park
city street road bridge train metro bus car bicycle boat airplane station building house school
classroom library office factory kitchen table chair window door wall floor roof sky cloud clouds sun
rain snow storm weather wind fog river lake sea ocean beach mountain hill forest field farm desert
art painting sculpture museum music guitar piano book books paper pen computer phone screen
red blue green yellow orange purple black white gray brown pink golden silver bright dark colorful
big small large tiny tall short old young new beautiful quiet busy crowded empty happy sad calm
sitting standing walking running riding eating drinking reading writing playing feeding watching
painting cooking working crossing flying swimming holding carrying looking smiling talking
morning evening night day sunset sunrise winter summer autumn spring industrial modern ancient
detailed realistic style cartoon watercolor oil digital illustration photograph high quality
one two three four five many several some all each every no not yes very more most less
answer question please briefly detail details object objects color colors count number visible
""".split()


def zoo_root() -> Path:
    return Path(os.environ.get("SYNTHALIGN_ZOO", Path.home() / ".cache" / "synthalign" / "zoo"))


# name -> (builder(dest_dir, seed), one-line description). Builders write a complete model folder.
BUILDERS: dict[str, tuple[Callable[[Path, int], None], str]] = {}


def register(name: str, description: str):
    def wrap(fn: Callable[[Path, int], None]):
        BUILDERS[name] = (fn, description)
        return fn

    return wrap


def model_dir(name: str, seed: int = DEFAULT_SEED) -> Path:
    return zoo_root() / (name if seed == DEFAULT_SEED else f"{name}-seed{seed}")


def is_built(name: str, seed: int = DEFAULT_SEED) -> bool:
    return (model_dir(name, seed) / _DONE_MARKER).is_file()


def build(name: str, *, seed: int = DEFAULT_SEED, force: bool = False) -> Path:
    """Build zoo model `name` (if needed) and return its folder."""
    if name not in BUILDERS:
        raise KeyError(f"unknown zoo model {name!r}; known: {', '.join(sorted(BUILDERS))}")
    dest = model_dir(name, seed)
    if is_built(name, seed) and not force:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        BUILDERS[name][0](tmp, seed)
        (tmp / _DONE_MARKER).write_text(json.dumps({"name": name, "seed": seed}))
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def build_all(*, seed: int = DEFAULT_SEED, force: bool = False) -> dict[str, Path]:
    return {name: build(name, seed=seed, force=force) for name in sorted(BUILDERS)}


def resolve(ref: str) -> str:
    """`zoo:NAME` -> the built folder (building it on first use); anything else is returned as is."""
    if ref.startswith(ZOO_PREFIX):
        return str(build(ref[len(ZOO_PREFIX) :]))
    return ref


def seeded_torch(seed: int):
    import torch

    torch.manual_seed(seed)
    return torch
