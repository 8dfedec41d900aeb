"""Run outputs on object storage through pyarrow filesystems: a local S3-compatible server (moto's, started
here) and file:// URIs. The store's operations a run and its resume use (shards moved into place, the
manifest, listing, committed ids, accounting) on every form of output URI a user may give.

A whole generate run to s3:// (and its resume) runs in tests/integration/test_job_submit.py, submitted
as a job, so the pipeline's start-up is paid once for both."""

import contextlib
import os
import socket
from collections.abc import Iterator

import pyarrow as pa
import pytest

from synthalign_ray import store
from synthalign_ray.ids import IdSet, digests

BUCKET = "synthalign-test"
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@contextlib.contextmanager
def local_s3_server() -> Iterator[str]:
    """moto's S3 server on a free loopback port with an empty bucket; yields its endpoint URL."""
    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                              aws_access_key_id="testing", aws_secret_access_key="testing")  # fmt: skip
        client.create_bucket(Bucket=BUCKET)
        yield endpoint
    finally:
        server.stop()


@pytest.fixture(scope="module")
def s3_endpoint():
    saved = {key: os.environ.get(key) for key in S3_CREDENTIALS}
    os.environ.update(S3_CREDENTIALS)
    try:
        with local_s3_server() as endpoint:
            yield endpoint
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def rows(ids: list[str], status: str) -> pa.Table:
    n = len(ids)
    return pa.table({
        "id": ids, "status": [status] * n, "drop_reason": ["tie" if status == "dropped" else None] * n,
        "failed_stage": [None] * n,
    })  # fmt: skip


def output_uris(tmp_path, endpoint: str) -> dict[str, str]:
    return {
        # The endpoint in the URI's query, as pyarrow reads it: nothing in the environment needed.
        "s3 query": f"s3://{BUCKET}/query-run?endpoint_override={endpoint}&scheme=http",
        "file uri": f"file://{tmp_path}/file-run",
    }


@pytest.mark.parametrize("form", ["s3 query", "file uri", "s3 env"])
def test_store_operations_of_a_run_on_each_uri_form(form, s3_endpoint, tmp_path, monkeypatch):
    if form == "s3 env":
        monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)  # how the submitted job in test_job_submit sees it
        output = f"s3://{BUCKET}/env-run"
    else:
        output = output_uris(tmp_path, s3_endpoint)[form]
    store.write_json(store.join(output, store.MANIFEST), {"complete": False})
    store.write_table(store.join(output, "pairs", "part-a.parquet"), store.with_hf_features(rows(["p1", "p2"], "ok")))
    store.write_table(store.join(output, "dropped", "part-b.parquet"), rows(["p3"], "dropped"))
    store.write_table(store.join(output, "failed", "part-c.parquet"), rows(["p4"], "failed"))

    assert store.read_json(store.join(output, store.MANIFEST)) == {"complete": False}
    assert [s.rsplit("/", 1)[1] for s in store.list_shards(store.join(output, "pairs"))] == ["part-a.parquet"]
    assert store.committed_ids(output) == IdSet.of(["p1", "p2", "p3"])  # failed rows are retried by a resume
    outcomes = store.output_counts(output, IdSet.of(["p1", "p2", "p3", "p4", "p5"]))
    assert outcomes.counts["status"] == {"ok": 2, "dropped": 1, "failed": 1}
    assert outcomes.contains(digests(["p1", "p2", "p3", "p4", "p5"])).tolist() == [True] * 4 + [False]
    assert outcomes.missing() == 1 and outcomes.duplicates == []
    assert store.remove_shards(store.join(output, "failed")) == 1
    assert store.list_shards(store.join(output, "failed")) == []
    # No temporary file of the atomic writes is left behind.
    fs, path = store.filesystem(output)
    from pyarrow import fs as pafs

    names = [info.path for info in fs.get_file_info(pafs.FileSelector(path, recursive=True))]
    assert not [name for name in names if ".tmp-" in name]


def test_a_run_log_on_object_storage_is_named_by_its_uri_and_copied_there(s3_endpoint, tmp_path):
    import tempfile

    from synthalign_ray.console import run_console

    output = output_uris(tmp_path, s3_endpoint)["s3 query"]
    with run_console(output, "generate", None, verbose=False) as log:
        print("a line of the run")
    # The name the command prints is the log's place in the bucket, where it is once the run ends.
    base, _, query = output.partition("?")
    assert log.startswith(f"{base}/logs/generate-") and log.endswith(f".log?{query}")
    fs, path = store.filesystem(log)
    with fs.open_input_stream(path) as copied:
        assert b"a line of the run" in copied.read()
    name = path.rsplit("/", 1)[1]
    assert not os.path.exists(os.path.join(tempfile.gettempdir(), name))  # the local copy is gone
