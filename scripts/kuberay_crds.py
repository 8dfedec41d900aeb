"""Regenerate tests/data/kuberay_crds/<tag>.json.gz: the `ray.io/v1` openAPIV3Schema of KubeRay's RayCluster
and RayJob CRDs at a release tag, which tests/unit/test_cluster.py validates the manifests of
cluster/kuberay/ against, offline.

    git clone https://github.com/ray-project/kuberay /tmp/kuberay
    python scripts/kuberay_crds.py /tmp/kuberay v1.1.0 v1.7.0

Source: github.com/ray-project/kuberay, ray-operator/config/crd/bases/ray.io_rayclusters.yaml and
ray.io_rayjobs.yaml at each tag (read with `git show TAG:PATH`, so a bare clone does too). Kept: the schema
of version v1 of each CRD, less its `description` texts (validation never reads them; the YAML files are
~1 MB each). Written with sorted keys and no gzip timestamp, so the same tag gives the same bytes.
"""

import argparse
import gzip
import json
import subprocess
from pathlib import Path

import yaml

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "kuberay_crds"
CRDS = {
    "RayCluster": "ray-operator/config/crd/bases/ray.io_rayclusters.yaml",
    "RayJob": "ray-operator/config/crd/bases/ray.io_rayjobs.yaml",
}
SUBSCHEMAS = ("items", "additionalProperties", "not")
SCHEMA_LISTS = ("allOf", "anyOf", "oneOf")


def without_descriptions(schema: dict) -> dict:
    """The schema with each schema node's `description` dropped (a property named "description" stays)."""
    out = {key: value for key, value in schema.items() if key != "description"}
    if "properties" in out:
        out["properties"] = {name: without_descriptions(sub) for name, sub in out["properties"].items()}
    for key in SUBSCHEMAS:
        if isinstance(out.get(key), dict):
            out[key] = without_descriptions(out[key])
    for key in SCHEMA_LISTS:
        if key in out:
            out[key] = [without_descriptions(sub) for sub in out[key]]
    return out


def v1_schema(repo: Path, tag: str, path: str, kind: str) -> dict:
    text = subprocess.run(["git", "-C", str(repo), "show", f"{tag}:{path}"], check=True, capture_output=True, text=True).stdout
    crd = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    assert crd["spec"]["names"]["kind"] == kind, (tag, path)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return without_descriptions(version["schema"]["openAPIV3Schema"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kuberay", type=Path, help="a clone of github.com/ray-project/kuberay (bare or not)")
    parser.add_argument("tags", nargs="+", help="release tags, e.g. v1.1.0 v1.7.0")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    for tag in args.tags:
        commit = subprocess.run(["git", "-C", str(args.kuberay), "rev-parse", f"{tag}^{{commit}}"], check=True, capture_output=True, text=True).stdout.strip()
        payload = {
            "source": {"repository": "https://github.com/ray-project/kuberay", "tag": tag, "commit": commit, "paths": CRDS},
            "schemas": {kind: v1_schema(args.kuberay, tag, path, kind) for kind, path in CRDS.items()},
        }
        data = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
        target = OUT / f"{tag}.json.gz"
        target.write_bytes(gzip.compress(data, compresslevel=9, mtime=0))
        print(f"{target}: {target.stat().st_size} bytes ({len(data)} uncompressed)")


if __name__ == "__main__":
    main()
