"""`synthalign judge RUN --config FILE`: which image scorer picks the better image? (paper Table 5)

The paper asks GPT-4o, given a caption and two images, which image matches the caption better, on rows
where the reward model (ImageReward) and CLIP picked different images: RM 53 wins, CLIP 37, 10 ties.
This reproduces that comparison on a run folder, with any VLM judge (`stages/chat.py`: a vLLM pool or
an OpenAI-compatible endpoint) and any two of the scorer columns (`image_scores`, `clip_scores`,
`blip_scores`).

How (X, Y = the two scorers, `scorers` in the config):

1. Pass 1, on the driver, streams only `id`, X and Y of every shard (`build.iter_batches`) and keeps the
   rows where both scored the same K >= 2 candidates with finite scores and their top-1 differ
   (`disagreement`: ties to the lower index, as `selection.argmax`). With `limit`, the `limit` of them
   with the smallest id hash (a uniform sample, the same whatever the shard order).
2. A Ray Data pipeline reads `id`, `t2i_prompt` and `candidate_images` of the shards holding those rows,
   turns each row into two comparisons, X's pick as image A then Y's pick as image A, and asks the judge
   each through `add_chat_stage`. Only the verdicts come back to the driver.
3. Each reply is parsed (`parse_choice`: "A", "B", a tie, or unparsed). A row is a win for X only when
   both orders prefer X's image, a loss when both prefer Y's, unparsed when either reply is unparsed (or
   its request failed), and a tie otherwise: a stated tie, or orders that disagree, which is what a
   judge that prefers a position (always "A") gives. Replies that picked the same position in both
   orders are counted apart (`position_bias_rows`).

Why one composite image: vLLM requests here carry at most one image (`limit_mm_per_prompt` 1, as
every LLM stage), and many VLMs (LLaVA-1.5 among them) were trained on one image per prompt. The two
candidates are drawn side by side into one picture, labelled A (left) and B (right) above each
(`side_by_side`), which every VLM and every endpoint accepts. A model that resizes its input to a
square (LLaVA-1.5: 336 px) sees each candidate at about half that width; `image_height` sets the
composite's height.

Writes into OUTPUT (default RUN/judge): judge.json (counts, shares with Wilson 95% intervals, reply
counts, config), judge.md (the table, as the paper's Table 5), verdicts.parquet (one row per judged row:
both replies, their parsed choices, the outcome).
"""

from __future__ import annotations

import hashlib
import io
import math
import re
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, model_validator

from synthalign_ray import store
from synthalign_ray.config import ResourcesConfig
from synthalign_ray.stages.chat import ChatModelConfig, ChatReply, ChatRequest, add_chat_stage, user_message
from synthalign_ray.engines.vllm_engine import LIGHT_STAGE_CPUS
from synthalign_ray.report.build import ReportError, iter_batches, run_shards
from synthalign_ray.report.stats import SCORER_NAMES, SCORERS
from synthalign_ray.base import STATUS_OK, StrictModel
from synthalign_ray.stages.instructions import template_fields

DEFAULT_PROMPT = (
    "The picture shows two images side by side: image A on the left and image B on the right.\n"
    'Caption: "{caption}"\n'
    "Which image matches the caption better? Answer with one letter, A or B, "
    "or with the word tie if they match it equally well."
)
Z_95 = 1.959963984540054  # the standard normal's 97.5 % quantile
OUTCOMES = ("win", "loss", "tie", "unparsed")
VERDICT_FIELDS = [pa.field("judge_reply", pa.string()), pa.field("judge_choice", pa.string())]
SCORE_COLUMNS = ("id", *SCORERS)
IMAGE_COLUMNS = ("id", "t2i_prompt", "candidate_images")


class JudgeRunConfig(StrictModel):
    judge: ChatModelConfig = Field(description="a VLM: it sees both images in one picture")
    scorers: tuple[str, str] = Field(("image_scores", "clip_scores"), description="X and Y: wins are X's")
    prompt: str = Field(DEFAULT_PROMPT, description="format string over {caption}")
    limit: int | None = Field(None, ge=1, description="judge at most this many disagreeing rows (a uniform sample)")
    image_height: int = Field(448, ge=16, description="px: both candidates are scaled to this height")
    seed: int = Field(0, ge=0, description="base of the sampling seeds when temperature > 0")
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)

    @model_validator(mode="after")
    def _scorers_and_prompt(self):
        unknown = [s for s in self.scorers if s not in SCORERS]
        if unknown:
            raise ValueError(f"scorers: unknown column(s) {unknown}; known: {list(SCORERS)}")
        if self.scorers[0] == self.scorers[1]:
            raise ValueError("scorers: two different scorer columns are needed")
        fields = template_fields(self.prompt)
        if fields - {"caption"}:
            raise ValueError(f"prompt uses unknown field(s) {sorted(fields - {'caption'})}; known: ['caption']")
        if "caption" not in fields:
            raise ValueError("prompt must show the caption: put {caption} in it")
        return self


# ---------------------------------------------------------------------------------------------------
# Pure logic: which rows, the reply's choice, a row's outcome, the summary
# ---------------------------------------------------------------------------------------------------


def top1(scores: Sequence[float]) -> int:
    """Index of the highest score, the lower index on ties (as `selection.argmax`)."""
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


def disagreement(x: Sequence[float | None] | None, y: Sequence[float | None] | None) -> tuple[int, int] | None | bool:
    """(X's pick, Y's pick) when both scored the same K >= 2 candidates (finite scores) and their top-1
    differ; False when they agree; None when the row cannot be compared."""
    if x is None or y is None or len(x) != len(y) or len(x) < 2:
        return None
    if not all(s is not None and math.isfinite(s) for s in (*x, *y)):
        return None
    picks = top1(x), top1(y)
    return picks if picks[0] != picks[1] else False


_TIE_WORDS = re.compile(r"\b(tie|tied|equal|equally|both|neither|same|no difference)\b", re.IGNORECASE)
# "Image A", "option (B)", "answer: A", "the answer is B": the letter in capitals after a keyword.
_NAMED_LETTER = re.compile(r"(?i:\b(?:image|picture|option|answer|choice)(?:\s+is)?)\s*[:\-]?\s*\(?([AB])\)?(?!\w)")
_STRIP = " \t\r\n*`'\""


def parse_choice(reply: str | None) -> str | None:
    """The judge's choice in a reply: "A", "B", "tie", or None (unparsed). Rules, in order:

    1. the reply is just the letter: "A", "b.", "(B)", "**A**";
    2. the reply starts with a capital A or B followed by punctuation or a line break: "A. The left ...",
       "B: ..." (not "A dog ...": there the A is an article);
    3. exactly one letter is named after image / picture / option / answer / choice ("Image B matches
       better", "The answer is A"); both letters named go on to rule 4;
    4. a tie word: tie, equal(ly), both, neither, same, no difference;
    anything else is unparsed.
    """
    text = (reply or "").strip(_STRIP)
    if not text:
        return None
    bare = re.fullmatch(r"\(?([ABab])\)?[.!]?", text)
    if bare:
        return bare.group(1).upper()
    leading = re.match(r"\(?([AB])\)?(?:[.,:;)!\n])", text)
    if leading:
        return leading.group(1)
    named = set(_NAMED_LETTER.findall(text))
    if len(named) == 1:
        return named.pop()
    if _TIE_WORDS.search(text):
        return "tie"
    return None


def preferred_scorer(choice: str | None, left: str, right: str) -> str | None:
    """The scorer whose pick the judge preferred: `left` for "A", `right` for "B", "tie", or None."""
    return {"A": left, "B": right, "tie": "tie"}.get(choice) if choice else None


def row_outcome(first: str | None, second: str | None, x: str, y: str) -> str:
    """A row's outcome for X from the scorers preferred in its two orders (None: unparsed or failed):
    win (both X), loss (both Y), unparsed (either None), tie (anything else)."""
    if first is None or second is None:
        return "unparsed"
    if first == second == x:
        return "win"
    if first == second == y:
        return "loss"
    return "tie"


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float] | None:
    """Wilson score interval of a proportion successes / n (None for n = 0)."""
    if n == 0:
        return None
    p = successes / n
    denominator = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def _share(k: int, n: int) -> dict[str, Any]:
    interval = wilson_interval(k, n)
    return {"count": k, "n": n, "share": k / n if n else None, "ci95": list(interval) if interval else None}


def summarize(outcomes: Iterable[str], *, position_bias_rows: int = 0) -> dict[str, Any]:
    """Counts of the row outcomes, each outcome's share of the judged rows (win + loss + tie) and X's
    win rate over the decisive rows (win + loss, the paper's "win rate"), with Wilson 95% intervals."""
    counts = Counter(outcomes)
    unknown = set(counts) - set(OUTCOMES)
    if unknown:
        raise ValueError(f"unknown outcome(s) {sorted(unknown)}")
    wins, losses, ties = counts["win"], counts["loss"], counts["tie"]
    judged = wins + losses + ties
    return {
        "asked": judged + counts["unparsed"],
        "wins": wins,
        "losses": losses,
        "ties": ties,
        "unparsed": counts["unparsed"],
        "position_bias_rows": position_bias_rows,
        "share_of_judged": {"win": _share(wins, judged), "loss": _share(losses, judged), "tie": _share(ties, judged)},
        "win_rate_decisive": _share(wins, wins + losses),
    }


def _percent(stat: dict[str, Any]) -> str:
    if stat["share"] is None:
        return "–"
    low, high = stat["ci95"]
    return f"{100 * stat['share']:.1f}% [{100 * low:.1f}, {100 * high:.1f}]"


def render_markdown(result: dict[str, Any]) -> str:
    """The paper's Table 5 with intervals, and how the rows were counted."""
    x, y = (SCORER_NAMES[s] for s in result["scorers"])
    s, rows, replies = result["summary"], result["rows"], result["replies"]
    shares = s["share_of_judged"]
    lines = [
        f"## {x} vs {y}, judged by {result['judge_model']}",
        "",
        "| Outcome | Count | Share of judged rows (95% CI) |",
        "|---|---:|---:|",
        f"| {x} wins | {s['wins']} | {_percent(shares['win'])} |",
        f"| {y} wins | {s['losses']} | {_percent(shares['loss'])} |",
        f"| Ties | {s['ties']} | {_percent(shares['tie'])} |",
        f"| Unparsed | {s['unparsed']} | |",
        "",
        f"{x} win rate over decisive rows ({x} or {y} wins): {_percent(s['win_rate_decisive'])} "
        f"(n = {s['win_rate_decisive']['n']}). Intervals: Wilson score, 95%.",
        "",
        f"Rows read: {rows['read']}; comparable (both scorers, same K >= 2 candidates): {rows['comparable']}; "
        f"top-1 differ: {rows['disagree']}; judged: {s['asked']}"
        + (f" (a uniform sample of {rows['disagree']}, limit {result['config']['limit']})" if s["asked"] < rows["disagree"] else "")
        + ".",
        f"Each row was asked twice, {x}'s image as A then as B; a win needs both orders to agree. "
        f"Rows where the judge picked the same position both times (position bias, counted as ties): "
        f"{s['position_bias_rows']}.",
        f"Replies: {replies['total']} ({replies['A']} A, {replies['B']} B, {replies['tie']} tie, "
        f"{replies['unparsed']} unparsed, {replies['failed']} failed requests).",
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------
# The composite image
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Where side_by_side puts things (px): both images `height` tall, a labelled band above them."""

    height: int
    margin: int
    gap: int
    band: int

    @classmethod
    def for_height(cls, height: int) -> Layout:
        return cls(height=height, margin=max(2, height // 32), gap=max(4, height // 16), band=max(12, height // 8))


def _scaled(image, height: int):
    width = max(1, round(image.width * height / image.height))
    return image.convert("RGB").resize((width, height))


def side_by_side(left, right, height: int):
    """One RGB picture: `left` and `right` scaled to `height` (aspect kept), side by side on white with
    a gap, "A" centred above the left one and "B" above the right one. Returns (picture, boxes) where
    boxes are the (x0, y0, x1, y1) of the left and right image in it."""
    from PIL import Image, ImageDraw, ImageFont

    layout = Layout.for_height(height)
    a, b = _scaled(left, height), _scaled(right, height)
    top = layout.margin + layout.band
    width = layout.margin * 2 + a.width + layout.gap + b.width
    canvas = Image.new("RGB", (width, top + height + layout.margin), "white")
    box_a = (layout.margin, top, layout.margin + a.width, top + height)
    box_b = (box_a[2] + layout.gap, top, box_a[2] + layout.gap + b.width, top + height)
    canvas.paste(a, box_a[:2])
    canvas.paste(b, box_b[:2])
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=max(8, int(layout.band * 0.8)))
    for label, box in (("A", box_a), ("B", box_b)):
        center = ((box[0] + box[2]) / 2, layout.margin + layout.band / 2)
        draw.text(center, label, fill="black", font=font, anchor="mm")
    return canvas, (box_a, box_b)


def composite_struct(left: dict[str, Any], right: dict[str, Any], height: int) -> dict[str, Any]:
    """side_by_side of two HF Image structs, as an HF Image struct (PNG)."""
    picture, _ = side_by_side(store.decode_image(left), store.decode_image(right), height)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


# ---------------------------------------------------------------------------------------------------
# Pass 1 (driver) and the Ray pipeline
# ---------------------------------------------------------------------------------------------------


def _id_hash(row_id: str) -> int:
    return int.from_bytes(hashlib.sha1(row_id.encode()).digest()[:8], "big")


@dataclass
class Disagreements:
    picks: dict[str, tuple[int, int]]  # row id -> (X's pick, Y's pick), the rows to judge
    shards: list[str]  # the shards holding them
    read: int  # rows read
    comparable: int
    disagree: int  # before `limit`


def find_disagreements(run: str, x: str, y: str, limit: int | None) -> Disagreements:
    """Pass 1: the rows where X's and Y's top-1 differ, reading only ids and the two score columns."""
    shards = [shard for paths in run_shards(run).values() for shard in paths]
    if not shards:
        raise ReportError(f"{run}: no Parquet shards in {', '.join(f'{f}/' for f in store.FOLDERS.values())}")
    found: dict[str, tuple[tuple[int, int], str]] = {}
    read = comparable = 0
    for shard in shards:
        for batch in iter_batches(run, shard, ("id", x, y)):
            columns = batch.schema.names
            ids = batch.column("id").to_pylist()
            xs = batch.column(x).to_pylist() if x in columns else [None] * len(ids)
            ys = batch.column(y).to_pylist() if y in columns else [None] * len(ids)
            read += len(ids)
            for row_id, scores_x, scores_y in zip(ids, xs, ys):
                picks = disagreement(scores_x, scores_y)
                if picks is None:
                    continue
                comparable += 1
                if picks:
                    found[row_id] = (picks, shard)
    chosen = sorted(found, key=_id_hash)[:limit] if limit else list(found)
    return Disagreements(
        picks={row_id: found[row_id][0] for row_id in chosen},
        shards=sorted({found[row_id][1] for row_id in chosen}),
        read=read,
        comparable=comparable,
        disagree=len(found),
    )


def comparison_rows(batch: pa.Table, picks: dict[str, tuple[int, int]], x: str, y: str, height: int) -> pa.Table:
    """Two comparisons per row of `batch` in `picks`: X's pick as A (left) and Y's pick as B, then
    swapped; each with its composite image and the status columns `add_chat_stage` keeps."""
    batch = batch.filter(pc.is_in(batch.column("id"), value_set=pa.array(list(picks), pa.string())))
    out: dict[str, list] = {name: [] for name in ("id", "row_id", "caption", "left", "pick_x", "pick_y", "image")}
    for row in batch.to_pylist():
        pick_x, pick_y = picks[row["id"]]
        images = row["candidate_images"]
        for left, (a, b) in ((x, (pick_x, pick_y)), (y, (pick_y, pick_x))):
            out["id"].append(f"{row['id']}|{left}-left")
            out["row_id"].append(row["id"])
            out["caption"].append(row["t2i_prompt"])
            out["left"].append(left)
            out["pick_x"].append(pick_x)
            out["pick_y"].append(pick_y)
            out["image"].append(composite_struct(images[a], images[b], height))
    n = len(out["id"])
    return pa.table(
        {
            "id": pa.array(out["id"], pa.string()),
            "row_id": pa.array(out["row_id"], pa.string()),
            "caption": pa.array(out["caption"], pa.string()),
            "left": pa.array(out["left"], pa.string()),
            "pick_x": pa.array(out["pick_x"], pa.int32()),
            "pick_y": pa.array(out["pick_y"], pa.int32()),
            "image": pa.array(out["image"], store.IMAGE_TYPE),
            "status": pa.array([STATUS_OK] * n, pa.string()),
            "error": pa.array([None] * n, pa.string()),
            "failed_stage": pa.array([None] * n, pa.string()),
        }
    )


def ask_judge(run: str, cfg: JudgeRunConfig, found: Disagreements) -> pa.Table:
    """The judge's reply to every comparison (Ray Data + `add_chat_stage`), without the images."""
    import ray

    x, y = cfg.scorers
    fs, _ = store.filesystem(run)
    ds = ray.data.read_parquet(found.shards, filesystem=fs, columns=list(IMAGE_COLUMNS))
    ds = ds.map_batches(
        comparison_rows,
        fn_kwargs={"picks": found.picks, "x": x, "y": y, "height": cfg.image_height},
        batch_format="pyarrow",
        batch_size=8,  # composites are encoded here: small batches keep them streaming
        num_cpus=LIGHT_STAGE_CPUS,  # beside the engine actors, which hold whole CPUs for the run
    )

    def request(row: dict[str, Any]) -> ChatRequest:
        return ChatRequest([user_message(cfg.prompt.format(caption=row["caption"]), with_image=True)], image=row["image"])

    def output(row: dict[str, Any], reply: ChatReply) -> dict[str, Any]:
        return {"judge_reply": reply.text, "judge_choice": parse_choice(reply.text) or "unparsed"}

    ds = add_chat_stage(
        ds, cfg.judge, stage="judge_images", request=request, output=output, output_fields=VERDICT_FIELDS,
        run_seed=cfg.seed, images=True,
    )  # fmt: skip
    ds = ds.select_columns(["id", "row_id", "caption", "left", "pick_x", "pick_y", "status", "error", *[f.name for f in VERDICT_FIELDS]])
    tables = [pa.Table.from_batches([b]) if isinstance(b, pa.RecordBatch) else b for b in ds.iter_batches(batch_format="pyarrow", batch_size=None)]
    return pa.concat_tables(tables) if tables else None


def verdicts(replies: pa.Table | None, x: str, y: str) -> tuple[pa.Table, dict[str, int], int]:
    """Per judged row: both replies, their choices and the outcome; reply counts; position-bias rows."""
    by_row: dict[str, dict[str, dict[str, Any]]] = {}
    for r in replies.to_pylist() if replies is not None else []:
        by_row.setdefault(r["row_id"], {})[r["left"]] = r
    reply_counts = Counter()
    rows, position_bias = [], 0
    for row_id in sorted(by_row):
        orders = by_row[row_id]
        if set(orders) != {x, y}:
            raise RuntimeError(f"{row_id}: replies for {sorted(orders)}, expected both orders {x}, {y}")
        preferred, choices = [], []
        for left, right in ((x, y), (y, x)):
            r = orders[left]
            choice = r["judge_choice"] if r["status"] == STATUS_OK else None
            reply_counts[choice if choice is not None else "failed"] += 1
            parsed = choice if choice in ("A", "B", "tie") else None
            choices.append(parsed)
            preferred.append(preferred_scorer(parsed, left, right))
        outcome = row_outcome(preferred[0], preferred[1], x, y)
        if choices[0] is not None and choices[0] == choices[1] and choices[0] != "tie":
            position_bias += 1
        first, second = orders[x], orders[y]
        rows.append({
            "id": row_id, "caption": first["caption"], "pick_x": first["pick_x"], "pick_y": first["pick_y"],
            "reply_x_left": first["judge_reply"], "choice_x_left": choices[0] or ("failed" if first["status"] != STATUS_OK else "unparsed"),
            "reply_y_left": second["judge_reply"], "choice_y_left": choices[1] or ("failed" if second["status"] != STATUS_OK else "unparsed"),
            "error": first["error"] or second["error"], "outcome": outcome,
        })  # fmt: skip
    counts = {key: reply_counts[key] for key in ("A", "B", "tie", "unparsed", "failed")}
    counts["total"] = sum(counts.values())
    schema = pa.schema([
        ("id", pa.string()), ("caption", pa.string()), ("pick_x", pa.int32()), ("pick_y", pa.int32()),
        ("reply_x_left", pa.string()), ("choice_x_left", pa.string()), ("reply_y_left", pa.string()),
        ("choice_y_left", pa.string()), ("error", pa.string()), ("outcome", pa.string()),
    ])  # fmt: skip
    return pa.Table.from_pylist(rows, schema=schema), counts, position_bias


def judge_run(run: str, cfg: JudgeRunConfig, output: str | None = None, *, config_source: str | None = None) -> dict[str, Any]:
    """Judge a run's disagreeing rows; write judge.json, judge.md and verdicts.parquet into `output`."""
    from synthalign_ray.runtime import check_chat_environment, init_ray

    started = time.time()
    output = output or store.join(run, "judge")
    x, y = cfg.scorers
    check_chat_environment({"judge": cfg.judge})
    found = find_disagreements(run, x, y, cfg.limit)
    replies = None
    if found.picks:
        init_ray(cfg.resources, [cfg.judge])
        replies = ask_judge(run, cfg, found)
    table, reply_counts, position_bias = verdicts(replies, x, y)
    if table.num_rows != len(found.picks):
        raise RuntimeError(f"{table.num_rows} verdicts for {len(found.picks)} rows asked")
    model = cfg.judge.model if cfg.judge.backend == "vllm" else f"{cfg.judge.base_url} ({cfg.judge.model})"
    result = {
        "run": run,
        "scorers": [x, y],
        "names": {"x": SCORER_NAMES[x], "y": SCORER_NAMES[y]},
        "judge_model": model,
        "rows": {"read": found.read, "comparable": found.comparable, "disagree": found.disagree},
        "summary": summarize(table.column("outcome").to_pylist(), position_bias_rows=position_bias),
        "replies": reply_counts,
        "config": cfg.model_dump(mode="json"),
        "config_source": config_source,
        "versions": store.package_versions(),
        "seconds": round(time.time() - started, 1),
    }
    store.write_table(store.join(output, "verdicts.parquet"), table)
    store.write_json(store.join(output, "judge.json"), result)
    store.write_bytes(store.join(output, "judge.md"), render_markdown(result).encode())
    return result
