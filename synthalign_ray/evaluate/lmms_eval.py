"""The lmms-eval bridge: general benchmarks through lmms-eval on a vLLM server, and POPE re-scored
with the official parser.

General benchmarks (MME, MMBench, SEED, ...) run in lmms-eval (its own virtualenv: it pins its own torch
and transformers) against the merged model served by vLLM's OpenAI-compatible server, through lmms-eval's
`openai` model (`model_version`, `base_url`, `api_key`; docs/evaluation.md has the commands):

    vllm serve runs/dpo/merged --served-model-name trained --port 8000
    OPENAI_API_KEY=none lmms-eval --model openai --model_args model_version=trained,base_url=http://localhost:8000/v1 \
        --tasks mme,pope_random,pope_pop,pope_adv --log_samples --output_path runs/lmms-eval

lmms-eval's own POPE metrics are not the paper's: its `pope_process_results` counts an answer correct
only when the lowercased answer equals "yes"/"no" exactly, and its yes-ratio is the share of YES LABELS.
`rescore_pope_samples` re-reads its per-sample logs (`<date>_samples_<task>.jsonl`, written with
--log_samples: one JSON object per line with `target`, `filtered_resps` (and `resps` when they differ),
the `pope_*` records, and `doc` in versions before 0.7, which drop it) and scores the raw answers with
`metrics.pope_prediction` (LLaVA's strip, then the official parser), per POPE split: `doc.category`
where the log has it, else the task in the file name (`pope_random`, `pope_pop`, `pope_adv`:
lmms-lab/POPE's splits; `synthalign_pope_<split>`), else "all" (lmms-eval's `pope` task mixes the three
splits in one log without `doc`). Given a folder, it reads the newest log of every POPE task in it.

`write_pope_task` is the local-task route, for machines without the Hugging Face hub or for POPE's own
files: it turns POPE question files (AoiDragon/POPE's JSON lines) and their images into an lmms-eval task
folder for `--include_path`: per split, `pope_<split>.parquet` in lmms-lab/POPE's schema (id,
question_id, question, answer, image_source, image as an HF Image, category), read by lmms-eval's
`parquet` builder through `dataset_kwargs.data_files`, and `synthalign_pope_<split>.yaml` (tag
`synthalign_pope`) with lmms-eval's own POPE prompt, generation settings, process_results and metrics
(`utils.py` re-exports `lmms_eval.tasks.pope.utils`), so the logs are the ones lmms-eval's POPE tasks write:

    python -m synthalign_ray.evaluate.lmms_eval pope-task --question-dir runs/eval-tiny/questions \
        --image-dir runs/eval-tiny/images --output runs/lmms-tasks
    lmms-eval --model openai --model_args model_version=trained,base_url=http://localhost:8000/v1 \
        --include_path runs/lmms-tasks --tasks synthalign_pope --log_samples --output_path runs/lmms-eval
    synthalign rescore-pope runs/lmms-eval/trained

Tested with lmms-eval 0.7.3 (tests/integration/test_lmms_eval_bridge.py).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from synthalign_ray import store
from synthalign_ray.evaluate.common import BenchmarkFileError, image_location
from synthalign_ray.evaluate.metrics import pope_metrics, pope_prediction
from synthalign_ray.evaluate.pope import HEADLINE_METRICS, LLAVA_POPE_SUFFIX, POPE_SPLITS, PopeConfig, read_questions


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


# The POPE split a task name ends with: lmms-eval's pope_random / pope_pop / pope_adv (lmms-lab/POPE's
# splits) and write_pope_task's <tag>_<split>.
SPLIT_SUFFIXES = {"random": "random", "pop": "popular", "popular": "popular", "adv": "adversarial", "adversarial": "adversarial"}
SAMPLES_NAME = re.compile(r"^(?:(?P<date>.+?)_)?samples_(?P<task>.+)\.jsonl$")


def task_split(file_name: str) -> str | None:
    """The POPE split named by a sample log's task (`..._samples_pope_adv.jsonl` -> adversarial), or None."""
    match = SAMPLES_NAME.match(file_name)
    if not match or "pope" not in match.group("task") or "_" not in match.group("task"):
        return None
    return SPLIT_SUFFIXES.get(match.group("task").rsplit("_", 1)[1])


def pope_sample_logs(path: str) -> list[str]:
    """A sample log, or, for a folder, the newest log (by lmms-eval's date prefix) of each POPE task in it."""
    fs, local = store.filesystem(path)
    from pyarrow import fs as pafs

    if fs.get_file_info(local).type != pafs.FileType.Directory:
        return [path]
    newest: dict[str, tuple[str, str]] = {}
    for info in fs.get_file_info(pafs.FileSelector(local)):
        match = SAMPLES_NAME.match(info.base_name)
        if info.type == pafs.FileType.File and match and "pope" in match.group("task"):
            task, date = match.group("task"), match.group("date") or ""
            if task not in newest or date > newest[task][0]:
                newest[task] = (date, store.join(path, info.base_name))
    if not newest:
        raise BenchmarkFileError(f"{path}: no lmms-eval POPE sample log (*_samples_*pope*.jsonl) in the folder")
    return [newest[task][1] for task in sorted(newest)]


# A line of lmms-eval's console log that reports an error: loguru's `TIME | ERROR    | module:function:line
# - message`, coloured even when written to a pipe (lmms-eval adds stdout with colorize=True).
LOG_ERROR = re.compile(r"^[^|]*\|\s*(?:ERROR|CRITICAL)\s*\|[^-]*-\s(?P<message>.*)$")
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


def log_errors(log: str) -> list[str]:
    """The messages of lmms-eval's ERROR (and CRITICAL) log lines, in order."""
    matches = (LOG_ERROR.match(ANSI_ESCAPE.sub("", line).strip()) for line in log.splitlines())
    return [match["message"].strip() for match in matches if match]


def lmms_eval_results(model_dir: str, log: str = "") -> dict[str, Any]:
    """The `results` of the newest `*_results.json` lmms-eval wrote in a run's model folder
    (OUTPUT_PATH/MODEL_VERSION). lmms-eval catches an error during evaluation, logs it and still exits 0
    without writing that file (seen with filelock 4.3: "No module named 'filelock._api'"), so a missing
    file is an error that carries the ERROR lines of the run's console log (`log`, its stdout and stderr)."""
    fs, local = store.filesystem(model_dir)
    from pyarrow import fs as pafs

    files = []
    if fs.get_file_info(local).type == pafs.FileType.Directory:
        files = sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(local)) if i.base_name.endswith("_results.json"))
    if not files:
        errors = log_errors(log)
        said = "; its log says: " + " | ".join(errors) if errors else ("; its log has no ERROR line" if log else "")
        raise BenchmarkFileError(f"{model_dir}: lmms-eval wrote no results (*_results.json){said}")
    path = store.join(model_dir, files[-1])
    try:
        return store.read_json(path)["results"]
    except (ValueError, KeyError, TypeError) as error:
        raise BenchmarkFileError(f"{path}: not an lmms-eval results file ({error!r})") from None


def rescore_pope_samples(path: str) -> dict[str, Any]:
    """Metrics of lmms-eval POPE sample logs (a file, or a folder: `pope_sample_logs`), computed with the
    official parser, per split (doc.category, else the file's task, else "all"), their mean, and
    lmms-eval's own exact-match accuracy for contrast. Errors name the file and line."""
    files = pope_sample_logs(path)
    by_split: dict[str, list[tuple[str, str, str]]] = {}
    for file in files:
        fs, local = store.filesystem(file)
        try:
            with fs.open_input_stream(local) as stream:
                text = stream.read().decode("utf-8")
        except (FileNotFoundError, OSError) as error:
            raise BenchmarkFileError(f"{file}: cannot read lmms-eval sample log ({error})") from None
        file_split = task_split(file.rstrip("/").rsplit("/", 1)[-1])
        count = 0
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                sample = json.loads(line)
                if not isinstance(sample, dict):
                    raise ValueError(f"expected a JSON object, got {type(sample).__name__}")
                answer, label = sample_answer(sample), _label(sample)
            except (json.JSONDecodeError, ValueError) as error:
                raise BenchmarkFileError(f"{file}:{number}: not an lmms-eval POPE sample: {error}") from None
            split = str((sample.get("doc") or {}).get("category") or file_split or "all")
            by_split.setdefault(split, []).append((answer, label, answer.lower().strip()))
            count += 1
        if not count:
            raise BenchmarkFileError(f"{file}: no samples")
    splits = {}
    for split, rows in sorted(by_split.items()):
        splits[split] = pope_metrics([pope_prediction(answer) for answer, _, _ in rows], [label for _, label, _ in rows])
        splits[split]["lmms_eval_exact_match_accuracy"] = sum(lowered == label for _, label, lowered in rows) / len(rows)
    mean = {}
    for name in HEADLINE_METRICS:
        values = [m[name] for m in splits.values()]
        mean[name] = None if any(v is None for v in values) else sum(values) / len(values)
    source = files[0] if files == [path] else files
    return {"source": source, "parser": "official (POPE evaluate.py / LLaVA eval_pope.py)", "splits": splits, "mean": mean}


# lmms-lab/POPE's columns, as `datasets` records them in a parquet file's schema metadata, so its parquet
# builder decodes `image` to a PIL image (what lmms-eval's pope_doc_to_visual expects).
POPE_TASK_FEATURES = {
    "id": {"dtype": "string", "_type": "Value"},
    "question_id": {"dtype": "string", "_type": "Value"},
    "question": {"dtype": "string", "_type": "Value"},
    "answer": {"dtype": "string", "_type": "Value"},
    "image_source": {"dtype": "string", "_type": "Value"},
    "image": {"_type": "Image"},
    "category": {"dtype": "string", "_type": "Value"},
}
POPE_METRICS = ("pope_accuracy", "pope_precision", "pope_recall", "pope_f1_score", "pope_yes_ratio")


def pope_task_yaml(task: str, parquet: str, tag: str | None = None) -> str:
    """lmms-eval task YAML: lmms-eval's own POPE task (lmms_eval/tasks/pope/pope_random.yaml: prompt, greedy
    generation, process_results, metrics) on a local parquet file instead of the hub's lmms-lab/POPE."""
    metrics = "".join(
        f"  - metric: {m}\n    aggregation: !function utils.{m.replace('pope_', 'pope_aggregate_')}\n    higher_is_better: true\n"
        for m in POPE_METRICS
    )
    return (
        f"task: {task}\n"
        + (f"tag: {tag}\n" if tag else "")
        + "dataset_path: parquet\n"
        f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(parquet)}\n"
        "test_split: test\n"
        "output_type: generate_until\n"
        "doc_to_visual: !function utils.pope_doc_to_visual\n"
        "doc_to_text: !function utils.pope_doc_to_text\n"
        'doc_to_target: "answer"\n'
        "generation_kwargs:\n  max_new_tokens: 128\n  temperature: 0\n  top_p: 1.0\n  num_beams: 1\n  do_sample: false\n"
        "process_results: !function utils.pope_process_results\n"
        f"metric_list:\n{metrics}"
        f'lmms_eval_specific_kwargs:\n  default:\n    pre_prompt: ""\n    post_prompt: {json.dumps(LLAVA_POPE_SUFFIX)}\n'
        "metadata:\n  - version: 0.0\n"
    )


def write_pope_task(
    question_dir: str | None,
    image_dir: str,
    output: str | Path,
    *,
    question_files: dict[str, str] | None = None,
    splits: tuple[str, ...] = POPE_SPLITS,
    limit: int | None = None,
    tag: str = "synthalign_pope",
) -> list[Path]:
    """An lmms-eval task folder (for --include_path) holding POPE's questions with their images, per split:
    `pope_<split>.parquet` and `<tag>_<split>.yaml` (tasks tagged `tag`), and `utils.py`. The files are
    read and checked as `synthalign evaluate` reads them (errors name file:line). Returns the YAMLs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cfg = PopeConfig(question_dir=question_dir, question_files=question_files or {}, image_dir=image_dir, splits=list(splits), limit=limit)
    tables, images = {}, {}
    for split in cfg.splits:
        path = cfg.question_file(split)
        rows = []
        for q in read_questions(path, split, cfg.limit):
            uri = image_location(cfg.image_dir, q["image_file"], f"{path}:{q['line']}", "image_dir")
            if uri not in images:
                fs, local = store.filesystem(uri)
                try:
                    with fs.open_input_stream(local) as stream:
                        images[uri] = stream.read()
                except (FileNotFoundError, OSError) as error:
                    raise BenchmarkFileError(f"{path}:{q['line']}: cannot read image {uri} ({error})") from None
            rows.append({
                "id": f"{split}/{q['question_id']}", "question_id": q["question_id"], "question": q["text"],
                "answer": q["label"], "image_source": q["image_file"],
                "image": {"bytes": images[uri], "path": q["image_file"]}, "category": split,
            })  # fmt: skip
        tables[split] = rows
    folder = Path(output)
    folder.mkdir(parents=True, exist_ok=True)
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    fields = [pa.field(name, image_type if name == "image" else pa.string()) for name in POPE_TASK_FEATURES]
    schema = pa.schema(fields, metadata={"huggingface": json.dumps({"info": {"features": POPE_TASK_FEATURES}})})
    (folder / "utils.py").write_text("# lmms-eval's own POPE functions (prompt, process_results, metrics).\nfrom lmms_eval.tasks.pope.utils import *  # noqa: F401,F403\n")
    written = []
    for split, rows in tables.items():
        parquet = folder / f"pope_{split}.parquet"
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), parquet)
        yaml_path = folder / f"{tag}_{split}.yaml"
        yaml_path.write_text(pope_task_yaml(f"{tag}_{split}", str(parquet.resolve()), tag))
        written.append(yaml_path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m synthalign_ray.evaluate.lmms_eval", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    pope = commands.add_parser("pope-task", help="POPE question files + images -> an lmms-eval task folder for --include_path")
    pope.add_argument("--question-dir", help="folder with *pope_<split>.json(l), e.g. POPE's output/coco/")
    pope.add_argument("--question-file", action="append", default=[], metavar="SPLIT=PATH", help="one split's file (repeatable)")
    pope.add_argument("--image-dir", required=True, help="folder (or URI) of the images the questions name")
    pope.add_argument("--output", required=True, help="task folder to write")
    pope.add_argument("--splits", default=",".join(POPE_SPLITS))
    pope.add_argument("--limit", type=int, default=None, help="first N questions per split")
    pope.add_argument("--tag", default="synthalign_pope", help="lmms-eval tag of the tasks (--tasks TAG runs every split)")
    args = parser.parse_args(argv)
    files = dict(item.split("=", 1) for item in args.question_file)
    try:
        paths = write_pope_task(
            args.question_dir, args.image_dir, args.output, question_files=files,
            splits=tuple(s for s in args.splits.split(",") if s), limit=args.limit, tag=args.tag,
        )  # fmt: skip
    except (BenchmarkFileError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
