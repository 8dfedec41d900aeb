"""The cluster files (cluster/): launcher YAMLs pass Ray's own cluster-config validation, KubeRay manifests
carry the CRD fields the operator reads, and every entry point, config, image and install step they
name exists in this repo. Offline: no cloud, no Kubernetes, no image build."""

import copy
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from synthalign_ray.config import SynthAlignConfig, load_config
from synthalign_ray.evaluate.runner import EvalConfig
from synthalign_ray.train.config import TrainConfig
from tests.conftest import REPO

CLUSTER = REPO / "cluster"
LAUNCHER_CONFIGS = ["aws.yaml", "gcp.yaml"]
KUBERAY = sorted((CLUSTER / "kuberay").glob("*.yaml"))
# Where cluster/Dockerfile puts the repo: paths under it in the manifests are repo paths.
IMAGE_ROOT = "/app"
# The config schema each job entry point loads (the CLI command it runs).
JOB_SCHEMAS = {"generate.py": SynthAlignConfig, "train_dpo.py": TrainConfig, "evaluate.py": EvalConfig}
RAY_SCHEMA = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def launcher(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def kuberay_docs() -> list[tuple[Path, dict]]:
    return [(path, doc) for path in KUBERAY for doc in yaml.safe_load_all(path.read_text()) if doc]


def of_kind(kind: str) -> list[dict]:
    return [doc for _, doc in kuberay_docs() if doc["kind"] == kind]


def pod_templates(doc: dict) -> list[dict]:
    """Every pod spec of a RayCluster or RayJob (head, worker groups, job submitter)."""
    spec = doc["spec"]
    cluster = spec.get("rayClusterSpec", spec) if doc["kind"] == "RayJob" else spec
    pods = []
    if "headGroupSpec" in cluster:
        pods.append(cluster["headGroupSpec"]["template"]["spec"])
        pods += [group["template"]["spec"] for group in cluster.get("workerGroupSpecs", [])]
    if "submitterPodTemplate" in spec:
        pods.append(spec["submitterPodTemplate"]["spec"])
    return pods


# Launcher YAMLs (`ray up`)


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_passes_rays_validation(name):
    config = launcher(name)
    jsonschema.validate(config, RAY_SCHEMA)  # as written: no misspelled or unknown field
    validate_config(prepare_config(copy.deepcopy(config)))  # as `ray up` checks it, defaults filled in


def test_rays_validation_catches_a_misspelled_field():
    config = launcher("aws.yaml")
    config["setup_comands"] = config.pop("setup_commands")
    with pytest.raises(jsonschema.ValidationError, match="setup_comands"):
        validate_config(prepare_config(config))


def is_spot(provider: str, node_config: dict) -> bool:
    if provider == "aws":
        return node_config.get("InstanceMarketOptions", {}).get("MarketType") == "spot"
    scheduling = node_config.get("scheduling", {})
    return scheduling.get("provisioningModel") == "SPOT" or scheduling.get("preemptible") is True


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_has_a_cpu_head_and_spot_gpu_workers_from_zero(name):
    config = launcher(name)
    provider = config["provider"]["type"]
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and not is_spot(provider, head["node_config"])
    workers = {key: spec for key, spec in types.items() if key != config["head_node_type"]}
    assert workers
    for key, spec in workers.items():
        assert spec["min_workers"] == 0, key  # nothing runs (or bills) until a job asks for GPUs
        assert 0 < spec["max_workers"] <= config["max_workers"], key
        assert spec["resources"]["GPU"] >= 1, key
        assert is_spot(provider, spec["node_config"]), key


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_installs_the_repo_with_scripts_install_sh(name):
    config = launcher(name)
    mount = next(remote for remote, local in config["file_mounts"].items() if local == ".")
    assert {".venv", "runs", ".git"} <= set(config["rsync_exclude"])  # the repo goes up, not the laptop's venv
    install = [cmd for cmd in config["setup_commands"] if "scripts/install.sh" in cmd]
    assert len(install) == 1 and install[0].startswith(f"cd {mount} && ") and "bash scripts/install.sh" in install[0]
    assert "PYTHON=python3.11 " in install[0]  # the Python the locks are resolved for (scripts/lock.sh)
    # Ray and the jobs' python are the venv's that install.sh made (the launcher sources ~/.bashrc).
    assert any(f"source {mount}/.venv/bin/activate" in cmd for cmd in config["setup_commands"])
    assert all("--head" in cmd or cmd == "ray stop" for cmd in config["head_start_ray_commands"])


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_nodes_start_ray_with_token_auth_from_the_mounted_token(name):
    """`ray start --head` turns token auth on where ~/.ray/auth_token exists, but `ray start --address` (a
    worker node) does not: without RAY_AUTH_MODE=token a worker node cannot join an authenticated head."""
    config = launcher(name)
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    starts = [cmd for key in ("head_start_ray_commands", "worker_start_ray_commands") for cmd in config[key] if "ray start" in cmd]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token ray start" in cmd for cmd in starts)
    assert "export RAY_AUTH_MODE=token" in (CLUSTER / name).read_text()  # the submit the header shows


def test_gpu_workers_get_the_credentials_ray_gives_only_the_head():
    """Ray's launcher gives its instance profile (AWS) or service account (GCP) to the head alone; GPU
    workers write shards, checkpoints and adapters to the bucket too."""
    aws, gcp = launcher("aws.yaml"), launcher("gcp.yaml")
    for name, spec in aws["available_node_types"].items():
        if spec["resources"].get("GPU"):
            assert spec["node_config"]["IamInstanceProfile"] == {"Name": "ray-autoscaler-v1"}, name
    project = gcp["provider"]["project_id"]
    for name, spec in gcp["available_node_types"].items():
        if spec["resources"].get("GPU"):
            (account,) = spec["node_config"]["serviceAccounts"]
            assert account["email"] == f"ray-autoscaler-sa-v1@{project}.iam.gserviceaccount.com", name
            assert account["scopes"] == ["https://www.googleapis.com/auth/cloud-platform"], name


# KubeRay manifests


def test_kuberay_files_hold_a_raycluster_and_a_rayjob_per_entry_point():
    assert [doc["metadata"]["name"] for doc in of_kind("RayCluster")] == ["synthalign"]
    scripts = sorted(Path(shlex.split(job["spec"]["entrypoint"])[1]).name for job in of_kind("RayJob"))
    assert scripts == sorted(JOB_SCHEMAS)


def test_kuberay_manifests_have_the_crd_fields():
    for path, doc in kuberay_docs():
        if doc["kind"] not in ("RayCluster", "RayJob"):
            continue
        where = f"{path.name} {doc['kind']}"
        assert doc["apiVersion"] == "ray.io/v1", where
        assert doc["metadata"]["name"], where
        for pod in pod_templates(doc):
            assert pod["containers"], where
            assert all(container["name"] and container["image"] for container in pod["containers"]), where
    for cluster in of_kind("RayCluster"):
        spec = cluster["spec"]
        assert spec["rayVersion"] == ray.__version__  # the image's Ray is the venv's pin
        assert spec["enableInTreeAutoscaling"] is True
        params = [spec["headGroupSpec"]["rayStartParams"]] + [g["rayStartParams"] for g in spec["workerGroupSpecs"]]
        assert all(isinstance(v, str) for p in params for v in p.values())  # the CRD's map[string]string
        for group in spec["workerGroupSpecs"]:
            assert group["groupName"]
            assert group["minReplicas"] == 0 <= group["replicas"] <= group["maxReplicas"]
            limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
            assert int(limits["nvidia.com/gpu"]) >= 1
    cluster_names = {cluster["metadata"]["name"] for cluster in of_kind("RayCluster")}
    for job in of_kind("RayJob"):
        spec = job["spec"]
        assert isinstance(spec["entrypoint"], str)
        assert spec["clusterSelector"]["ray.io/cluster"] in cluster_names
        assert spec["submitterPodTemplate"]["spec"]["restartPolicy"] == "Never"


def test_kuberay_volumes_and_secrets_are_defined_once_and_used_consistently():
    claims = {doc["metadata"]["name"] for doc in of_kind("PersistentVolumeClaim")}
    secrets = set()
    for _, doc in kuberay_docs():
        for pod in pod_templates(doc):
            used = {v["persistentVolumeClaim"]["claimName"] for v in pod.get("volumes", []) if "persistentVolumeClaim" in v}
            assert used <= claims
            mounted = {m["name"] for c in pod["containers"] for m in c.get("volumeMounts", [])}
            assert mounted <= {v["name"] for v in pod.get("volumes", [])}
            for container in pod["containers"]:
                env = {e["name"]: e for e in container.get("env", [])}
                assert env["RAY_AUTH_MODE"]["value"] == "token"  # Ray 2.60's default, said explicitly
                secrets.add(env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"])
    assert len(secrets) == 1  # one token for the cluster and every submitter


def test_every_container_runs_the_project_image_of_this_version():
    from importlib.metadata import version

    images = {c["image"] for _, doc in kuberay_docs() for pod in pod_templates(doc) for c in pod["containers"]}
    assert len(images) == 1
    (image,) = images
    assert image.rsplit(":", 1)[1] == version("synthalign-ray")
    assert f"-t {image} ." in (CLUSTER / "Dockerfile").read_text()  # the build line names the same image


def image_path_in_repo(path: str) -> Path:
    assert path.startswith(IMAGE_ROOT + "/"), f"{path}: not under the image's {IMAGE_ROOT}"
    return REPO / path[len(IMAGE_ROOT) + 1 :]


@pytest.mark.parametrize("job", of_kind("RayJob"), ids=lambda job: job["metadata"]["name"])
def test_rayjob_entrypoint_runs_an_existing_job_with_a_config_that_loads(job):
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "python"
    script = image_path_in_repo(argv[1])
    assert script.parent == REPO / "jobs" and script.is_file()
    options: dict[str, list[str]] = {}
    for flag, value in zip(argv[2::2], argv[3::2]):
        options.setdefault(flag, []).append(value)
    config = image_path_in_repo(options["--config"][0])
    assert config.is_file()
    load_config(config, options.get("--set", []), JOB_SCHEMAS[script.name])  # fields and values valid


# Every file the cluster files name


def test_every_jobs_and_configs_path_named_in_cluster_files_exists():
    named = set()
    for path in CLUSTER.rglob("*"):
        if path.is_file():
            named.update(re.findall(r"(?<![\w.-])(?:jobs|configs)/[\w./-]+\.(?:py|yaml)", path.read_text()))
    assert {"jobs/generate.py", "jobs/train_dpo.py", "jobs/evaluate.py"} <= named
    assert [p for p in sorted(named) if not (REPO / p).is_file()] == []


def test_dockerfile_installs_the_project_with_scripts_install_sh():
    lines = [line.strip() for line in (CLUSTER / "Dockerfile").read_text().splitlines()]
    instructions = [line for line in lines if line and not line.startswith("#")]
    base = next(line for line in instructions if line.startswith("FROM "))
    major, minor = map(int, re.match(r"FROM python:(\d+)\.(\d+)", base).groups())
    assert (major, minor) == (3, 11)  # the Python the locks are resolved for (scripts/lock.sh)
    assert f"WORKDIR {IMAGE_ROOT}" in instructions
    copied = [word for line in instructions if line.startswith("COPY ") for word in line.split()[1:-1]]
    assert {"pyproject.toml", "locks/", "scripts/", "synthalign_ray/", "jobs/", "configs/"} <= set(copied)
    assert all((REPO / source).exists() for source in copied)
    install = next(line for line in instructions if "scripts/install.sh" in line)
    venv = re.search(r"VENV=(\S+)", install).group(1)
    assert install.startswith("RUN ") and "bash scripts/install.sh" in install
    assert f"ENV PATH={venv}/bin:$PATH" in instructions  # KubeRay's `ray start` and the jobs use that venv
    # ... in a login shell too (KubeRay before 1.4), whose /etc/profile resets PATH, then reads profile.d.
    assert f"RUN echo 'export PATH={venv}/bin:$PATH' > /etc/profile.d/synthalign-venv.sh" in instructions
