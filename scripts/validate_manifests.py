"""Checks every Kubernetes manifest under a folder.

Built-in kinds are validated strictly against the Kubernetes API schemas of
the version below (kubernetes-validate). Custom resources (KEDA, Prometheus
operator) are checked for the fields every object needs, since their schemas
belong to their operators. Kustomization files must name resources that
exist. JSON files must parse.
"""

import json
import pathlib
import sys

import kubernetes_validate
import yaml

KUBERNETES_VERSION = "1.31.0"
CUSTOM = {"keda.sh/v1alpha1", "monitoring.coreos.com/v1", "kustomize.config.k8s.io/v1beta1"}


def check_kustomization(path: pathlib.Path, doc: dict) -> list[str]:
    problems = []
    for entry in doc.get("resources", []):
        if not (path.parent / entry).exists():
            problems.append(f"{path}: resource {entry} does not exist")
    for generator in doc.get("configMapGenerator", []):
        for file_name in generator.get("files", []):
            if not (path.parent / file_name).exists():
                problems.append(f"{path}: file {file_name} does not exist")
    return problems


def main(root: str) -> int:
    problems = []
    checked = 0
    for path in sorted(pathlib.Path(root).rglob("*")):
        if path.suffix == ".json":
            json.loads(path.read_text())
            checked += 1
            continue
        if path.suffix not in {".yaml", ".yml"}:
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc:
                continue
            checked += 1
            api_version, kind = doc.get("apiVersion"), doc.get("kind")
            if path.name == "kustomization.yaml":
                problems += check_kustomization(path, doc)
                continue
            if api_version in CUSTOM:
                for field in ("metadata", "spec"):
                    if field not in doc:
                        problems.append(f"{path}: {kind} lacks {field}")
                if "name" not in doc.get("metadata", {}):
                    problems.append(f"{path}: {kind} has no name")
                continue
            try:
                kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
            except kubernetes_validate.ValidationError as error:
                problems.append(f"{path}: {kind} {doc.get('metadata', {}).get('name')}: {error.message} at {list(error.path)}")
            except Exception as error:  # an unknown kind or version
                problems.append(f"{path}: {kind}: {error}")
    for problem in problems:
        print(problem, file=sys.stderr)
    print(f"{checked} manifests checked, {len(problems)} problems", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
