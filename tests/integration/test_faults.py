"""Faults on a multi-node Ray cluster (`ray.cluster_utils.Cluster` on this machine), as spot GPUs meet them.

- A node is preempted mid-generation (Ray's drain notice with reason preemption, then its processes
  SIGKILLed at the deadline, as a spot VM goes) and the autoscaler's replacement joins: the run goes on
  (Ray restarts the lost actor, retries its tasks, rebuilds lost objects) and the output still holds
  every prompt exactly once.
- A row kills its replica every time (SYNTHALIGN_INJECT_CRASHES, as an OOM kill would): Ray restarts the
  replica and resubmits the batch; after `crash_retries` reruns the stage records the batch's rows failed
  instead of running it again, and the rest of the run completes.
- A local output path on a cluster of several nodes is refused unless resources.shared_filesystem says
  every node mounts it, and so is a local training output unless run.shared_filesystem says so.
- A training worker's node gets a preemption notice: the worker checkpoints at once, the node goes, and
  the run resumes from that checkpoint on the replacement, counting the steps it ran again.

A custom resource `diffusion_node` stands in for a GPU type, so the image stage runs on the worker node
the test removes. The driver is `synthalign generate` in a subprocess joining the cluster, as under
`ray job submit`.
"""

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from synthalign_ray.train.dpo import ATTEMPTS_FILE
from synthalign_ray.train.fixture import write_pairs
from tests.conftest import ONE_ANSWERER, REPO
from tests.ray_head import RAY, ray_env, stop_head

pytestmark = pytest.mark.slow
PROMPT_IDS = sorted(json.loads(line)["id"] for line in (REPO / "configs/prompts/tiny.jsonl").read_text().splitlines())
# Blocks of 2 in file order: [art, school], [transport, weather], [daily, industrial].
STUCK_ROW = "art-0001"  # on the node to be lost, the image stage hangs on its block (often the first) until the node goes
CRASH_ROW = "transport-0001"  # its block kills the image scorer every time
IMAGES_ON_DIFFUSION_NODE = "images.pool={min_actors: 1, max_actors: 1, num_cpus: 1, resources: {diffusion_node: 1}}"
CRASH_RETRIES = 2
DRAIN_DEADLINE_S = 5


@pytest.fixture(scope="module")
def cluster(monkeypatch_module):
    from ray.cluster_utils import Cluster

    monkeypatch_module.setenv("RAY_AUTH_MODE", "disabled")  # a test cluster of this machine (tests/ray_head.py)
    # Ray Train's preemption watcher asks the GCS for drains every 5 s by default; the tiny training's steps
    # are much shorter.
    monkeypatch_module.setenv("RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S", "0.5")
    # Short path under /tmp: Ray's unix sockets live in it; every process of the cluster names it.
    temp_dir = tempfile.mkdtemp(prefix="sa-ray-", dir="/tmp")
    # On the machine's own IP: a driver given 127.0.0.1 connects to that IP instead, where a head bound to
    # loopback only is not listening.
    common = dict(temp_dir=temp_dir, include_dashboard=False)
    cluster = Cluster(initialize_head=True, head_node_args=dict(num_cpus=8, object_store_memory=400 * 2**20, **common))
    try:
        yield cluster, common
    finally:
        cluster.shutdown()
        stop_head(temp_dir)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture
def generate():
    """Starts `synthalign generate` on the cluster; a run the test leaves running is killed after it, so a
    failed test cannot hold the cluster's resources through the next one."""
    processes = []

    def start(address: str, out: Path, *sets: str, shared: bool = True) -> subprocess.Popen:
        command = [sys.executable, "-m", "synthalign_ray.cli", "generate", "--config", "configs/tiny.yaml", "--output", str(out)]
        # The nodes of this cluster are processes of one machine: a local output is truly shared by them.
        for item in (f"resources.ray_address={address}", f"resources.shared_filesystem={str(shared).lower()}", ONE_ANSWERER, *sets):
            command += ["--set", item]
        with open(out.parent / f"{out.name}.log", "w") as log:
            processes.append(subprocess.Popen(command, cwd=REPO, env=ray_env(), stdout=log, stderr=subprocess.STDOUT, text=True))
        return processes[-1]

    yield start
    for process in processes:
        process.kill()
        process.wait()


def train_command(address: str, data: str, out: Path, *sets: str) -> list[str]:
    """`synthalign train` of train_tiny.yaml on the cluster at `address`, with `--set` for each of `sets`."""
    command = [sys.executable, "-m", "synthalign_ray.cli", "train", "--config", "configs/train_tiny.yaml", "--data", data, "--output", str(out)]
    for item in (f"run.ray_address={address}", *sets):
        command += ["--set", item]
    return command


def run_log(out: Path) -> str:
    """What the run printed, then its log under the output (the workers' lines: injected faults and delays)."""
    return (out.parent / f"{out.name}.log").read_text() + "".join(log.read_text() for log in sorted((out / "logs").glob("*.log")))


def finish(process: subprocess.Popen, out: Path, timeout: float = 600) -> tuple[dict, str]:
    code = process.wait(timeout=timeout)
    log = run_log(out)
    assert code == 0, log[-6000:]
    return json.loads((out / "manifest.json").read_text()), log


def rows(out: Path, folder: str) -> list[dict]:
    return [row for shard in sorted((out / folder).glob("*.parquet")) for row in pq.read_table(shard, columns=["id", "status", "failed_stage", "error"]).to_pylist()]


def test_node_lost_mid_run_keeps_every_row_exactly_once(cluster, generate, tmp_path):
    cluster, common = cluster
    doomed = cluster.add_node(
        num_cpus=1, resources={"diffusion_node": 1}, env_vars={"SYNTHALIGN_INJECT_DELAYS": f"images:{STUCK_ROW}=900"}, **common
    )
    out = tmp_path / "node-lost"
    process = generate(cluster.address, out, IMAGES_ON_DIFFUSION_NODE)
    # The node goes once the stuck block is in its image stage. Not at the first shard: the blocks reach
    # the one image replica in any order, and those queued behind the stuck block wait with it.
    def stuck_block_in_flight() -> bool:
        assert process.poll() is None, "the run ended before the stuck block"
        return f"images: injected delay on ['{STUCK_ROW}'" in run_log(out)

    wait_for(stuck_block_in_flight, "the stuck block", timeout=400)
    committed_before = {row["id"] for folder in ("pairs", "dropped") for row in rows(out, folder)}
    # Preempted as a spot VM is: the notice first, then SIGKILL at the deadline, the stuck block still in flight.
    preemption_notice(cluster, doomed, DRAIN_DEADLINE_S)
    time.sleep(DRAIN_DEADLINE_S)
    cluster.remove_node(doomed, allow_graceful=False)
    cluster.add_node(num_cpus=1, resources={"diffusion_node": 1}, **common)  # the autoscaler's replacement

    manifest, _ = finish(process, out)
    written = [row["id"] for folder in ("pairs", "dropped", "failed") for row in rows(out, folder)]
    assert sorted(written) == PROMPT_IDS  # each prompt once: nothing lost, nothing written twice
    assert STUCK_ROW not in committed_before  # the node went with work in flight
    counts = manifest["counts"]
    assert counts["pairs"] + counts["dropped"] + counts["failed"] == len(PROMPT_IDS)
    # Ray re-ran the lost node's work elsewhere: no row had to be given up.
    assert counts["failed"] == 0, rows(out, "failed")


def test_replica_killed_on_every_try_fails_its_block_and_the_run_completes(cluster, generate, tmp_path):
    cluster, _ = cluster
    out = tmp_path / "crashes"
    process = generate(
        cluster.address,
        out,
        f"resources.env.SYNTHALIGN_INJECT_CRASHES=image_scores:{CRASH_ROW}",
        f"image_scores.pool.crash_retries={CRASH_RETRIES}",
        "image_scores.pool.batch_size=2",  # a batch is a block: the rows failed together are the block's
        "resources.max_failed_fraction=0.5",  # 2 of 6 rows fail by design: the run is a success
    )
    manifest, log = finish(process, out)

    failed = rows(out, "failed")
    crash_block = {"transport-0001", "weather-0001"}
    assert {row["id"] for row in failed} == crash_block
    assert all(row["status"] == "failed" and row["failed_stage"] == "image_scores" for row in failed)
    assert all(row["error"].startswith(f"ReplicaDied: the image_scores replica running this row's batch died {CRASH_RETRIES + 1} times") for row in failed)
    others = [row["id"] for folder in ("pairs", "dropped") for row in rows(out, folder)]
    assert sorted(others) == sorted(set(PROMPT_IDS) - crash_block)
    assert manifest["counts"]["failed_by_stage"] == {"image_scores": 2}
    # The first try and each rerun met a fresh replica and killed it.
    assert log.count("injected crash on") == CRASH_RETRIES + 1, log[-6000:]


def test_a_local_output_on_several_nodes_is_refused_unless_declared_shared(cluster, generate, tmp_path):
    """generate's shards and train's checkpoints and adapter would each stay on the node that wrote them."""
    cluster, common = cluster
    extra = cluster.add_node(num_cpus=1, **common)
    data = write_pairs(str(tmp_path / "pairs-run"), 2)
    train_out = tmp_path / "dpo"
    try:
        out = tmp_path / "local"
        process = generate(cluster.address, out, shared=False)
        code = process.wait(timeout=300)
        command = train_command(cluster.address, data, train_out)
        trained = subprocess.run(command, cwd=REPO, env=ray_env(), capture_output=True, text=True, timeout=300)
    finally:
        cluster.remove_node(extra)
    log = (out.parent / f"{out.name}.log").read_text()
    assert code == 2, log[-6000:]
    assert f"error: --output {out}: a local path on a Ray cluster of" in log and "resources.shared_filesystem" in log
    assert "Traceback" not in log
    assert not [shard for folder in ("pairs", "dropped", "failed") for shard in (out / folder).glob("*.parquet")]

    assert trained.returncode == 2, trained.stderr[-6000:]
    assert f"error: --output {train_out}: a local path on a Ray cluster of" in trained.stderr
    assert "run.shared_filesystem" in trained.stderr and "Traceback" not in trained.stderr
    assert not train_out.exists()  # refused before the run claimed the output


def test_training_checkpoints_on_a_preemption_notice_and_resumes_there(cluster, tmp_path):
    """The one training worker's node gets a spot notice mid-run: the worker saves a checkpoint at the end
    of that step (no periodic one is due), the node goes, and on the replacement the run resumes from it."""
    cluster, common = cluster
    doomed = cluster.add_node(num_cpus=1, resources={"train_slot": 1}, **common)
    data, out, steps = write_pairs(str(tmp_path / "pairs-run"), 8), tmp_path / "dpo", 100
    command = train_command(
        cluster.address, data, out, "run.shared_filesystem=true", "scaling.num_workers=1",
        "scaling.resources_per_worker={train_slot: 1}", "trl.per_device_train_batch_size=2", f"trl.max_steps={steps}",
        "run.checkpoint_every=1000", "merge=false",
    )  # fmt: skip
    log_path = tmp_path / "train.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=REPO, env=ray_env(), stdout=log, stderr=subprocess.STDOUT, text=True)

    def reached(step: int) -> bool:
        attempts = out / ATTEMPTS_FILE
        assert process.poll() is None, log_path.read_text()[-6000:]
        return attempts.is_file() and json.loads(attempts.read_text())["attempts"][-1]["to_step"] >= step

    try:
        wait_for(lambda: reached(3), "step 3")
        preemption_notice(cluster, doomed, deadline_s=60)
        # Ray Train's controller registers a reported checkpoint in its snapshot a moment later; a node gone
        # before that takes the checkpoint with it (a real notice's deadline leaves the time).
        snapshot = out / "ray" / "dpo-tiny" / "checkpoint_manager_snapshot.json"
        wait_for(lambda: reached(0) and snapshot.is_file(), "the notice's checkpoint, registered")
        checkpoint_step = json.loads(snapshot.read_text())["latest_checkpoint_result"]["metrics"]["step"]
        cluster.remove_node(doomed, allow_graceful=False)  # before the deadline, as a spot VM may go
        cluster.add_node(num_cpus=1, resources={"train_slot": 1}, **common)  # the autoscaler's replacement
        code = process.wait(timeout=600)
    finally:
        process.kill()
    log = log_path.read_text()
    assert code == 0, log[-6000:]
    assert "preemption notice for node(s)" in log
    worker = json.loads((out / "train_summary.json").read_text())["worker"]
    first, last = worker["attempts"]
    assert 3 <= checkpoint_step == worker["resumed_from_step"] == last["from_step"] <= first["to_step"] < steps == last["to_step"]
    assert worker["steps_redone"] == first["to_step"] - last["from_step"]


def preemption_notice(cluster, node, deadline_s: int) -> None:
    """Ray's drain of NODE with reason preemption and a deadline, as autoscaler v2 relays a cloud's spot
    notice (`ray drain-node`, Ray's developer command for it)."""
    notice = [RAY, "drain-node", "--address", cluster.address, "--node-id", node.node_id,
              "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "spot preemption (test)",
              "--deadline-remaining-seconds", str(deadline_s)]  # fmt: skip
    drained = subprocess.run(notice, env=ray_env(), capture_output=True, text=True, timeout=120)
    assert drained.returncode == 0, drained.stdout + drained.stderr


def wait_for(condition, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
