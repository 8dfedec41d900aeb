"""The method's stages, in order: the one list every runner derives from.

    images -> image_scores -> select_image -> instructions -> responses[<model>] ... -> response_scores
           -> [judge] -> pairs

`pipeline.build_dataset` applies them in turn, `capacity.simulate` stands a sleeping pool in for each
model stage, `capacity.calibrate` runs each alone on the rows the one before it gave, and `capacity.plan`
sizes the GPU pools they name. Each stage declares what it reads and writes: the data contract, column by
column (DESIGN.md), which the tiny run checks against what appears.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from synthalign_ray.engines.vllm_engine import block_task
from synthalign_ray.stages.image_scores import SCORE_COLUMNS, ImageScorer, ImageSelector
from synthalign_ray.stages.images import ImageGenerator
from synthalign_ray.stages.instructions import INSTRUCTION_FIELDS, add_instructions
from synthalign_ray.stages.judge import JUDGE_FIELDS, add_judge_scores
from synthalign_ray.stages.pairs import PAIR_FIELDS, PairBuilder
from synthalign_ray.stages.response_scores import RESPONSE_SCORE_COLUMNS, ResponseScorer
from synthalign_ray.stages.responses import RESPONSES_FIELD, add_model_responses

# How a stage runs: an autoscaling pool of model actors (torch), a ray.data.llm vLLM processor, a chat
# stage (vLLM or an OpenAI-compatible endpoint), or model-free Ray tasks on whole blocks.
Kind = Literal["actor_pool", "vllm", "chat", "task"]


@dataclass(frozen=True)
class Stage:
    name: str  # the method's word; `responses[<model name>]` per answerer
    kind: Kind
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    apply: Callable[[Any], Any]  # Ray Dataset -> Ray Dataset
    pool_path: str | None = None  # dotted config path of its GPU stage (the pool is at PATH.pool), else None
    pool: Any = None  # that pool's config
    profile_name: str | None = None  # its name in a capacity profile, for a GPU stage
    # The Ray Data operators that are this stage's (`progress.method_stage_rows`): the classes and functions
    # it maps, and `[label]` for those `engines.vllm_engine.labelled` named after it (its vLLM processor's,
    # capacity.simulate's stand-in).
    operators: tuple[str, ...] = ()
    # What decides its output besides its inputs: its config (pools aside, `checkpoints.fingerprints`).
    settings: Any = None
    # For an answerer, its model's name: of the answers in `responses`, those with this `model` are its.
    answerer: str | None = None

    @property
    def committed(self) -> bool:
        """Whether its output is kept in the stage store (`checkpoints`): a model's work is; a model-free
        task is cheaper to run again than to read back."""
        return self.kind != "task"


class FileContent:
    """A file a stage reads, which its fingerprint covers by content: a moved file is the same input, an
    edited one is not (`checkpoints.fingerprints` calls `digest`; not a dataclass, which pydantic would
    serialize field by field)."""

    def __init__(self, path: str):
        self.path = path

    def digest(self) -> str:
        import hashlib

        from synthalign_ray import store

        fs, path = store.filesystem(self.path)
        digest = hashlib.sha256()
        with fs.open_input_stream(path) as stream:
            while chunk := stream.read(1 << 20):
                digest.update(chunk)
        return digest.hexdigest()


def _actor_pool(cls, cfg) -> Callable[[Any], Any]:
    return lambda ds: ds.map_batches(cls, fn_constructor_kwargs={"cfg": cfg}, **cfg.pool.map_batches_kwargs())


def build(cfg) -> list[Stage]:
    """The stages of a `SynthAlignConfig`, in pipeline order."""
    images = Stage(
        "images", "actor_pool", ("id", "t2i_prompt", "seed"), tuple(f.name for f in ImageGenerator.output_fields),
        _actor_pool(ImageGenerator, cfg.images), "images", cfg.images.pool, "images", ("ImageGenerator", "[images]"),
        cfg.images,
    )
    score_columns = tuple(cfg.image_scores.score_columns())
    image_scores = Stage(
        "image_scores", "actor_pool", ("t2i_prompt", "candidate_images"), score_columns,
        _actor_pool(ImageScorer, cfg.image_scores), "image_scores", cfg.image_scores.pool, "image_scores",
        ("ImageScorer", "[image_scores]"), cfg.image_scores.model_dump(exclude={"select_by"}),  # select_image's setting
    )
    select_by = SCORE_COLUMNS[cfg.image_scores.select_by]
    select_image = Stage(
        "select_image", "task", ("candidate_images", select_by), tuple(f.name for f in ImageSelector.output_fields),
        lambda ds: ds.map_batches(**block_task(ImageSelector(select_by))), operators=("ImageSelector",), settings=select_by,
    )
    stages = [images, image_scores, select_image, _instructions(cfg)]
    for index, model in enumerate(cfg.responses.models):
        stages.append(
            Stage(
                f"responses[{model.name}]", "vllm", ("instruction", "image", "seed"), (RESPONSES_FIELD.name,),
                lambda ds, index=index: add_model_responses(ds, cfg.responses, index, run_seed=cfg.seed),
                f"responses.models.{index}", model.pool, model.name, (f"[{model.name}]",),
                {"model": model, "continue_on_error": cfg.responses.continue_on_error}, model.name,
            )
        )
    stages.append(
        Stage(
            "response_scores", "actor_pool", ("instruction", "responses"), RESPONSE_SCORE_COLUMNS,
            _actor_pool(ResponseScorer, cfg.response_scores), "response_scores", cfg.response_scores.pool, "response_scores",
            ("ResponseScorer", "[response_scores]"), cfg.response_scores,
        )
    )
    if cfg.judge is not None:
        on_vllm = cfg.judge.model.backend == "vllm"
        stages.append(
            Stage(
                "judge", "chat", ("image", "instruction", "responses", "t2i_prompt", "category"), tuple(f.name for f in JUDGE_FIELDS),
                lambda ds: add_judge_scores(ds, cfg.judge, run_seed=cfg.seed),
                "judge.model" if on_vllm else None, cfg.judge.model.pool if on_vllm else None, "judge" if on_vllm else None,
                ("[judge]",), cfg.judge,
            )
        )
    ranked_by = {"reward": ("response_scores",), "judge": ("judge_scores",), "mix": ("response_scores", "judge_scores")}
    stages.append(
        Stage(
            "pairs", "task", ("instruction", "image", "responses", *ranked_by[cfg.pairs.rank_by]), tuple(f.name for f in PAIR_FIELDS),
            lambda ds: ds.map_batches(**block_task(PairBuilder(cfg.pairs))), operators=("PairBuilder",), settings=cfg.pairs,
        )
    )
    return stages


def _instructions(cfg) -> Stage:
    instructions = cfg.instructions
    writes = tuple(f.name for f in INSTRUCTION_FIELDS)
    apply = lambda ds: add_instructions(ds, instructions, run_seed=cfg.seed)  # noqa: E731
    operators = ("InstructionWriter", "[instructions]")
    if instructions.source != "llm":
        reads = ("id",) if instructions.source == "file" else ("id", "t2i_prompt", "category")
        settings = {"config": instructions.model_dump(exclude={"path"}), "file": FileContent(instructions.path)} if instructions.path else instructions
        return Stage("instructions", "task", reads, writes, apply, operators=operators, settings=settings)
    reads = ("id", "t2i_prompt", "category", *(("image",) if instructions.llm_sees_image else ()))
    if instructions.llm.backend != "vllm":
        return Stage("instructions", "chat", reads, writes, apply, operators=operators, settings=instructions)
    return Stage(
        "instructions", "chat", reads, writes, apply, "instructions.llm", instructions.llm.pool, "instructions", operators, instructions
    )
