"""Pairs: the best and the worst valid answer of each row become its preference pair (paper eq. 10).

chosen = argmax of the ranking score, rejected = argmin, among valid answers only (finite score, no
error, non-empty text within the length bounds; see `selection.select_pair`). The ranking score is
`rank_by`: the reward model's `response_scores` (the paper), the image-aware judge's `judge_scores`
(stages/judge.py), or a mix of both (`selection.ranking_scores`); `margin` is in its units.
A row that cannot give
a pair is dropped (status `dropped`) with a `drop_reason` from `selection.DROP_REASONS` and nulls in
the pair columns, so `pairs/` holds trainable rows only.

Besides the audit columns (`chosen_model`, `rejected_model`, `chosen_index`, `rejected_index`,
`margin`, `chosen_text`, `rejected_text`), the stage writes TRL's vision preference columns, so that

    datasets.load_dataset("parquet", data_files="RUN/pairs/*.parquet", split="train")

feeds `trl.DPOTrainer` with a vision-language model and no conversion code (TRL 1.16,
`DataCollatorForVisionPreference`):
  images    list of one image, the HF Image struct {bytes, path} (datasets `List(Image())`)
  prompt    [{"role": "system", ...} (optional), {"role": "user", "content": [{"type": "image"},
            {"type": "text", "text": instruction}]}]
  chosen    [{"role": "assistant", "content": [{"type": "text", "text": chosen answer}]}]
  rejected  the same with the rejected answer
Every message has the Arrow type MESSAGE_TYPE: content parts are one struct {type, text}, so the image
placeholder part carries `text: null` (the layout of TRL's own vision preference datasets). TRL fills
the placeholder with the row's image; the placeholder must not have an `image` key, which is why the
part struct has no `image` field.

Pure (no model): runs as Ray tasks, `ds.map_batches(PairBuilder(cfg), batch_format="pyarrow",
zero_copy_batch=True)`, like `ImageSelector`.
"""

from __future__ import annotations

from typing import Any, Literal

import pyarrow as pa
from pydantic import Field, model_validator

from synthalign_ray import selection
from synthalign_ray.stages.common import RowStage
from synthalign_ray.base import StrictModel
from synthalign_ray.store import IMAGE_TYPE

# A message's content part: {"type": "image", "text": null} or {"type": "text", "text": "..."}.
CONTENT_PART_TYPE = pa.struct([("type", pa.string()), ("text", pa.string())])
MESSAGE_TYPE = pa.struct([("role", pa.string()), ("content", pa.list_(CONTENT_PART_TYPE))])
CONVERSATION_TYPE = pa.list_(MESSAGE_TYPE)
IMAGES_TYPE = pa.list_(IMAGE_TYPE)

# The columns PairBuilder adds (`drop_reason` already exists: every stage's status columns).
PAIR_FIELDS = [
    pa.field("chosen_model", pa.string()),
    pa.field("rejected_model", pa.string()),
    pa.field("chosen_index", pa.int32()),
    pa.field("rejected_index", pa.int32()),
    pa.field("margin", pa.float32()),
    pa.field("chosen_text", pa.string()),
    pa.field("rejected_text", pa.string()),
    pa.field("images", IMAGES_TYPE),
    pa.field("prompt", CONVERSATION_TYPE),
    pa.field("chosen", CONVERSATION_TYPE),
    pa.field("rejected", CONVERSATION_TYPE),
]
TRL_COLUMNS = ("images", "prompt", "chosen", "rejected")


class PairsConfig(StrictModel):
    """How answers become a pair; see `selection.select_pair` for the exact rules."""

    min_valid: int = Field(2, ge=2, description="valid answers a row needs (fewer: dropped as too_few_valid)")
    min_margin: float = Field(0.0, ge=0, allow_inf_nan=False, description="drop pairs whose reward margin is smaller")
    drop_ties: bool = Field(True, description="drop rows whose valid answers all score the same")
    min_chars: int = Field(1, ge=1, description="shorter answers (stripped) are invalid: never chosen or rejected")
    max_chars: int | None = Field(None, ge=1, description="longer answers are invalid; None: no bound")
    system_prompt: str | None = Field(None, description="optional system message at the head of `prompt`")
    rank_by: Literal["reward", "judge", "mix"] = Field(
        "reward", description="what ranks the answers: the reward model (paper), the judge, or a mix (needs `judge`)"
    )
    judge_weight: float = Field(0.5, ge=0, le=1, description="rank_by=mix: weight of the standardized judge score")

    @model_validator(mode="after")
    def _bounds(self):
        if self.max_chars is not None and self.max_chars < self.min_chars:
            raise ValueError(f"max_chars ({self.max_chars}) < min_chars ({self.min_chars})")
        return self

    def selection_kwargs(self) -> dict[str, Any]:
        return self.model_dump(include={"min_valid", "min_margin", "drop_ties", "min_chars", "max_chars"})

    def ranking(self, row: dict[str, Any], n: int) -> list[float | None]:
        """The scores that rank the row's `n` answers (see `selection.ranking_scores`)."""
        reward = row.get("response_scores")
        reward = [None] * n if reward is None else reward
        if len(reward) != n:
            raise ValueError(f"{n} responses but {len(reward)} response_scores")
        return selection.ranking_scores(reward, row.get("judge_scores"), self.rank_by, self.judge_weight)


def trl_prompt(instruction: str, system_prompt: str | None = None) -> list[dict[str, Any]]:
    """TRL's conversational vision prompt: one image placeholder, then the instruction."""
    user = {"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": instruction}]}
    if system_prompt is None:
        return [user]
    return [{"role": "system", "content": [{"type": "text", "text": system_prompt}]}, user]


def trl_answer(text: str) -> list[dict[str, Any]]:
    """TRL's conversational completion: one assistant message."""
    return [{"role": "assistant", "content": [{"type": "text", "text": text}]}]


def trl_columns(
    image: dict[str, Any], instruction: str, chosen: str, rejected: str, system_prompt: str | None = None
) -> dict[str, Any]:
    """The values of TRL's four vision preference columns for one pair."""
    return {
        "images": [image],
        "prompt": trl_prompt(instruction, system_prompt),
        "chosen": trl_answer(chosen),
        "rejected": trl_answer(rejected),
    }


_NO_PAIR = {field.name: None for field in PAIR_FIELDS}


def _errored(response: dict[str, Any]) -> bool:
    return bool(response.get("error")) or response.get("finish_reason") == "error"


class PairBuilder(RowStage):
    """Turns each row's scored answers into a preference pair, or drops the row with a reason."""

    name = "pairs"
    output_fields = PAIR_FIELDS

    def __init__(self, cfg: PairsConfig | None = None):
        super().__init__(max_batch_retries=0)  # pure: a retry cannot change the outcome
        self.cfg = cfg or PairsConfig()

    def __call__(self, table: pa.Table) -> pa.Table:
        if "drop_reason" not in table.column_names:  # tables written before the column existed
            table = table.append_column(pa.field("drop_reason", pa.string()), pa.nulls(table.num_rows, pa.string()))
        return super().__call__(table)

    def process(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [self._pair(row) for row in rows]

    def _pair(self, row: dict[str, Any]) -> dict[str, Any]:
        responses = row.get("responses") or []
        scores = self.cfg.ranking(row, len(responses))
        image = row.get("image")
        if not image or not (image.get("bytes") or image.get("path")):
            raise ValueError("row has no image")
        if not isinstance(row.get("instruction"), str) or not row["instruction"].strip():
            raise ValueError("row has no instruction")
        # An errored answer never competes, whatever score it was given (the scorer's rule, kept here too).
        texts = [None if _errored(response) else response.get("text") for response in responses]
        result = selection.select_pair(texts, scores, **self.cfg.selection_kwargs())
        if isinstance(result, selection.Drop):
            return self.drop(result.reason, _NO_PAIR)
        chosen, rejected = responses[result.chosen], responses[result.rejected]
        return {
            "chosen_model": chosen.get("model"),
            "rejected_model": rejected.get("model"),
            "chosen_index": result.chosen,
            "rejected_index": result.rejected,
            "margin": result.margin,
            "chosen_text": chosen["text"],
            "rejected_text": rejected["text"],
            **trl_columns(row["image"], row["instruction"], chosen["text"], rejected["text"], self.cfg.system_prompt),
        }
