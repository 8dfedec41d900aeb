"""Builds and runs the Ray Data graph of a config: one row per prompt, streamed through actor pools.

    prompts.parquet -> ImageGenerator (pool) -> ImageScorer (pool) -> ImageSelector (tasks)
                    -> StatusSplitDatasink (images/, failed/)

Every selection is row-local (the K candidates sit in list columns of their row), so there is no
groupby, shuffle or driver-side collect: memory stays flat as the prompt count grows.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from synthalign_ray import store, zoo
from synthalign_ray.config import SynthAlignConfig
from synthalign_ray.stages.common import STATUS_FAILED, STATUS_OK
from synthalign_ray.stages.image_scores import SCORE_COLUMNS, ImageScorer, ImageSelector
from synthalign_ray.stages.images import ImageGenerator
from synthalign_ray.stages.prompts import prompts_table, read_prompts

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    output: str
    counts: dict[str, Any]
    seconds: float
    manifest: dict[str, Any] = field(repr=False)


def model_refs(cfg: SynthAlignConfig) -> dict[str, str]:
    refs = {"images.model": cfg.images.model, "image_scores.model": cfg.image_scores.model}
    for key in ("tokenizer", "clip", "blip"):
        if getattr(cfg.image_scores, key):
            refs[f"image_scores.{key}"] = getattr(cfg.image_scores, key)
    return refs


def prepare_zoo_models(cfg: SynthAlignConfig) -> None:
    """Build the zoo models a config names once, on the driver, before any actor races to do it."""
    for ref in model_refs(cfg).values():
        zoo.resolve(ref)


def build_dataset(cfg: SynthAlignConfig, prompts_uri: str):
    import ray

    ds = ray.data.read_parquet(prompts_uri)
    ds = ds.map_batches(ImageGenerator, fn_constructor_kwargs={"cfg": cfg.images}, **cfg.images.pool.map_batches_kwargs())
    ds = ds.map_batches(
        ImageScorer, fn_constructor_kwargs={"cfg": cfg.image_scores}, **cfg.image_scores.pool.map_batches_kwargs()
    )
    selector = ImageSelector(SCORE_COLUMNS[cfg.image_scores.select_by])
    return ds.map_batches(selector, batch_format="pyarrow", zero_copy_batch=True)


def init_ray(cfg: SynthAlignConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    env = {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")} | cfg.resources.env
    if "SYNTHALIGN_ZOO" in os.environ:  # workers must find the same zoo as the driver
        env.setdefault("SYNTHALIGN_ZOO", os.environ["SYNTHALIGN_ZOO"])
    joining = cfg.resources.ray_address is not None or "RAY_ADDRESS" in os.environ  # e.g. under `ray job submit`
    ray.init(
        address=cfg.resources.ray_address,
        num_cpus=None if joining else cfg.resources.num_cpus,  # a running cluster's CPUs are its own
        runtime_env={"env_vars": env},
        log_to_driver=True,
    )


def generate(cfg: SynthAlignConfig, output: str, *, config_source: str | None = None) -> RunResult:
    """Run the pipeline of `cfg` into `output` (a folder or URI) and write its manifest."""
    import ray

    started = time.time()
    rows, bad_rows = read_prompts(cfg.prompts, cfg.seed)
    for bad in bad_rows:
        log.warning("%s: skipped %s", cfg.prompts.path, bad)
    # Resume: rows completed by an earlier run of this output are kept and skipped; rows that failed
    # then are tried again (their old records are removed first, so no id is written twice).
    done = store.committed_ids(output)
    retried = store.remove_shards(store.join(output, store.FAILED_DIR))
    todo = [row for row in rows if row["id"] not in done]
    if done:
        log.info("resuming %s: %d rows already completed, %d to do (%d failed shards retried)", output, len(done), len(todo), retried)
    prompts_uri = store.join(output, store.PROMPTS_FILE)
    store.write_table(prompts_uri, prompts_table(todo))
    prepare_zoo_models(cfg)
    init_ray(cfg)

    sink = store.StatusSplitDatasink(output)
    if todo:
        build_dataset(cfg, prompts_uri).write_datasink(sink)
    counts = {
        "input_rows": len(rows) + len(bad_rows),
        "rejected_input_rows": len(bad_rows),
        "rows": len(rows),
        "completed": len(done & {row["id"] for row in rows}) + sink.counts[STATUS_OK],
        "completed_this_run": sink.counts[STATUS_OK],
        "failed": sink.counts[STATUS_FAILED],
    }
    manifest = {
        "config": cfg.model_dump(mode="json"),
        "config_source": config_source,
        "models": model_refs(cfg),
        "versions": store.package_versions(),
        "counts": counts,
        "rejected_inputs": [{"line": b.line, "reason": b.reason} for b in bad_rows],
        "ray_version": ray.__version__,
        "seconds": round(time.time() - started, 2),
        "outputs": {"completed": store.OK_DIR, "failed": store.FAILED_DIR, "prompts": store.PROMPTS_FILE},
    }
    store.write_json(store.join(output, store.MANIFEST), manifest)
    return RunResult(output=output, counts=counts, seconds=manifest["seconds"], manifest=manifest)
