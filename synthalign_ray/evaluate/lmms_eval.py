"""The lmms-eval bridge: general benchmarks through lmms-eval on a vLLM server, and POPE re-scored
with the official parser.

General benchmarks (MME, MMBench, SEED, ...) run in lmms-eval against the merged model served by vLLM's
OpenAI-compatible server (README "Evaluation" has the commands):

    vllm serve runs/dpo/merged --served-model-name trained --port 8000
    OPENAI_API_KEY=none lmms-eval --model openai --model_args model_version=trained,base_url=http://localhost:8000/v1 \
        --tasks pope,mme --log_samples --output_path runs/lmms-eval

lmms-eval's own POPE metrics are not the paper's: its `pope_process_results` counts an answer correct
only when the lowercased answer equals "yes"/"no" exactly, and its yes-ratio is the share of YES LABELS.
`rescore_pope_samples` re-reads its per-sample log (`samples_pope*.jsonl`, written with --log_samples:
one JSON object per line with `doc`, `target`, `resps`, `filtered_resps` and the `pope_accuracy` record
{question_id, score, prediction, ground_truth}) and scores the raw answers with `metrics.pope_answer`,
per POPE split (`doc.category`: adversarial / popular / random in lmms-lab/POPE).
"""

from __future__ import annotations

import json
from typing import Any

from synthalign_ray import store
from synthalign_ray.evaluate.common import BenchmarkFileError
from synthalign_ray.evaluate.metrics import pope_answer, pope_metrics
from synthalign_ray.evaluate.pope import HEADLINE_METRICS


def sample_answer(sample: dict[str, Any]) -> str:
    """The model's raw answer in one logged sample: filtered_resps[0] (a string, or a list whose first
    item is), else resps[0][0]; lmms-eval's `prediction` is lowercased and stripped, so it is the last resort."""
    for key in ("filtered_resps", "resps"):
        value = sample.get(key)
        while isinstance(value, list) and value:
            value = value[0]
        if isinstance(value, str):
            return value
    record = sample.get("pope_accuracy")
    if isinstance(record, dict) and isinstance(record.get("prediction"), str):
        return record["prediction"]
    raise ValueError("no answer (filtered_resps, resps or pope_accuracy.prediction)")


def _label(sample: dict[str, Any]) -> str:
    record = sample.get("pope_accuracy") if isinstance(sample.get("pope_accuracy"), dict) else {}
    for value in (sample.get("target"), record.get("ground_truth"), (sample.get("doc") or {}).get("answer")):
        if isinstance(value, str) and value.strip().lower() in ("yes", "no"):
            return value.strip().lower()
    raise ValueError("no yes/no label (target, pope_accuracy.ground_truth or doc.answer)")


def rescore_pope_samples(path: str) -> dict[str, Any]:
    """Metrics of an lmms-eval POPE sample log, computed with the official parser, per split (doc.category,
    else "all"), their mean, and lmms-eval's own exact-match accuracy for contrast. Errors name the line."""
    fs, local = store.filesystem(path)
    try:
        with fs.open_input_stream(local) as stream:
            text = stream.read().decode("utf-8")
    except (FileNotFoundError, OSError) as error:
        raise BenchmarkFileError(f"{path}: cannot read lmms-eval sample log ({error})") from None
    by_split: dict[str, list[tuple[str, str, str]]] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            sample = json.loads(line)
            if not isinstance(sample, dict):
                raise ValueError(f"expected a JSON object, got {type(sample).__name__}")
            answer, label = sample_answer(sample), _label(sample)
        except (json.JSONDecodeError, ValueError) as error:
            raise BenchmarkFileError(f"{path}:{number}: not an lmms-eval POPE sample: {error}") from None
        split = str((sample.get("doc") or {}).get("category") or "all")
        by_split.setdefault(split, []).append((answer, label, answer.lower().strip()))
    if not by_split:
        raise BenchmarkFileError(f"{path}: no samples")
    splits = {}
    for split, rows in sorted(by_split.items()):
        splits[split] = pope_metrics([pope_answer(answer) for answer, _, _ in rows], [label for _, label, _ in rows])
        splits[split]["lmms_eval_exact_match_accuracy"] = sum(lowered == label for _, label, lowered in rows) / len(rows)
    mean = {}
    for name in HEADLINE_METRICS:
        values = [m[name] for m in splits.values()]
        mean[name] = None if any(v is None for v in values) else sum(values) / len(values)
    return {"source": path, "parser": "official (POPE evaluate.py / LLaVA eval_pope.py)", "splits": splits, "mean": mean}
