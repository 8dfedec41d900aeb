"""The console of a run: relayed worker lines go to the log only, this tool's lines to both, and Ray Data's
logging progress becomes one line per stage that moved. The relayed lines are Ray's own format, printed
by Ray's own `print_worker_logs`, so a change in Ray's prefix fails here."""

import io
import logging
import sys

from ray._private.worker import print_worker_logs

from synthalign_ray.console import ProgressLines, RunConsole

STAGES = [
    ("images", ("ImageGenerator", "[images]")),
    ("select_image", ("ImageSelector",)),
    ("instructions", ("InstructionWriter", "[instructions]")),
    ("responses[llava-1.5]", ("[llava-1.5]",)),
    ("pairs", ("PairBuilder",)),
]

# One report of Ray Data's logging progress, as the wave process logs it.
REPORT = """======= Running Dataset: dataset_035ACEEZxiT2aJi2i64NqQ_0 =======
Total Progress: 0/?
Active & requested resources: 0/8 CPU, 624.0B/3.4GiB object store (pending: 5.5 CPU)

ReadBlockFile: 5/5
  Tasks: 0; Actors: 0; Queued blocks: 0 (0.0B); Resources: 0.0 CPU, 624.0B object store
MapBatches(ImageGenerator): {images}/5
  Tasks: 0; Actors: 1 (running=0, restarting=0, pending=1, active=0, idle=0, util=0.000, tasks_in_flight=0); Queued blocks: 3
MapBatches(ImageSelector)->MapBatches(InstructionWriter)->MapBatches(record)->Map(_preprocess): 0/1
  Tasks: 0; Actors: 0; Queued blocks: 0 (0.0B); Resources: 0.0 CPU, 0.0B object store
MapBatches(ChatTemplateUDF[llava-1.5]): 0/1
  Tasks: 0; Actors: 1 (running=0, restarting=0, pending=1, active=0, idle=0, util=0.000, tasks_in_flight=0); Queued blocks: 0
MapBatches(MultiSampleEngineUDF[llava-1.5]): {answers}/5
  Tasks: 0; Actors: 1 (running=0, restarting=0, pending=1, active=0, idle=0, util=0.000, tasks_in_flight=0); Queued blocks: 0
Map(_postprocess)->Map(finish_row)->MapBatches(restore): 0/1
  Tasks: 0 [backpressured:tasks(ResourceBudget)]; Actors: 0; Queued blocks: 0 (0.0B); Resources: 0.0 CPU, 0.0B object store
MapBatches(PairBuilder)->Write: 0/1
  Tasks: 0; Actors: 0; Queued blocks: 0 (0.0B); Resources: 0.0 CPU, 0.0B object store
================================================================="""


def relay(stream, lines, **source):
    """Ray's driver relaying a worker's lines to `stream`, as it does to sys.stdout."""
    print_worker_logs({"pid": 4242, "ip": "10.0.0.1", "localhost": "10.0.0.1", "lines": lines, **source}, stream)


def test_a_report_becomes_one_line_per_stage_that_moved():
    lines = []
    clock = iter([0.0, 30.0, 60.0]).__next__
    progress = ProgressLines(STAGES, lines.append, clock=clock)
    for text in REPORT.format(images=2, answers=0).splitlines():
        progress.line(text)
    assert lines == [
        "[   30 s] prompts: 5/5 rows",
        "[   30 s] images: 2/5 rows",
        "[   30 s] select_image + instructions: 0/1 rows",
        "[   30 s] responses[llava-1.5]: 0/1 rows",  # its last operator (the carry's restore) gave none yet
        "[   30 s] pairs: 0/1 rows",
    ]
    lines.clear()
    for text in REPORT.format(images=5, answers=3).splitlines():
        progress.line(text)
    assert lines == ["[   60 s] images: 5/5 rows"]


def test_relayed_lines_go_to_the_log_and_the_tools_own_to_both(tmp_path):
    log = tmp_path / "run.log"
    console = io.StringIO()
    saved = sys.stdout
    sys.stdout = console
    try:
        with RunConsole(str(log), STAGES):
            print("our own line")
            relay(sys.stdout, ["Calling ray.init() again after it has already been called."], task_name="drive_wave")
            relay(sys.stdout, ["INFO vllm engine started"], actor_name="MapWorker(MapBatches(MultiSampleEngineUDF[llava-1.5]))")
            relay(sys.stdout, REPORT.format(images=1, answers=0).splitlines(), task_name="drive_wave")
            logging.getLogger("synthalign_ray.pipeline").warning("a warning of ours")
            logging.getLogger("transformers.modeling_utils").warning("bf16 weights loaded into float32")
            logging.getLogger("ray.data").info("Ray's own logger")
    finally:
        sys.stdout = saved
    shown = console.getvalue().splitlines()
    assert shown[0] == "our own line"
    assert "[    0 s] images: 1/5 rows" in shown and len(shown) == 6, shown
    kept = log.read_text()
    for line in ("our own line", "Calling ray.init() again", "vllm engine started", "MapBatches(ImageGenerator): 1/5",
                 "a warning of ours", "bf16 weights loaded", "Ray's own logger"):  # fmt: skip
        assert line in kept, line
    assert not any(word in console.getvalue() for word in ("Calling ray.init", "vllm", "bf16", "Ray's own"))
