"""The package's layers (docs/architecture.md) hold: a module imports only modules of its own layer or
below, the zoo is reached through the shared base, and engines know nothing of rows. Read with `ast`
from the source (every import, function-level ones included), so it fails on the commit that breaks it.

The few imports that break a rule today are listed in KNOWN_BREACHES with the reason: the list can only
shrink (a listed import that is gone fails the test too, so the list stays true)."""

import ast
from pathlib import Path

from tests.conftest import REPO

PACKAGE = REPO / "synthalign_ray"

# Layers, bottom up. A module's layer is that of its longest listed prefix.
LAYERS = [
    # 0, the shared base: row status, strict configs, model references, Ray's private API, formats of one
    # value (an HF image, a LLaVA conversation), ids, progress, pure selection; the zoo and the model code
    # behind the references.
    {"base", "errors", "ray_private", "hf_image", "ids", "progress", "selection", "formats.llava_conversation",
     "lockfile", "_torchvision_compat", "zoo", "models", "hub"},
    # 1, data: the run folder's shards and manifest, its lease, and repairing it.
    {"store", "repair"},
    # 2, engines: vLLM behind Ray Data.
    {"engines"},
    # 3, stages, and the run config made of their configs.
    {"stages", "config"},
    # 4, what runs beside a generation: Ray start-up and waves, training, evaluation, reports, formats.
    {"runtime", "accounting", "checkpoints", "generations", "train", "evaluate", "report", "formats"},
    # 5, the generation pipeline.
    {"pipeline"},
    # 6, capacity: plan, simulate, calibrate.
    {"capacity"},
    # 7, the face.
    {"cli", "console", "__main__"},
]

# The modules that may import the zoo: the base (model references resolve through it), the zoo itself
# and the CLI's `zoo` command. The zoo builds its twins with the model code (`models`), not the reverse.
ZOO_IMPORTERS = ("base", "zoo", "cli")

KNOWN_BREACHES = {
    # The `prompts` command's driver (check, start Ray, run, write the file) sits in its stage module.
    ("stages.topic_prompts", "runtime"),
    # simulate writes made-up prompts from the zoo's word list.
    ("capacity.simulate", "zoo"),
    # The ImageReward loader builds its BERT vocab with the zoo's WordPiece helper, and the zoo builds
    # its ImageReward twin with the loader's modules: one cycle.
    ("models.image_reward", "zoo"),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts) or "__init__"


def imports(path: Path) -> set[str]:
    """The package's modules this file imports, without the `synthalign_ray.` prefix."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "synthalign_ray":
            if node.module == "synthalign_ray":
                found |= {alias.name for alias in node.names}
            else:
                found.add(node.module.removeprefix("synthalign_ray."))
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("synthalign_ray.") for a in node.names if a.name.startswith("synthalign_ray.")}
    return found


def layer(module: str) -> int:
    best, best_len = None, -1
    for rank, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = rank, len(prefix)
    assert best is not None, f"{module} is in no layer: add it to LAYERS and docs/architecture.md"
    return best


def within(module: str, prefixes) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def breaches() -> set[tuple[str, str]]:
    found = set()
    for path in PACKAGE.rglob("*.py"):
        source = module_name(path)
        if source == "__init__":
            continue
        for target in imports(path) - {source}:
            if layer(target) > layer(source):
                found.add((source, target))
            elif within(target, ["zoo"]) and not within(source, ZOO_IMPORTERS):
                found.add((source, "zoo"))
    return found


def test_every_import_points_down_or_sideways():
    assert breaches() - KNOWN_BREACHES == set()


def test_known_breaches_are_still_there():
    assert KNOWN_BREACHES - breaches() == set(), "a known breach is mended: remove it from KNOWN_BREACHES"


def test_engines_know_nothing_of_rows():
    """No engine module imports a stage, the store or the row status constants."""
    offenders = []
    for path in (PACKAGE / "engines").glob("*.py"):
        for target in imports(path):
            if within(target, ["stages", "store", "config"]):
                offenders.append(f"{path.name} imports {target}")
        if "STATUS_" in path.read_text():
            offenders.append(f"{path.name} names a row status")
    assert offenders == []


def test_store_imports_no_stage_and_report_no_pipeline():
    offenders = [
        f"{module_name(path)} -> {target}"
        for path in PACKAGE.rglob("*.py")
        for target in imports(path)
        if (within(module_name(path), ["store"]) and within(target, ["stages", "engines"]))
        or (within(module_name(path), ["report", "train", "evaluate"]) and within(target, ["pipeline", "cli"]))
    ]
    assert offenders == []
