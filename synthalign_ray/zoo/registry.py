"""The zoo's registry: where models are built, how a build is made atomic, and `zoo:NAME` resolution."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

from synthalign_ray.errors import UserError

ZOO_PREFIX = "zoo:"
DEFAULT_SEED = 0
_DONE_MARKER = ".zoo-complete.json"
SCALES = ("tiny", "paper")
# The released config files the paper-scale builders read (their sources: paper_configs/README.md).
PAPER_CONFIGS = Path(__file__).parent / "paper_configs"
# Fillers that pad a twin's trained pieces up to a released vocabulary size: one private-use code point each
# (plane 15, which no text of ours holds), so text sampled from the whole vocabulary keeps its token count.
FILLER_FIRST_CODE_POINT = 0xF0000

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


class ZooError(UserError, ValueError):
    """A zoo build that cannot be made as asked (unknown paper-scale name, `layers` at tiny scale, bad device)."""


# name -> (builder(dest_dir, seed), one-line description). Builders write a complete model folder.
BUILDERS: dict[str, tuple[Callable[[Path, int], None], str]] = {}
# name -> (builder(dest_dir, seed, device, layers), one-line description): the released model's shapes, vocabulary
# sizes, dtype and files, random weights, made on `device`; `layers` (None: the real depth) caps every stack's depth.
PAPER_BUILDERS: dict[str, tuple[Callable[[Path, int, str, int | None], None], str]] = {}


def register(name: str, description: str):
    def wrap(fn: Callable[[Path, int], None]):
        BUILDERS[name] = (fn, description)
        return fn

    return wrap


def register_paper(name: str, description: str):
    def wrap(fn: Callable[[Path, int, str, int | None], None]):
        PAPER_BUILDERS[name] = (fn, description)
        return fn

    return wrap


def model_dir(name: str, seed: int = DEFAULT_SEED, *, scale: str = "tiny", layers: int | None = None) -> Path:
    """`NAME` (tiny) or `NAME-paper[-L{layers}]`, then `-seed{seed}` unless the seed is the default."""
    base = name if scale == "tiny" else f"{name}-paper" + ("" if layers is None else f"-L{layers}")
    return zoo_root() / (base if seed == DEFAULT_SEED else f"{base}-seed{seed}")


def is_built(name: str, seed: int = DEFAULT_SEED, *, scale: str = "tiny", layers: int | None = None) -> bool:
    return (model_dir(name, seed, scale=scale, layers=layers) / _DONE_MARKER).is_file()


def build(
    name: str,
    *,
    seed: int = DEFAULT_SEED,
    force: bool = False,
    scale: str = "tiny",
    device: str = "cpu",
    layers: int | None = None,
) -> Path:
    """Build zoo model `name` (if needed) and return its folder.

    scale="tiny": the tiny twin, made on the CPU. scale="paper": the released model's shapes and vocabulary sizes with
    random weights, made directly in the released dtype on `device` (e.g. "cuda"); `layers=N` caps the depth of every
    stack at N (widths, heads and vocabularies stay real) for tests.
    """
    marker = {"name": name, "seed": seed}
    if scale == "tiny":
        if name not in BUILDERS:
            raise KeyError(f"unknown zoo model {name!r}; known: {', '.join(sorted(BUILDERS))}")
        if layers is not None:
            raise ZooError(f"layers={layers}: only paper-scale builds take a depth (scale='paper')")
        if device != "cpu":
            raise ZooError(f"device={device!r}: tiny twins are built on the CPU; scale='paper' builds on a device")
        make = partial(BUILDERS[name][0], seed=seed)
    elif scale == "paper":
        if name not in PAPER_BUILDERS:
            raise ZooError(
                f"zoo model {name!r} has no paper-scale builder; paper scale: {', '.join(sorted(PAPER_BUILDERS))}"
            )
        if layers is not None and (isinstance(layers, bool) or not isinstance(layers, int) or layers < 1):
            raise ZooError(f"layers={layers!r}: must be a whole number >= 1")
        check_device(device)
        make = partial(PAPER_BUILDERS[name][0], seed=seed, device=device, layers=layers)
        marker |= {"scale": scale, "layers": layers}
    else:
        raise ZooError(f"scale={scale!r}: must be one of {', '.join(SCALES)}")
    dest = model_dir(name, seed, scale=scale, layers=layers)
    if (dest / _DONE_MARKER).is_file() and not force:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        make(tmp)
        (tmp / _DONE_MARKER).write_text(json.dumps(marker))
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


def check_device(device: str) -> None:
    """Refuse, with one line, a device torch cannot allocate on here (e.g. "cuda" on a machine without a GPU)."""
    import torch

    try:
        kind = torch.device(device)
        if kind.type == "cuda" and (kind.index or 0) >= (torch.cuda.device_count() if torch.cuda.is_available() else 0):
            raise RuntimeError(f"{torch.cuda.device_count()} CUDA GPU(s) visible")
        if kind.type == "meta":
            raise RuntimeError("meta tensors hold no weights to save")
        torch.empty(1, device=kind)
    except (RuntimeError, AssertionError, ValueError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ZooError(f"device {device!r} is not usable on this machine: {reason}") from err


@contextmanager
def building_on(device: str, dtype) -> Iterator[None]:
    """Modules constructed inside are made on `device` in `dtype` (torch's default device and dtype, restored after):
    a paper-scale model is made once, in its released dtype, with no float32 copy on the host first."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def paper_config(*path: str) -> dict:
    """A released config file from paper_configs/, as a dict."""
    return json.loads(PAPER_CONFIGS.joinpath(*path).read_text())


def capped(depth: int, layers: int | None) -> int:
    """A stack's depth: the released `depth`, or `layers` where that is smaller."""
    return depth if layers is None else min(depth, layers)
