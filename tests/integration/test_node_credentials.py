"""Credentials that one node has and another lacks, on a bucket that checks them: a Ray head whose identity may
write the bucket (it runs the driver, as a cluster's head does) and a worker node whose identity may only read
it, as a GPU node type launched with a read-only role (AmazonS3ReadOnlyAccess, roles/storage.objectViewer) is.

The bucket is moto's S3 server with its IAM on: after the set-up, every request must be signed with an access
key made here, and one whose policy lacks the action is refused with ACCESS_DENIED, as S3 refuses it. The head
has no CPUs, so every stage, every shard write and every training worker runs on the worker node."""

import contextlib
import json
import re
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from synthalign_ray import store
from synthalign_ray.ray_private import RELAY_PREFIX
from synthalign_ray.train.fixture import write_pairs
from tests.conftest import ONE_ANSWERER, REPO
from tests.integration.test_object_storage import BUCKET, local_s3_server
from tests.ray_head import local_ray_head

pytestmark = pytest.mark.slow
AWS_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")


@contextlib.contextmanager
def bucket_that_checks_credentials():
    """moto's S3 server and the test bucket, with an IAM user that may write it and one that may only read it;
    yields the endpoint and their credentials. Requests are authenticated from then on (moto lets through
    unauthenticated ones up to its INITIAL_NO_AUTH_ACTION_COUNT, infinite by default)."""
    import boto3
    import moto.settings

    with local_s3_server() as endpoint:
        iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1",
                           aws_access_key_id="testing", aws_secret_access_key="testing")  # fmt: skip
        credentials = {}
        # A read-only role's actions (IAM folds HEAD and listing into s3:GetObject and s3:ListBucket; moto
        # names each request's action after its operation).
        for user, actions in (("writer", ["s3:*"]), ("reader", ["s3:GetObject", "s3:HeadObject", "s3:HeadBucket", "s3:ListBucket", "s3:ListObjectsV2"])):
            policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}
            iam.create_user(UserName=user)
            iam.put_user_policy(UserName=user, PolicyName="bucket", PolicyDocument=json.dumps(policy))
            key = iam.create_access_key(UserName=user)["AccessKey"]
            credentials[user] = {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
        previous = moto.settings.INITIAL_NO_AUTH_ACTION_COUNT
        moto.settings.INITIAL_NO_AUTH_ACTION_COUNT = 0
        try:
            yield endpoint, credentials
        finally:
            moto.settings.INITIAL_NO_AUTH_ACTION_COUNT = previous


@pytest.fixture(scope="module")
def cluster():
    """The bucket, and a cluster of a head with the writer's identity (and no CPUs) and a worker node with the
    reader's; yields (the head, the bucket's endpoint, both identities' credentials). This process, as the
    driver, has the writer's."""
    with bucket_that_checks_credentials() as (endpoint, credentials), pytest.MonkeyPatch.context() as env:
        for name in AWS_KEYS:
            env.delenv(name, raising=False)
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        for name, value in credentials["writer"].items():
            env.setenv(name, value)
        with local_ray_head(num_cpus=0) as head:
            joined = head.add_node(4, {**head.env, **credentials["reader"]})
            assert joined.returncode == 0, joined.stdout[-3000:] + joined.stderr[-3000:]
            yield head, endpoint, credentials


def run_cli(head, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "synthalign_ray.cli", *args]
    return subprocess.run(command, cwd=REPO, env=head.env, capture_output=True, text=True, timeout=900)


def test_rows_a_node_may_not_write_are_failed_with_that_node_and_the_cause(cluster):
    head, endpoint, _ = cluster
    output = f"s3://{BUCKET}/run?endpoint_override={endpoint}&scheme=http"
    run = run_cli(head, "generate", "--config", "configs/tiny.yaml", "--output", output,
                  "--set", f"resources.ray_address={head.address}", "--set", ONE_ANSWERER)  # fmt: skip
    manifest = store.read_json(store.join(output, store.MANIFEST))
    fs, _ = store.filesystem(output)
    failed = [row for shard in store.list_shards(store.join(output, "failed"))
              for row in pq.read_table(shard, columns=["id", "failed_stage", "error"], filesystem=fs).to_pylist()]  # fmt: skip

    log = run.stdout + run.stderr
    # More rows failed than resources.max_failed_fraction allows: exit 1, the cause on the console, no traceback.
    assert run.returncode == 1, log[-6000:]
    assert "Traceback" not in log
    assert "write: 6 rows" in run.stderr and "may not write the output's" in run.stderr, run.stderr[-3000:]
    counts = manifest["counts"]
    assert manifest["complete"] is True
    assert counts["rows"] == counts["failed"] == 6 and counts["failed_by_stage"] == {"write": 6}
    # The driver's node wrote them to failed/, each with the node refused and why.
    assert sorted(row["id"] for row in failed) == sorted(json.loads(line)["id"] for line in (REPO / "configs/prompts/tiny.jsonl").read_text().splitlines())
    nodes = set()
    for row in failed:
        assert row["failed_stage"] == "write"
        refused = re.match(r"ShardWriteDenied: the node at [\d.]+ \(Ray node (\w{12})\) may not write the output's (pairs|dropped|failed)/", row["error"])
        assert refused, row["error"]
        nodes.add(refused[1])
        assert "AWS Error ACCESS_DENIED during PutObject" in row["error"] and "docs/cluster.md#credentials" in row["error"]
    assert len(nodes) == 1  # the reader's node, where every write ran


def test_training_on_a_node_that_may_not_write_stops_with_one_error_line(cluster, tmp_path):
    """Ray Train's worker (on the reader's node: the head has no CPUs) writes the checkpoints and the attempts file:
    refused, the run ends with the cause and the fix on one line, exit 2, instead of Ray Train's traceback."""
    head, endpoint, _ = cluster
    data = write_pairs(str(tmp_path / "pairs"), 4)
    output = f"s3://{BUCKET}/dpo?endpoint_override={endpoint}&scheme=http"
    run = run_cli(head, "train", "--config", "configs/train_tiny.yaml", "--data", data, "--output", output,
                  "--set", f"run.ray_address={head.address}", "--set", "run.max_failures=0", "--set", "merge=false")  # fmt: skip
    assert run.returncode == 2, run.stderr[-6000:]
    # The driver's own lines: Ray relays the workers' (and their tracebacks) with a prefix.
    driver = [line for line in run.stderr.splitlines() if not RELAY_PREFIX.match(line)]
    assert "Traceback" not in "\n".join(driver), run.stderr[-6000:]
    (error,) = [line for line in driver if line.startswith("error:")]
    assert error.startswith("error: training stopped: a node running it may not write its output (")
    assert "AWS Error ACCESS_DENIED" in error and "docs/cluster.md#credentials" in error
