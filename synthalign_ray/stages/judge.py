"""Image-aware judging (beyond the paper): a VLM rates each answer WITH the image.

The paper ranks answers with ArmoRM, which reads the instruction and the answer but never the image,
so a fluent answer that invents objects can win. This optional stage shows a VLM (vLLM or an
OpenAI-compatible endpoint, `stages/chat.py`) the kept image, the instruction and all the row's answers,
numbered, and asks for one score per answer against a rubric (grounding, correctness, helpfulness).
One request per row: the image is encoded once and the judge sees the answers side by side.

The reply is parsed by `parse_judge_scores` ("Answer 2: 7" lines; anything else is ignored) into
`judge_scores`, one float per answer (null where the judge gave none, the score is off the scale, or the
answer had failed), and the reply itself is kept in `judge_reply` for audits. `pairs.rank_by` then
chooses what ranks the answers: the reward model, the judge, or a mix (`selection.ranking_scores`);
both score lists stay in the row either way.
"""

from __future__ import annotations

import re
from typing import Any

import pyarrow as pa
from pydantic import Field, model_validator

from synthalign_ray.stages.chat import ChatModelConfig, ChatReply, ChatRequest, add_chat_stage, user_message
from synthalign_ray.base import StrictModel
from synthalign_ray.stages.instructions import template_fields

DEFAULT_RUBRIC = (
    "Look at the image. Several AI assistants answered this instruction about it.\n"
    "Instruction: {instruction}\n\n{answers}\n\n"
    "Rate each answer from {low} to {high}: grounding in the image first (it must not mention objects, "
    "attributes or relations that are not in the image), then correctness, then helpfulness. "
    'Reply with one line per answer, exactly "Answer N: SCORE", and nothing else.'
)
RUBRIC_FIELDS = {"instruction", "answers", "low", "high", "t2i_prompt", "category"}
JUDGE_FIELDS = [pa.field("judge_scores", pa.list_(pa.float32())), pa.field("judge_reply", pa.string())]
_SCORE_LINE = re.compile(r"answer\s*#?\s*(\d+)\s*[:=\-]\s*(-?\d+(?:\.\d+)?)", re.IGNORECASE)


class JudgeConfig(StrictModel):
    model: ChatModelConfig = Field(description="a VLM: it sees the image")
    rubric: str = Field(DEFAULT_RUBRIC, description="format string over instruction, answers, low, high, t2i_prompt, category")
    low: float = Field(1.0, description="lowest score of the scale")
    high: float = Field(10.0, description="highest score of the scale")
    answer_chars: int = Field(2000, ge=1, description="each answer is cut to this many characters in the judge's prompt")

    @model_validator(mode="after")
    def _rubric_and_scale(self):
        if self.high <= self.low:
            raise ValueError(f"high ({self.high}) must be above low ({self.low})")
        unknown = template_fields(self.rubric) - RUBRIC_FIELDS
        if unknown:
            raise ValueError(f"rubric uses unknown field(s) {sorted(unknown)}; known: {sorted(RUBRIC_FIELDS)}")
        if "answers" not in template_fields(self.rubric):
            raise ValueError("rubric must show the answers: put {answers} in it")
        return self


def numbered_answers(texts: list[str | None], max_chars: int) -> str:
    """The answers as the judge sees them: "Answer 1:" blocks; a failed or empty one says so."""
    blocks = []
    for i, text in enumerate(texts, start=1):
        body = text.strip()[:max_chars] if text and text.strip() else "(no answer)"
        blocks.append(f"Answer {i}:\n{body}")
    return "\n\n".join(blocks)


def parse_judge_scores(reply: str, n: int, low: float, high: float) -> list[float | None]:
    """One score per answer from "Answer N: SCORE" lines; None where missing or off the [low, high]
    scale. When an answer is scored twice, the first score counts."""
    scores: list[float | None] = [None] * n
    for number, value in _SCORE_LINE.findall(reply):
        index, score = int(number) - 1, float(value)
        if 0 <= index < n and scores[index] is None and low <= score <= high:
            scores[index] = score
    return scores


def _answer_texts(row: dict[str, Any]) -> list[str | None]:
    return [
        None if (r.get("error") or r.get("finish_reason") == "error") else r.get("text") for r in row.get("responses") or []
    ]


def add_judge_scores(ds, cfg: JudgeConfig, *, run_seed: int):
    """`ds` with `judge_scores` and `judge_reply` on every ok row."""

    def request(row: dict[str, Any]) -> ChatRequest:
        if not row.get("responses"):
            raise ValueError("the row has no answers to judge")
        prompt = cfg.rubric.format(
            instruction=row["instruction"],
            answers=numbered_answers(_answer_texts(row), cfg.answer_chars),
            low=f"{cfg.low:g}",
            high=f"{cfg.high:g}",
            t2i_prompt=row["t2i_prompt"],
            category=row["category"],
        )
        return ChatRequest([user_message(prompt, with_image=True)], image=row["image"], seed=row.get("seed"))

    def output(row: dict[str, Any], reply: ChatReply) -> dict[str, Any]:
        texts = _answer_texts(row)
        scores = parse_judge_scores(reply.text, len(texts), cfg.low, cfg.high)
        return {
            "judge_scores": [None if text is None else score for text, score in zip(texts, scores)],
            "judge_reply": reply.text,
        }

    return add_chat_stage(
        ds,
        cfg.model,
        stage="judge",
        request=request,
        output=output,
        output_fields=JUDGE_FIELDS,
        run_seed=run_seed,
        images=True,
    )
