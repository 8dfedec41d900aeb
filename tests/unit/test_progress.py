"""The stage table of a finished run, over hand-made Ray Data stats objects (Ray's own dataclasses, so a
renamed field in Ray fails here rather than at the end of a long run)."""

from ray.data._internal.stats import DatasetStatsSummary, IterStatsSummary, OperatorStatsSummary, StatsSummary

from synthalign_ray.progress import StageStats, add_run_stats, format_table, grouped_run_stats, is_write, method_stage_rows, stage_stats


def operator(name, rows_out, *, rows_in=None, wall_s, busy_s):
    return OperatorStatsSummary(
        operator_name=name,
        is_sub_operator=False,
        time_total_s=wall_s,
        earliest_start_time=100.0,
        latest_end_time=100.0 + wall_s,
        block_execution_summary_str="",
        wall_time=StatsSummary(min=0, max=busy_s, mean=busy_s, sum=busy_s, count=1),
        output_num_rows=StatsSummary(min=rows_out, max=rows_out, mean=rows_out, sum=rows_out, count=1),
        total_input_num_rows=rows_in,
    )


def dataset(number, op, parents=(), total_s=40.0, uuid="ds"):
    iter_stats = IterStatsSummary(*[0] * len(IterStatsSummary.__dataclass_fields__))
    return DatasetStatsSummary(
        operators_stats=[op],
        iter_stats=iter_stats,
        parents=list(parents),
        number=number,
        dataset_uuid=uuid,
        time_total_s=total_s,
        base_name=op.operator_name,
        extra_metrics={},
        global_bytes_spilled=0,
        global_bytes_restored=0,
        dataset_bytes_spilled=0,
        streaming_exec_schedule_s=0,
        streaming_exec_schedule_avg_s=0,
        streaming_exec_schedule_max_s=0,
        streaming_exec_schedule_p50_s=0,
        streaming_exec_schedule_p90_s=0,
    )


def pipeline_stats():
    """The chain Ray reports after `write_datasink`: source <- images (actors) <- fused pairs + write."""
    source = dataset(0, operator("ReadBlockFile", 6, rows_in=0, wall_s=0.0, busy_s=0.01))
    images = dataset(1, operator("MapBatches(ImageGenerator)", 6, rows_in=6, wall_s=10.0, busy_s=9.0), [source])
    # A write operator's output is one result row per write task (3 here), not the 6 rows it wrote.
    write = operator("MapBatches(PairBuilder)->Write", 3, rows_in=6, wall_s=8.0, busy_s=2.5)
    return dataset(2, write, [images])


def test_stages_come_source_first_with_rows_times_and_rates():
    stages = stage_stats(pipeline_stats())
    assert [s.stage for s in stages] == ["ReadBlockFile", "MapBatches(ImageGenerator)", "MapBatches(PairBuilder)->Write"]
    source, images, write = stages
    assert source.rows_in is None and source.rows_out == 6 and source.rows_per_s == 0.0
    assert (images.rows_in, images.rows_out, images.wall_s, images.busy_s) == (6, 6, 10.0, 9.0)
    assert images.rows_per_s == 0.6 and images.share_of_run == 0.25


def test_a_write_counts_the_rows_it_wrote_not_its_result_rows():
    write = stage_stats(pipeline_stats())[-1]
    assert write.rows_in == write.rows_out == 6
    assert write.rows_per_s == 0.75 and write.share_of_run == 0.2
    assert is_write("Write") and is_write("MapBatches(PairBuilder)->Write")
    assert not is_write("MapBatches(Rewrite)") and not is_write("Write->MapBatches(x)")


def test_a_parent_shared_by_two_branches_is_listed_once():
    source = dataset(0, operator("ReadBlockFile", 4, rows_in=0, wall_s=0.0, busy_s=0.0))
    union = dataset(1, operator("Union", 8, rows_in=8, wall_s=1.0, busy_s=0.0), [source, source])
    assert [s.stage for s in stage_stats(union)] == ["ReadBlockFile", "Union"]


def test_table_aligns_columns_and_states_the_run_time():
    stages = stage_stats(pipeline_stats())
    lines = format_table(stages, run_s=40.0).splitlines()
    assert lines[0].split() == ["stage", "rows", "in", "rows", "out", "wall", "s", "busy", "s", "rows/s", "%", "of", "run"]
    assert lines[1].split() == ["ReadBlockFile", "-", "6", "0.00", "0.01", "0.00", "0.0"]
    assert lines[2].split() == ["MapBatches(ImageGenerator)", "6", "6", "10.00", "9.00", "0.60", "25.0"]
    assert len({len(line) for line in lines[:4]}) == 1  # right-aligned numbers: every row as wide
    assert lines[4] == "execution time of the whole dataset: 40.00 s (stages overlap: they stream)"


def test_manifest_rows_round_trip_to_the_same_table():
    stages = stage_stats(pipeline_stats())
    assert [StageStats(**s.to_dict()) for s in stages] == stages


def test_waves_add_up_to_one_stage_table():
    one = run_stats_of(pipeline_stats())
    assert add_run_stats([one]) is one
    assert add_run_stats([]) == {"execution_seconds": 0, "operators": []}
    both = add_run_stats([one, one])
    assert both["execution_seconds"] == 80.0
    source, images, write = both["operators"]
    assert source["rows_in"] is None and source["rows_out"] == 12
    assert (images["rows_in"], images["rows_out"], images["wall_s"], images["busy_s"]) == (12, 12, 20.0, 18.0)
    assert images["rows_per_s"] == 0.6 and images["share_of_run"] == 0.25
    assert write["rows_out"] == 12  # the rows it wrote


def run_stats_of(summary):
    return {"execution_seconds": summary.time_total_s, "operators": [s.to_dict() for s in stage_stats(summary)]}


# The operators of the paper-twin run with three answerers (its manifest), in Ray's names and order:
# (name, rows in, wall s, busy s).
PAPER_TWIN_OPERATORS = [
    ("ReadBlockFile", None, 0.01, 0.01),
    ("MapBatches(ImageGenerator)", 6, 17.7, 17.0),
    ("MapBatches(ImageScorer)", 6, 3.7, 3.5),
    ("MapBatches(ImageSelector)->MapBatches(InstructionWriter)->MapBatches(record)->Map(_preprocess)", 6, 0.35, 0.3),
    ("MapBatches(ChatTemplateUDF[llava-v1.6-mistral-7b])", 6, 0.23, 0.2),
    ("MapBatches(MultiSampleEngineUDF[llava-v1.6-mistral-7b])", 6, 0.69, 1.1),
    ("Map(_postprocess)->Map(finish_row)->Map(_preprocess)", 6, 0.03, 0.03),
    ("MapBatches(ChatTemplateUDF[llava-v1.6-vicuna-13b])", 6, 0.06, 0.06),
    ("MapBatches(MultiSampleEngineUDF[llava-v1.6-vicuna-13b])", 6, 1.25, 2.0),
    ("Map(_postprocess)->Map(finish_row)->Map(_preprocess)", 6, 0.11, 0.1),
    ("MapBatches(ChatTemplateUDF[llava-v1.6-vicuna-7b])", 6, 0.21, 0.2),
    ("MapBatches(MultiSampleEngineUDF[llava-v1.6-vicuna-7b])", 6, 1.98, 3.0),
    ("Map(_postprocess)->Map(finish_row)->MapBatches(restore)", 6, 0.08, 0.08),
    ("MapBatches(ResponseScorer)", 6, 0.19, 0.18),
    ("MapBatches(PairBuilder)->Write", 6, 0.15, 0.15),
]


def paper_twin_stages():
    from synthalign_ray.config import load_config
    from synthalign_ray.stages import graph
    from tests.conftest import REPO

    cfg = load_config(REPO / "configs" / "paper_tiny.yaml")
    return cfg, [(stage.name, stage.operators) for stage in graph.build(cfg)]


def operator_rows(operators):
    return [
        StageStats(name, rows_in, 6, wall_s, busy_s, round(6 / wall_s, 3), round(wall_s / 20.0, 4)).to_dict()
        for name, rows_in, wall_s, busy_s in operators
    ]


def test_the_table_names_the_methods_stages_one_row_per_answerer():
    cfg, stages = paper_twin_stages()
    rows = method_stage_rows(operator_rows(PAPER_TWIN_OPERATORS), stages)
    answerers = [f"responses[{model.name}]" for model in cfg.responses.models]
    assert answerers == ["responses[llava-v1.6-mistral-7b]", "responses[llava-v1.6-vicuna-13b]", "responses[llava-v1.6-vicuna-7b]"]
    assert [row["stage"] for row in rows] == [
        "prompts", "images", "image_scores", "select_image + instructions", *answerers, "response_scores", "pairs",
    ]
    mistral = rows[4]
    # Its chat template, its engine and the glue after it: the engine's wall time, the summed busy time.
    assert (mistral["rows_in"], mistral["rows_out"], mistral["wall_s"], mistral["busy_s"]) == (6, 6, 0.69, 1.33)
    assert mistral["rows_per_s"] == round(6 / 0.69, 3) and mistral["share_of_run"] == round(0.69 / 20.0, 4)


def test_simulated_stand_ins_are_named_by_their_stage():
    cfg, stages = paper_twin_stages()
    names = ["images", "image_scores", *(model.name for model in cfg.responses.models), "response_scores"]
    simulated = [("ReadBlockFile", None, 0.01, 0.01), *((f"MapBatches(SimulatedStage[{name}])", 6, 1.0, 1.0) for name in names)]
    simulated.insert(3, ("MapBatches(ImageSelector)->MapBatches(InstructionWriter)", 6, 0.1, 0.1))
    simulated.append(("MapBatches(PairBuilder)->Write", 6, 0.1, 0.1))
    rows = method_stage_rows(operator_rows(simulated), stages)
    assert [row["stage"] for row in rows] == [
        "prompts", "images", "image_scores", "select_image + instructions",
        *(f"responses[{model.name}]" for model in cfg.responses.models), "response_scores", "pairs",
    ]


def test_groups_of_rows_get_a_stage_table_each():
    """A run whose rows restored different stages ran a graph per group (checkpoints.plan_todo): each
    group's waves add up among themselves, and every row of the tables names its group."""
    one = run_stats_of(pipeline_stats())
    stages = [("images", ("ImageGenerator",))]
    restored = {"execution_seconds": 2.0, "operators": [dict(one["operators"][0], stage="ReadBlockFile->MapBatches(RestoreEntries[images])")]}
    grouped = grouped_run_stats([[one, one], [], [restored]], stages + [("images", ("RestoreEntries[images]",))])
    assert grouped["execution_seconds"] == 82.0
    assert [(row["group"], row["rows_out"]) for row in grouped["operators"]] == [(0, 12), (0, 12), (0, 12), (2, 6)]
    assert [(row["group"], row["stage"]) for row in grouped["stages"]] == [(0, "prompts"), (0, "images"), (2, "images")]
