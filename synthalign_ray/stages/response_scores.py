"""Response scores: a reward model scores every LVLM answer to the row's instruction (paper step 6).

Paper section 3.3 (eq. 9-10): Llama-3-8B-ArmoRM rates each response y_j to the instruction (text only:
the image is not shown to the reward model); the highest and lowest scores later become `chosen` and
`rejected` (selection.py). ArmoRM is read the way its model card uses it: the tokenizer's chat template
over [user: instruction, assistant: answer], `output.score` as the overall preference, and
`output.rewards` (batch, 19) as the per-objective breakdown, of which the paper names the five
HelpSteer ones (helpfulness, correctness, coherence, complexity, verbosity). Any single-label
`AutoModelForSequenceClassification` reward model works too: its `logits[:, 0]` is the score.

Only valid answers are scored (no error, finish_reason != "error", non-empty text); an invalid answer
gets a null score and so can never be chosen or rejected. Answers are scored in length-sorted
micro-batches, right-padded with the model config's own pad id (ArmoRM finds each answer's last token
as "the token before the first pad"), so padding never changes which token is scored; the score of an
answer does not depend on the other answers it was batched with (up to float rounding).

ArmoRM ships its own modeling code (`auto_map` in config.json), which no longer imports under transformers 5.
A folder whose `architectures` names ArmoRM's class loads into synthalign_ray.models.armorm instead, from the
same files and without running their code. Any other folder with `auto_map` is refused unless
`response_scores.trust_remote_code: true`: its config may say `model_type: llama`, and then transformers
does NOT fail without remote code, it silently builds a plain `LlamaForSequenceClassification` with a
random head. Any load that leaves weights freshly initialised is refused too.
"""

from __future__ import annotations

import json
import logging
import math
import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
from pydantic import Field, field_validator, model_validator

from synthalign_ray.stages.common import ActorPoolConfig, RowStage
from synthalign_ray.base import ZOO_PREFIX, ModelRef, StrictModel, local_model_folder, resolve_model_path, split_revision

log = logging.getLogger(__name__)

# The columns the stage adds: a score per answer, the objectives behind it where the model gives them, the model.
RESPONSE_SCORE_COLUMNS = ("response_scores", "response_objectives", "reward_model")
# The paper's five criteria (ArmoRM's HelpSteer objectives), recorded beside the overall score.
DEFAULT_OBJECTIVES = ["helpfulness", "correctness", "coherence", "complexity", "verbosity"]
# A short objective name prefers this source among the model's objectives ("helpfulness" is both
# "helpsteer-helpfulness" and "ultrafeedback-helpfulness" in ArmoRM).
PREFERRED_OBJECTIVE_SOURCE = "helpsteer"
# ArmoRM's architecture name: such a folder loads into synthalign_ray.models.armorm, never through its own code.
ARMO_ARCHITECTURE = "LlamaForRewardModelWithGating"
# RLHFlow/ArmoRM-Llama3-8B-v0.1's 19 reward objectives in head order, from its model card (config.json has none).
ARMO_OBJECTIVES = [
    "helpsteer-helpfulness",
    "helpsteer-correctness",
    "helpsteer-coherence",
    "helpsteer-complexity",
    "helpsteer-verbosity",
    "ultrafeedback-overall_score",
    "ultrafeedback-instruction_following",
    "ultrafeedback-truthfulness",
    "ultrafeedback-honesty",
    "ultrafeedback-helpfulness",
    "beavertails-is_safe",
    "prometheus-score",
    "argilla-overall_quality",
    "argilla-judge_lm",
    "code-complexity",
    "code-style",
    "code-explanation",
    "code-instruction-following",
    "code-readability",
]
# Probe conversation scored once at load: proves the template, the model's output kind and shapes.
_PROBE = ("Describe the image.", "A dog runs in a park.")


class ResponseScoresConfig(StrictModel):
    model: ModelRef = Field(
        description="reward model: zoo:NAME, local folder or hub id (org/name[@REVISION]; paper: RLHFlow/ArmoRM-Llama3-8B-v0.1)"
    )
    trust_remote_code: bool = Field(
        False,
        description="run the model folder's own Python code (not needed for ArmoRM); only if you trust the folder",
    )
    input_format: Literal["chat", "template"] = Field(
        "chat", description="chat: the tokenizer's chat template over [user, assistant]; template: `template`"
    )
    template: str | None = Field(None, description="with input_format=template: text with {instruction} and {answer}")
    max_length: int | None = Field(
        None, ge=8, description="tokens per scored text (longer ones are truncated); None: the model's context"
    )
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    objectives: list[str] = Field(
        default_factory=lambda: list(DEFAULT_OBJECTIVES),
        description="per-objective rewards recorded when the model gives them (matched against its objective names)",
    )
    micro_batch_size: int = Field(16, ge=1, description="answers per forward pass")
    pool: ActorPoolConfig = Field(default_factory=lambda: ActorPoolConfig(batch_size=8))

    @field_validator("objectives")
    @classmethod
    def _distinct_objectives(cls, objectives: list[str]) -> list[str]:
        if any(not o.strip() for o in objectives):
            raise ValueError("objective names must be non-empty")
        if len(set(objectives)) != len(objectives):
            raise ValueError(f"objectives must be distinct, got {objectives}")
        return objectives

    @model_validator(mode="after")
    def _format_and_remote_code(self):
        if self.input_format == "template":
            if self.template is None:
                raise ValueError(
                    "input_format=template needs response_scores.template (with {instruction} and {answer})"
                )
            check_template(self.template)
        elif self.template is not None:
            raise ValueError("response_scores.template is only used with input_format=template")
        self.check_remote_code()
        return self

    def check_remote_code(self) -> None:
        """Refuse an untrusted model folder with its own code, if the folder is on disk already.

        Runs at validation; run it again after building zoo models or fetching hub models (before any
        actor starts). The actor checks once more at load, when the folder is certainly there.
        """
        config_json = _local_config_json(self.model)
        if config_json is not None:
            check_remote_code(config_json, self.trust_remote_code, self.model)


# --- pure helpers ------------------------------------------------------------------------------------


def answer_is_valid(response: dict[str, Any] | None) -> bool:
    """An answer is scored only if it has no error, did not finish with "error", and has text."""
    if not response:
        return False
    if response.get("error"):
        return False
    if response.get("finish_reason") == "error":
        return False
    text = response.get("text")
    return isinstance(text, str) and bool(text.strip())


def check_template(template: str) -> str:
    """A scoring template must place the answer ({answer}) and may place the instruction; nothing else."""
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as e:  # unbalanced braces
        raise ValueError(
            f"response_scores.template is not a valid format string ({e}); write literal braces as {{{{ }}}}"
        ) from None
    if "answer" not in fields:
        raise ValueError("response_scores.template must contain {answer}")
    unknown = fields - {"instruction", "answer"}
    if unknown:
        raise ValueError(
            f"response_scores.template may use only {{instruction}} and {{answer}}, found {sorted(unknown)}"
            " (write literal braces as {{ }})"
        )
    return template


def render_template(template: str, instruction: str, answer: str) -> str:
    return template.format(instruction=instruction, answer=answer)


def chat_messages(instruction: str, answer: str) -> list[dict[str, str]]:
    """The conversation ArmoRM scores: the instruction as the user turn, the answer as the assistant turn."""
    return [{"role": "user", "content": instruction}, {"role": "assistant", "content": answer}]


def check_remote_code(config_json: dict[str, Any], trust_remote_code: bool, ref: str) -> None:
    """Refuse a model folder that ships its own code (`auto_map`) unless the config trusts it explicitly.

    ArmoRM's folders pass: the project's own module loads them (see the module docstring)."""
    auto_map = config_json.get("auto_map")
    if auto_map and not trust_remote_code and not is_armorm(config_json):
        classes = ", ".join(f"{k}: {v}" for k, v in sorted(auto_map.items()))
        raise ValueError(
            f"reward model {ref!r} ships its own code (config.json auto_map: {classes}); without it transformers "
            "would load a different class with randomly initialised weights. Set response_scores.trust_remote_code: "
            "true if you trust this folder's code."
        )


def is_armorm(config_json: dict[str, Any]) -> bool:
    return ARMO_ARCHITECTURE in (config_json.get("architectures") or [])


def resolve_objectives(requested: Sequence[str], available: Sequence[str]) -> list[int]:
    """Index in `available` (the model's objective names, in head order) of each requested objective.

    A name matches exactly ("helpsteer-helpfulness"), or as a short name by its part after the source
    prefix ("helpfulness"): HelpSteer's objective first (the paper's five), else the only one with that
    suffix. Unknown or ambiguous names raise a ValueError naming the choices.
    """
    indices = []
    for name in requested:
        if name in available:
            indices.append(list(available).index(name))
            continue
        preferred = f"{PREFERRED_OBJECTIVE_SOURCE}-{name}"
        if preferred in available:
            indices.append(list(available).index(preferred))
            continue
        matches = [i for i, full in enumerate(available) if full.endswith(f"-{name}")]
        if len(matches) == 1:
            indices.append(matches[0])
        elif matches:
            raise ValueError(
                f"response_scores.objectives: {name!r} is ambiguous; use one of {[available[i] for i in matches]}"
            )
        else:
            raise ValueError(
                f"response_scores.objectives: the model has no objective {name!r}; it has {list(available)}"
            )
    return indices


def model_objective_names(config_json: dict[str, Any], num_rewards: int) -> list[str] | None:
    """The names of a model's `rewards` columns: config `objective_names`, or ArmoRM's card list; None if unknown."""
    names = config_json.get("objective_names")
    if names:
        if len(names) != num_rewards:
            raise ValueError(
                f"config.json lists {len(names)} objective_names but the model gives {num_rewards} rewards"
            )
        return list(names)
    if is_armorm(config_json) and num_rewards == len(ARMO_OBJECTIVES):
        return list(ARMO_OBJECTIVES)
    return None


def scatter(valid: Sequence[bool], values: Sequence[Any]) -> list[Any]:
    """Values of the valid answers back in answer order, None for the invalid ones."""
    values = list(values)
    if len(values) != sum(bool(ok) for ok in valid):
        raise ValueError(f"{len(values)} values for {sum(bool(ok) for ok in valid)} valid answers")
    it = iter(values)
    return [next(it) if ok else None for ok in valid]


def _local_config_json(ref: str) -> dict[str, Any] | None:
    """config.json of a model that is already on disk (built zoo model, local folder, hub cache), else None."""
    path: Path | None = None
    folder = local_model_folder(ref)
    if folder is not None:
        path = folder / "config.json"
    elif not ref.startswith(ZOO_PREFIX):
        try:
            from huggingface_hub import try_to_load_from_cache

            repo_id, revision = split_revision(ref)
            cached = try_to_load_from_cache(repo_id, "config.json", revision=revision)
            path = Path(cached) if isinstance(cached, str) else None
        except Exception:
            path = None
    if path is None or not path.is_file():
        return None
    return json.loads(path.read_text())


# --- the stage ---------------------------------------------------------------------------------------


class ResponseScorer(RowStage):
    """Scores every valid answer of every row in a batch with one reward model."""

    name = "response_scores"

    def __init__(self, cfg: ResponseScoresConfig):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        super().__init__(cfg.pool.max_batch_retries, cfg.pool.crash_retries)
        self.cfg = cfg
        self.device = cfg.pool.torch_device(self.name)
        path = resolve_model_path(cfg.model)
        config_json = json.loads((Path(path) / "config.json").read_text())
        check_remote_code(config_json, cfg.trust_remote_code, cfg.model)

        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
        if is_armorm(config_json):
            from synthalign_ray.models.armorm import LlamaForRewardModelWithGating

            load, remote_code = LlamaForRewardModelWithGating.from_pretrained, {}
        else:
            load = AutoModelForSequenceClassification.from_pretrained
            remote_code = {"trust_remote_code": cfg.trust_remote_code}
        model, info = load(path, dtype=getattr(torch, cfg.dtype), output_loading_info=True, **remote_code)
        if info.get("missing_keys"):
            raise ValueError(
                f"reward model {cfg.model!r} loaded as {type(model).__name__} with freshly initialised weights "
                f"{sorted(info['missing_keys'])[:5]}: this is not the checkpoint's architecture"
            )
        self.model = model.to(self.device).eval()
        if cfg.input_format == "chat" and not self.tokenizer.chat_template:
            raise ValueError(
                f"tokenizer of {cfg.model!r} has no chat template; set response_scores.input_format: template"
            )
        # Right padding with the model's pad id: the ids the model itself uses to find each text's end.
        self.pad_id = self.model.config.pad_token_id
        if isinstance(self.pad_id, list):
            self.pad_id = self.pad_id[0]
        limits = [getattr(self.model.config, "max_position_embeddings", None), self.tokenizer.model_max_length]
        # None (no context length known anywhere): texts are not truncated.
        known = [x for x in limits if isinstance(x, int) and 0 < x < 10**7]  # tokenizers say 1e30 when unknown
        self.max_length = cfg.max_length or min(known, default=None)

        probe = self._forward([self._encode(*_PROBE)])
        self.num_rewards = None if probe["rewards"] is None else probe["rewards"].shape[1]
        self.objective_index: list[int] | None = None
        if self.num_rewards is not None and cfg.objectives:
            names = model_objective_names(config_json, self.num_rewards)
            if names is None:
                log.warning("%s: %s gives %d rewards but no objective names; response_objectives stays null",
                            self.name, cfg.model, self.num_rewards)
            else:
                self.objective_index = resolve_objectives(cfg.objectives, names)
        objective_type = pa.struct([pa.field(o, pa.float32()) for o in cfg.objectives])
        self.output_fields = [
            pa.field(RESPONSE_SCORE_COLUMNS[0], pa.list_(pa.float32())),
            pa.field(RESPONSE_SCORE_COLUMNS[1], pa.list_(objective_type)),
            pa.field(RESPONSE_SCORE_COLUMNS[2], pa.string()),
        ]

    # -- text -> ids

    def _text(self, instruction: str, answer: str) -> str:
        if self.cfg.input_format == "template":
            return render_template(self.cfg.template, instruction, answer)
        return self.tokenizer.apply_chat_template(chat_messages(instruction, answer), tokenize=False)

    def _encode(self, instruction: str, answer: str) -> list[int]:
        # The chat template already writes the BOS token: adding special tokens again would double it.
        add_special = self.cfg.input_format == "template"
        return self.tokenizer(
            self._text(instruction, answer),
            add_special_tokens=add_special,
            truncation=self.max_length is not None,
            max_length=self.max_length,
        )["input_ids"]

    def _check_prompt_fits(self, instruction: str) -> None:
        """A chat whose user turn fills max_length would be scored without a single answer token."""
        if self.cfg.input_format != "chat" or self.max_length is None:
            return
        prompt = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": instruction}], tokenize=False, add_generation_prompt=True
        )
        n = len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if n >= self.max_length:
            raise ValueError(
                f"instruction takes {n} tokens with the chat template, not less than response_scores.max_length "
                f"({self.max_length}): no answer token would be scored"
            )

    # -- model

    def _forward(self, batch: list[list[int]]) -> dict[str, Any]:
        import torch

        if self.pad_id is None and len(batch) > 1:  # nothing marks the end of a padded text: one at a time
            parts = [self._forward([ids]) for ids in batch]
            rewards = None if parts[0]["rewards"] is None else torch.cat([p["rewards"] for p in parts])
            return {"score": torch.cat([p["score"] for p in parts]), "rewards": rewards}
        width = max(len(ids) for ids in batch)
        pad = self.pad_id if self.pad_id is not None else 0
        input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids in batch], device=self.device)
        attention_mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in batch], device=self.device)
        with torch.inference_mode():
            output = self.model(input_ids=input_ids, attention_mask=attention_mask)
        score = getattr(output, "score", None)
        if score is None:
            logits = output.logits
            if logits.ndim != 2 or logits.shape[1] != 1:
                raise ValueError(
                    f"reward model {self.cfg.model!r} gives logits of shape {tuple(logits.shape)}: a reward model "
                    "needs one label (num_labels=1) or an ArmoRM-style `.score`"
                )
            score = logits[:, 0]
        score = score.reshape(len(batch), -1)
        if score.shape[1] != 1:
            raise ValueError(f"reward model {self.cfg.model!r} gives {score.shape[1]} scores per answer, expected 1")
        rewards = getattr(output, "rewards", None)
        return {
            "score": score[:, 0].float().cpu(),
            "rewards": None if rewards is None else rewards.reshape(len(batch), -1).float().cpu(),
        }

    def score_texts(self, encoded: list[list[int]]) -> tuple[list[float], list[list[float]] | None]:
        """Scores (and per-objective rewards) of tokenized texts, in length-sorted micro-batches."""
        order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i]), i))
        scores: list[float] = [math.nan] * len(encoded)
        rewards: list[list[float]] | None = [[] for _ in encoded] if self.objective_index is not None else None
        step = self.cfg.micro_batch_size
        for start in range(0, len(order), step):
            chunk = order[start : start + step]
            out = self._forward([encoded[i] for i in chunk])
            for j, i in enumerate(chunk):
                scores[i] = float(out["score"][j])
                if rewards is not None:
                    rewards[i] = [float(out["rewards"][j, k]) for k in self.objective_index]
        return scores, rewards

    def process(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        valid_per_row: list[list[bool]] = []
        encoded: list[list[int]] = []
        for row in rows:  # check every row before any forward pass: a bad row fails its batch fast
            instruction = row.get("instruction")
            if not isinstance(instruction, str) or not instruction.strip():
                raise ValueError("row has no instruction to score the answers against")
            responses = row.get("responses") or []
            valid = [answer_is_valid(r) for r in responses]
            if any(valid):
                self._check_prompt_fits(instruction)
            valid_per_row.append(valid)
            encoded.extend(self._encode(instruction, r["text"]) for r, ok in zip(responses, valid) if ok)
        scores, rewards = self.score_texts(encoded)
        out, start = [], 0
        for valid in valid_per_row:
            n = sum(valid)
            row_scores = scores[start : start + n]
            objectives = None
            if rewards is not None:
                objectives = scatter(valid, [dict(zip(self.cfg.objectives, r)) for r in rewards[start : start + n]])
            out.append(
                {
                    "response_scores": scatter(valid, row_scores),
                    "response_objectives": objectives,
                    "reward_model": self.cfg.model,
                }
            )
            start += n
        return out
