"""The cluster files (cluster/): launcher YAMLs pass Ray's own cluster-config validation; the KubeRay manifest
set of each cloud, rendered here as kustomize renders it, validates against KubeRay's CRD schemas (stored in
tests/data/kuberay_crds/) and keeps each cloud's bucket, identity, spot nodes and storage to itself; every
entry point, config, image and install step they name exists in this repo. Offline: no cloud, no
Kubernetes, no kustomize binary, no image build."""

import copy
import gzip
import json
import re
import shlex
from pathlib import Path

import jsonpatch
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
# Where cluster/Dockerfile puts the repo: paths under it in the manifests are repo paths.
IMAGE_ROOT = "/app"
# The config schema each job entry point loads (the CLI command it runs).
JOB_SCHEMAS = {"generate.py": SynthAlignConfig, "train_dpo.py": TrainConfig, "evaluate.py": EvalConfig}
RAY_SCHEMA = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def launcher(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


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


# KubeRay manifests (cluster/kuberay/: a base and an overlay per cloud, rendered as kustomize does)

# The fields of a kustomization.yaml that render() implements; it refuses any other, so that a later edit
# cannot go unrendered here while kubectl would apply it.
KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "resources", "namespace", "patches"}
CLUSTER_SCOPED = {"Namespace", "StorageClass", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}


def render(folder: Path) -> list[dict]:
    """The resources `kubectl apply -k folder` (kustomize) would apply, for the fields the files here use:
    `resources` (files, and folders holding a kustomization, rendered first), `patches` as JSON6902
    operations (RFC 6902, by the jsonpatch package) on the one resource of the target's kind and name, then
    `namespace` on every namespaced resource, kustomize's order. Stricter than kustomize where that
    catches mistakes: a target must match exactly one resource (kustomize skips one that matches none)."""
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unknown = set(kustomization) - KUSTOMIZATION_FIELDS
    assert not unknown, f"{folder}: kustomization fields {sorted(unknown)} are not implemented by the test's render()"
    assert (kustomization["apiVersion"], kustomization["kind"]) == ("kustomize.config.k8s.io/v1beta1", "Kustomization")
    docs: list[dict] = []
    for entry in kustomization.get("resources", []):
        path = folder / entry
        # A YAML alias becomes a copy of its own (kustomize expands anchors; PyYAML would share one object
        # between the alias and its anchor, so a patch of one would change both).
        docs += render(path) if path.is_dir() else [json.loads(json.dumps(doc)) for doc in yaml.safe_load_all(path.read_text()) if doc]
    for patch in kustomization.get("patches", []):
        assert set(patch) == {"target", "patch"}, f"{folder}: a patch is `target` (kind, name) and an inline `patch`"
        target = patch["target"]
        assert set(target) == {"kind", "name"}, f"{folder}: patch targets by {sorted(target)}"
        operations = yaml.safe_load(patch["patch"])
        assert isinstance(operations, list), f"{folder}: only JSON6902 patches (a list of operations) are rendered"
        (index,) = [i for i, doc in enumerate(docs) if (doc["kind"], doc["metadata"]["name"]) == (target["kind"], target["name"])]
        docs[index] = jsonpatch.apply_patch(docs[index], operations)
    if "namespace" in kustomization:
        for doc in docs:
            if doc["kind"] not in CLUSTER_SCOPED:
                doc["metadata"]["namespace"] = kustomization["namespace"]
    return docs


KUBERAY_DIR = CLUSTER / "kuberay"
CLOUDS = ["gke", "eks"]
RENDERED = {cloud: render(KUBERAY_DIR / cloud) for cloud in CLOUDS}
# What each cloud's set, and only it, carries: the output scheme, the identity annotation on the
# ServiceAccount, the GPU workers' spot node selector and the shared volume's storage class.
SCHEME = {"gke": "gs", "eks": "s3"}
IDENTITY = {
    "gke": ("iam.gke.io/gcp-service-account", r"[a-z][-a-z0-9]{4,28}[a-z0-9]@[-a-zA-Z0-9]+\.iam\.gserviceaccount\.com"),
    "eks": ("eks.amazonaws.com/role-arn", r"arn:aws:iam::\w+:role/[\w+=,.@-]+"),
}
SPOT_SELECTOR = {"gke": {"cloud.google.com/gke-spot": "true"}, "eks": {"karpenter.sh/capacity-type": "spot"}}
STORAGE_CLASS = {"gke": "standard-rwx", "eks": "efs-sc"}
CLOUD_MARKERS = {
    "gke": ["cloud.google.com/", "iam.gke.io/", "standard-rwx", "gs://"],
    "eks": ["karpenter.sh/", "eks.amazonaws.com/", "efs-sc", "s3://"],
}
# What `kubectl apply -k ... -l app.kubernetes.io/component=PART` applies, one part at a time.
PART_LABEL = "app.kubernetes.io/component"


def kuberay_docs(cloud: str) -> list[dict]:
    return copy.deepcopy(RENDERED[cloud])


def of_kind(kind: str, cloud: str) -> list[dict]:
    return [doc for doc in kuberay_docs(cloud) if doc["kind"] == kind]


def where(doc: dict) -> str:
    return f"{doc['kind']} {doc['metadata']['name']}"


def pod_templates(doc: dict) -> list[dict]:
    """Every pod spec of a RayCluster or RayJob (head, worker groups, job submitter); none of another kind."""
    if doc["kind"] not in ("RayCluster", "RayJob"):
        return []
    spec = doc["spec"]
    cluster = spec.get("rayClusterSpec", spec) if doc["kind"] == "RayJob" else spec
    pods = []
    if "headGroupSpec" in cluster:
        pods.append(cluster["headGroupSpec"]["template"]["spec"])
        pods += [group["template"]["spec"] for group in cluster.get("workerGroupSpecs", [])]
    if "submitterPodTemplate" in spec:
        pods.append(spec["submitterPodTemplate"]["spec"])
    return pods


def test_kuberay_folders_are_a_base_and_an_overlay_per_cloud():
    folders = sorted(path.parent.name for path in KUBERAY_DIR.glob("*/kustomization.yaml"))
    assert folders == sorted(["base", *CLOUDS])
    assert sorted(path.name for path in KUBERAY_DIR.iterdir()) == folders  # no manifest outside the set
    for cloud in CLOUDS:
        kustomization = yaml.safe_load((KUBERAY_DIR / cloud / "kustomization.yaml").read_text())
        assert kustomization["resources"] == ["../base"]
    base = yaml.safe_load((KUBERAY_DIR / "base" / "kustomization.yaml").read_text())
    assert sorted(base["resources"]) == sorted(path.name for path in (KUBERAY_DIR / "base").glob("*.yaml") if path.name != "kustomization.yaml")


def test_render_refuses_what_it_does_not_implement(tmp_path):
    (tmp_path / "a.yaml").write_text("apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: a}\n")
    head = "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources: [a.yaml]\n"
    (tmp_path / "kustomization.yaml").write_text(head + "images: [{name: a, newTag: b}]\n")
    with pytest.raises(AssertionError, match=r"\['images'\] are not implemented"):
        render(tmp_path)
    strategic = "patches:\n  - target: {kind: ServiceAccount, name: a}\n    patch: 'metadata: {labels: {b: c}}'\n"
    (tmp_path / "kustomization.yaml").write_text(head + strategic)
    with pytest.raises(AssertionError, match="only JSON6902"):
        render(tmp_path)
    json6902 = "patches:\n  - target: {kind: ServiceAccount, name: a}\n    patch: '[{op: add, path: /metadata/labels, value: {b: c}}]'\n"
    (tmp_path / "kustomization.yaml").write_text(head + "namespace: n\n" + json6902)
    assert render(tmp_path) == [{"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "a", "namespace": "n", "labels": {"b": "c"}}}]
    # A patch of an aliased node changes that copy only.
    (tmp_path / "a.yaml").write_text("apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: a, labels: &l {x: y}, annotations: *l}\n")
    (tmp_path / "kustomization.yaml").write_text(head + "patches:\n  - target: {kind: ServiceAccount, name: a}\n    patch: '[{op: add, path: /metadata/labels/b, value: c}]'\n")
    assert render(tmp_path)[0]["metadata"]["annotations"] == {"x": "y"}


@pytest.mark.parametrize("cloud", CLOUDS)
def test_kuberay_set_holds_a_raycluster_and_a_rayjob_per_entry_point(cloud):
    assert [doc["metadata"]["name"] for doc in of_kind("RayCluster", cloud)] == ["synthalign"]
    scripts = sorted(Path(shlex.split(job["spec"]["entrypoint"])[1]).name for job in of_kind("RayJob", cloud))
    assert scripts == sorted(JOB_SCHEMAS)


@pytest.mark.parametrize("cloud", CLOUDS)
def test_kuberay_set_is_applied_one_part_at_a_time(cloud):
    """The cluster first, then each job once the one before it finished (train reads what generate
    wrote): every resource carries the part its `kubectl apply -l` selects, each job its own."""
    parts = {where(doc): doc["metadata"]["labels"][PART_LABEL] for doc in kuberay_docs(cloud)}
    jobs = {where(job): Path(shlex.split(job["spec"]["entrypoint"])[1]).stem for job in of_kind("RayJob", cloud)}
    assert {key: part for key, part in parts.items() if key in jobs} == {key: stem.replace("_dpo", "") for key, stem in jobs.items()}
    assert {part for key, part in parts.items() if key not in jobs} == {"cluster"}
    namespaces = {doc["metadata"].get("namespace") for doc in kuberay_docs(cloud)}
    assert len(namespaces) == 1 and None not in namespaces  # the ServiceAccount, Secret and jobs meet


@pytest.mark.parametrize("cloud", CLOUDS)
def test_kuberay_manifests_have_the_crd_fields(cloud):
    for doc in kuberay_docs(cloud):
        if doc["kind"] not in ("RayCluster", "RayJob"):
            continue
        assert doc["apiVersion"] == "ray.io/v1", where(doc)
        assert doc["metadata"]["name"], where(doc)
        for pod in pod_templates(doc):
            assert pod["containers"], where(doc)
            assert all(container["name"] and container["image"] for container in pod["containers"]), where(doc)
    for cluster in of_kind("RayCluster", cloud):
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
    cluster_names = {cluster["metadata"]["name"] for cluster in of_kind("RayCluster", cloud)}
    for job in of_kind("RayJob", cloud):
        spec = job["spec"]
        assert isinstance(spec["entrypoint"], str)
        assert spec["clusterSelector"]["ray.io/cluster"] in cluster_names
        assert spec["submitterPodTemplate"]["spec"]["restartPolicy"] == "Never"


def ray_auth_env(env: list[dict]) -> str:
    """The Secret that an env list takes Ray's token from, with token auth on."""
    by_name = {e["name"]: e for e in env}
    assert by_name["RAY_AUTH_MODE"]["value"] == "token"  # Ray 2.60's default, said explicitly
    return by_name["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"]


@pytest.mark.parametrize("cloud", CLOUDS)
def test_kuberay_volumes_and_secrets_are_defined_once_and_used_consistently(cloud):
    claims = {doc["metadata"]["name"] for doc in of_kind("PersistentVolumeClaim", cloud)}
    secrets = set()
    for doc in kuberay_docs(cloud):
        for pod in pod_templates(doc):
            used = {v["persistentVolumeClaim"]["claimName"] for v in pod.get("volumes", []) if "persistentVolumeClaim" in v}
            assert used <= claims
            mounted = {m["name"] for c in pod["containers"] for m in c.get("volumeMounts", [])}
            assert mounted <= {v["name"] for v in pod.get("volumes", [])}
            for container in pod["containers"]:
                secrets.add(ray_auth_env(container.get("env", [])))
    # KubeRay's autoscaler sidecar in the head pod reaches the GCS too; it gets only autoscalerOptions.env.
    for cluster in of_kind("RayCluster", cloud):
        assert cluster["spec"]["enableInTreeAutoscaling"] is True
        secrets.add(ray_auth_env(cluster["spec"]["autoscalerOptions"]["env"]))
    assert len(secrets) == 1  # one token for the cluster and every submitter


@pytest.mark.parametrize("cloud", CLOUDS)
def test_every_container_runs_the_project_image_of_this_version(cloud):
    from importlib.metadata import version

    images = {c["image"] for doc in kuberay_docs(cloud) for pod in pod_templates(doc) for c in pod["containers"]}
    assert len(images) == 1
    (image,) = images
    assert image.rsplit(":", 1)[1] == version("synthalign-ray")
    assert f"-t {image} ." in (CLUSTER / "Dockerfile").read_text()  # the build line names the same image


def image_path_in_repo(path: str) -> Path:
    assert path.startswith(IMAGE_ROOT + "/"), f"{path}: not under the image's {IMAGE_ROOT}"
    return REPO / path[len(IMAGE_ROOT) + 1 :]


@pytest.mark.parametrize(
    "cloud, job", [(cloud, job) for cloud in CLOUDS for job in of_kind("RayJob", cloud)], ids=lambda v: v if isinstance(v, str) else v["metadata"]["name"]
)
def test_rayjob_entrypoint_runs_an_existing_job_with_a_config_that_loads(cloud, job):
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


def values_of(argv: list[str], flag: str) -> list[str]:
    return [value for name, value in zip(argv[2::2], argv[3::2]) if name == flag]


@pytest.mark.parametrize("cloud", CLOUDS)
def test_rayjob_outputs_are_in_the_clouds_bucket(cloud):
    """Every URI a job reads or writes is on this cloud's object store (pyarrow's filesystem for the
    scheme, with the pod's identity); the rest is the shared volume at /mnt/runs or a hub id."""
    for job in of_kind("RayJob", cloud):
        argv = shlex.split(job["spec"]["entrypoint"])
        values = [value.split("=", 1)[-1] for flag, value in zip(argv[2::2], argv[3::2])]
        uris = [value for value in values if "://" in value]
        assert uris, where(job)
        assert {uri.split("://")[0] for uri in uris} == {SCHEME[cloud]}, where(job)
        paths = [value for value in values if "/" in value and "://" not in value]
        assert all(value.startswith(("/app/", "/mnt/runs/", "llava-hf/")) for value in paths), where(job)
        # The shared volume is local to pyarrow: a job that writes there says every node mounts it.
        if any(value.startswith("/mnt/runs/") for value in values_of(argv, "--output")):
            assert any(value.endswith(".shared_filesystem=true") for value in values_of(argv, "--set")), where(job)


@pytest.mark.parametrize("cloud", CLOUDS)
def test_every_pod_runs_as_a_service_account_with_the_clouds_identity(cloud):
    """Shard writes and checkpoints run on any pod: each has the bucket's credentials, from the
    ServiceAccount the set defines and annotates for this cloud (Workload Identity, IRSA)."""
    key, pattern = IDENTITY[cloud]
    accounts = {doc["metadata"]["name"]: doc for doc in of_kind("ServiceAccount", cloud)}
    assert accounts
    for name, account in accounts.items():
        annotations = account["metadata"].get("annotations", {})
        assert re.fullmatch(pattern, annotations.get(key, "")), f"{name}: {annotations}"
    pods = [(where(doc), pod) for doc in kuberay_docs(cloud) for pod in pod_templates(doc)]
    assert len(pods) == 2 + 3  # head, GPU workers, three job submitters
    for name, pod in pods:
        assert pod.get("serviceAccountName") in accounts, name


@pytest.mark.parametrize("cloud", CLOUDS)
def test_gpu_workers_are_on_the_clouds_spot_nodes_and_the_volume_on_its_shared_file_system(cloud):
    (cluster,) = of_kind("RayCluster", cloud)
    for group in cluster["spec"]["workerGroupSpecs"]:
        assert group["template"]["spec"]["nodeSelector"] == SPOT_SELECTOR[cloud], group["groupName"]
    assert "nodeSelector" not in cluster["spec"]["headGroupSpec"]["template"]["spec"]  # the head is not Spot
    (claim,) = of_kind("PersistentVolumeClaim", cloud)
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert claim["spec"]["storageClassName"] == STORAGE_CLASS[cloud]


def test_each_clouds_keys_stay_in_its_own_set():
    base = json.dumps(render(KUBERAY_DIR / "base"))
    for cloud in CLOUDS:
        rendered = json.dumps(RENDERED[cloud])
        assert all(marker in rendered for marker in CLOUD_MARKERS[cloud]), cloud
        for other, markers in CLOUD_MARKERS.items():
            assert not any(marker in base for marker in markers), f"base carries {other}'s keys"
            if other != cloud:
                assert [marker for marker in markers if marker in rendered] == [], f"{cloud} carries {other}'s keys"


# KubeRay's CRD schemas (tests/data/kuberay_crds/, written by scripts/kuberay_crds.py)

CRD_DATA = REPO / "tests" / "data" / "kuberay_crds"
# The oldest KubeRay the manifests are stated for, the newest release stored, and the release before the
# oldest, which must refuse them (or the stated minimum would not be the minimum).
KUBERAY_MIN, KUBERAY_NEWEST, KUBERAY_BEFORE_MIN = "v1.1.0", "v1.7.0", "v1.0.0"


def crd_schemas(tag: str) -> dict[str, dict]:
    payload = json.loads(gzip.decompress((CRD_DATA / f"{tag}.json.gz").read_bytes()))
    assert payload["source"]["tag"] == tag
    return payload["schemas"]


def kubernetes_schema(schema: dict, root: bool = True) -> dict:
    """A CRD's structural OpenAPI v3 schema as a JSON Schema (draft 4) that refuses what kubectl's strict
    field validation refuses: an object takes only the properties it declares (the API server would
    prune the others silently) unless it has additionalProperties or x-kubernetes-preserve-unknown-fields;
    `nullable` allows null; x-kubernetes-int-or-string is int or string. The root's metadata is
    ObjectMeta, which the API server checks itself: here the fields the manifests may set."""
    out = dict(schema)
    if out.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if out.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if "properties" in out:
        out["properties"] = {name: kubernetes_schema(sub, root=False) for name, sub in out["properties"].items()}
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = kubernetes_schema(out["additionalProperties"], root=False)
    if isinstance(out.get("items"), dict):
        out["items"] = kubernetes_schema(out["items"], root=False)
    for key in ("allOf", "anyOf", "oneOf"):
        if key in out:
            out[key] = [kubernetes_schema(sub, root=False) for sub in out[key]]
    if out.get("type") == "object" and "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    if root:
        string_map = {"type": "object", "additionalProperties": {"type": "string"}}
        meta = {"name": {"type": "string"}, "namespace": {"type": "string"}, "labels": string_map, "annotations": string_map}
        out["properties"]["metadata"] = {"type": "object", "properties": meta, "required": ["name"], "additionalProperties": False}
    return out


def list_type(validator, kind, instance, schema):
    """x-kubernetes-list-type: a `set` has no repeated item, a `map` no two items with the same keys."""
    if not validator.is_type(instance, "array"):
        return
    keys = [json.dumps(item, sort_keys=True) for item in instance] if kind == "set" else None
    if kind == "map":
        keys = [json.dumps([item.get(key) for key in schema.get("x-kubernetes-list-map-keys", [])]) for item in instance]
    if keys is not None and len(set(keys)) < len(keys):
        yield jsonschema.ValidationError(f"x-kubernetes-list-type {kind}: repeated item in {instance}")


def cel_rules(validator, rules, instance, schema):
    """x-kubernetes-validations are CEL rules the API server runs; not evaluated here, so the manifests
    must not set a field that has any (none of them does today)."""
    yield jsonschema.ValidationError(f"a field with CEL rules, not checked offline: {[rule['rule'] for rule in rules]}")


KubernetesValidator = jsonschema.validators.extend(
    jsonschema.Draft4Validator, {"x-kubernetes-list-type": list_type, "x-kubernetes-validations": cel_rules}
)


def crd_errors(doc: dict, tag: str) -> list[str]:
    validator = KubernetesValidator(kubernetes_schema(crd_schemas(tag)[doc["kind"]]))
    return [f"{'/'.join(map(str, error.absolute_path))}: {error.message}" for error in validator.iter_errors(doc)]


def test_crd_data_holds_the_tags_the_tests_name():
    stored = sorted(path.name for path in CRD_DATA.glob("*.json.gz"))
    assert stored == sorted(f"{tag}.json.gz" for tag in (KUBERAY_BEFORE_MIN, KUBERAY_MIN, KUBERAY_NEWEST))
    for tag in (KUBERAY_BEFORE_MIN, KUBERAY_MIN, KUBERAY_NEWEST):
        assert set(crd_schemas(tag)) == {"RayCluster", "RayJob"}


@pytest.mark.parametrize("tag", [KUBERAY_MIN, KUBERAY_NEWEST])
@pytest.mark.parametrize("cloud", CLOUDS)
def test_kuberay_manifests_validate_against_the_crd_schemas(cloud, tag):
    docs = of_kind("RayCluster", cloud) + of_kind("RayJob", cloud)
    assert len(docs) == 4
    for doc in docs:
        assert crd_errors(doc, tag) == [], where(doc)


def test_crd_validation_catches_a_misspelled_field_a_wrong_type_and_a_repeated_name():
    (cluster,) = of_kind("RayCluster", "gke")
    worker = cluster["spec"]["workerGroupSpecs"][0]["template"]["spec"]
    worker["serviceAcountName"] = worker.pop("serviceAccountName")  # pruned silently by the API server
    cluster["spec"]["autoscalerOptions"]["idleTimeoutSeconds"] = "600"
    cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"].append({"containerPort": 6379, "name": "again"})
    cluster["metadata"]["lables"] = {}
    errors = "\n".join(crd_errors(cluster, KUBERAY_MIN))
    assert "'serviceAcountName' was unexpected" in errors
    assert "idleTimeoutSeconds: '600' is not of type 'integer'" in errors
    assert "x-kubernetes-list-type map: repeated item" in errors
    assert "'lables' was unexpected" in errors


def test_the_stated_minimum_kuberay_is_the_first_release_that_takes_the_manifests():
    """KubeRay 1.0.0 has `ray.io/v1` but no RayJob `submissionMode` (1.1.0 added it): the release before
    the stated minimum refuses the jobs; the minimum is what the manifests and docs say."""
    for cloud in CLOUDS:
        for job in of_kind("RayJob", cloud):
            assert any("'submissionMode' was unexpected" in error for error in crd_errors(job, KUBERAY_BEFORE_MIN)), where(job)
    stated = f"KubeRay operator >= {KUBERAY_MIN[1:]}"
    assert stated in (KUBERAY_DIR / "base" / "kustomization.yaml").read_text()
    assert stated in (REPO / "docs" / "cluster.md").read_text()
    for cloud in CLOUDS:
        assert f"KubeRay >= {KUBERAY_MIN[1:]}" in (KUBERAY_DIR / cloud / "kustomization.yaml").read_text()


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
