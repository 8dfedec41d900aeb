"""Generations of a run folder: the outputs of one config over the shared stage store.

    pairs/ dropped/ failed/ manifest.json report/    the current generation (what every reader reads)
    generations/<config fingerprint>/...             the generations of other configs, kept for comparison
    stages/                                          the stage store, shared by all (`checkpoints.py`)

A run whose config differs from the current generation's moves that generation whole into
`generations/<its fingerprint>/` and brings its own back from there if it has one (then it resumes it);
`manifest.json`'s `config_fingerprint` names the current one. The current generation stays at the top
so that `datasets.load_dataset("parquet", data_dir=RUN/pairs)`, `export`, `train` and `report` read a
fixed path. A move is a rename on a local or mounted disk, and a copy per shard on object storage.
A switch is written down first (`generations/switch.json`) and carried out in two idempotent phases,
so that a run or `gc` after a kill at any point finishes it instead of finding half of two generations.
`synthalign gc` removes the other generations and the stage-store folders the current one does not use.
"""

from __future__ import annotations

import logging
from typing import Any

from synthalign_ray import store
from synthalign_ray.errors import UserError
from synthalign_ray.store.lease import output_lease
from synthalign_ray.store.stage_store import STAGES_DIR, stage_folder

log = logging.getLogger(__name__)

GENERATIONS_DIR = "generations"
SWITCH_FILE = "switch.json"
# What a generation is: its outputs, its manifest and its report (the stage store is shared by all).
GENERATION_FILES = (*store.FOLDERS.values(), store.MANIFEST, "report")


class NotARunFolderError(UserError):
    """A folder with shards but no manifest, or none at all, where a run folder was expected."""


def current_manifest(output: str) -> dict[str, Any] | None:
    try:
        return store.read_json(store.join(output, store.MANIFEST))
    except FileNotFoundError:
        return None


def generation_folder(output: str, fingerprint: str) -> str:
    """Where the generation of config `fingerprint` is: the output itself if it is current, else its archive."""
    manifest = current_manifest(output)
    if manifest is None or manifest.get("config_fingerprint") == fingerprint:
        return output
    return store.join(output, GENERATIONS_DIR, fingerprint)


def start_generation(output: str, fingerprint: str, overwrite: bool) -> str | None:
    """Makes the output's current generation that of config `fingerprint`: `overwrite` removes what the
    output holds (current outputs and stage store); another config's generation moves to
    `generations/<its fingerprint>/`, and this config's own comes back from there, if there is one.
    The fingerprint of the generation moved away (by this call, or by the killed run it finishes), else None."""
    finished = finish_switch(output)
    previous = current_manifest(output)
    has_shards = any(store.list_shards(store.join(output, folder)) for folder in store.FOLDERS.values())
    if overwrite:
        for folder in store.FOLDERS.values():
            store.remove_shards(store.join(output, folder))
        store.remove_folder(store.join(output, STAGES_DIR))
        return None
    if has_shards and previous is None:
        raise NotARunFolderError(f"{output} holds shards but no {store.MANIFEST}: not a run folder of this tool? (--overwrite to replace)")
    if previous is None or previous.get("config_fingerprint") == fingerprint:
        return finished["archive"] if finished and finished["current"] == fingerprint else None
    old = previous.get("config_fingerprint")
    switch = {"archive": old, "current": fingerprint, "phase": "archive"}
    store.write_json(switch_record(output), switch)
    carry_out(output, switch)
    log.info("%s: config %s; the generation of config %s moved to %s", output, fingerprint, old, store.join(output, GENERATIONS_DIR, old))
    return old


def switch_record(output: str) -> str:
    return store.join(output, GENERATIONS_DIR, SWITCH_FILE)


def pending_switch(output: str) -> dict[str, str] | None:
    """The switch of generations a killed run or gc left unfinished, if any."""
    try:
        return store.read_json(switch_record(output))
    except FileNotFoundError:
        return None


def finish_switch(output: str) -> dict[str, str] | None:
    """Carries out the switch of generations written down in the switch record, if there is one: the
    current generation's files move to its archive, then the new config's archived files (if any) to
    the top. A move of files already moved is a no-op, and the record names the phase reached, so
    finishing again after a kill anywhere in here ends in the same folders. The switch finished, if any."""
    switch = pending_switch(output)
    if switch is not None:
        carry_out(output, switch)
    return switch


def carry_out(output: str, switch: dict[str, str]) -> None:
    """The moves of a switch of generations from the phase it names, then its record removed."""
    archive, own = (store.join(output, GENERATIONS_DIR, switch[key]) for key in ("archive", "current"))
    if switch["phase"] == "archive":
        for name in GENERATION_FILES:
            store.move_tree(store.join(output, name), store.join(archive, name))
        store.write_json(switch_record(output), {**switch, "phase": "restore"})
    for name in GENERATION_FILES:
        store.move_tree(store.join(own, name), store.join(output, name))
    store.remove_folder(own)
    store.delete_file(switch_record(output))


def collect_garbage(output: str, *, force_unlock: bool = False) -> dict[str, int]:
    """Removes the archived generations, and the stage-store folders that none of the current generation's
    stages use (`manifest.json`'s `checkpoints`), under the output's lease. Files removed, by kind."""
    manifest = current_manifest(output)
    if manifest is None and pending_switch(output) is None:
        raise NotARunFolderError(f"{output}: no {store.MANIFEST}; not a run folder of `synthalign generate`")
    stale_seconds = (manifest or {}).get("config", {}).get("resources", {}).get("lock_stale_seconds", 300)
    with output_lease(output, stale_seconds=stale_seconds, force=force_unlock):
        finish_switch(output)
        manifest = current_manifest(output)
        if manifest is None:
            raise NotARunFolderError(f"{output}: no {store.MANIFEST} after its last switch of configs; run `synthalign generate` again before gc")
        return remove_unused(output, manifest)


def remove_unused(output: str, manifest: dict[str, Any]) -> dict[str, int]:
    keep = {stage_folder(output, name, entry["fingerprint"]) for name, entry in manifest.get("checkpoints", {}).items()}
    removed = {"generations": count_files(store.join(output, GENERATIONS_DIR)), "stage_entries": 0}
    store.remove_folder(store.join(output, GENERATIONS_DIR))
    for stage in store.list_folders(store.join(output, STAGES_DIR)):
        for folder in store.list_folders(stage):
            if folder not in keep:
                removed["stage_entries"] += count_files(folder)
                store.remove_folder(folder)
    return removed


def count_files(uri: str) -> int:
    return len(store.list_shards(uri, suffix="", recursive=True))
