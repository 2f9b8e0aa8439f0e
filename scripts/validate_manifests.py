"""Checks every Kubernetes manifest under a folder.

Built-in kinds are validated strictly against the Kubernetes API schemas of
the version below (kubernetes-validate). Custom resources (KEDA, Prometheus
operator) are checked for the fields every object needs, since their schemas
belong to their operators. Kustomization files must name resources that
exist. JSON files must parse.

And the rules a cluster applies beyond the schemas: every pod meets the
"restricted" Pod Security Standard; a Deployment that KEDA scales sets no
replica count (each apply would reset KEDA's); a Job removes itself, so the
next release's Job (whose pod template differs) can be created; the
Prometheus Operator's objects carry the label its selectors match.
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


MONITORING = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
SELECTOR_LABEL = "release"


def pod_spec(doc: dict) -> dict | None:
    if doc.get("kind") in {"Deployment", "StatefulSet", "DaemonSet", "Job"}:
        return doc.get("spec", {}).get("template", {}).get("spec")
    return None


def check_restricted(name: str, spec: dict) -> list[str]:
    """The "restricted" Pod Security Standard, as the admission controller checks it."""
    problems = []
    pod = spec.get("securityContext", {})
    for container in spec.get("containers", []) + spec.get("initContainers", []):
        where = f"{name}/{container.get('name')}"
        own = container.get("securityContext", {})
        if not (own.get("runAsNonRoot", pod.get("runAsNonRoot"))):
            problems.append(f"{where}: runAsNonRoot is not true")
        seccomp = own.get("seccompProfile", pod.get("seccompProfile", {})).get("type")
        if seccomp not in {"RuntimeDefault", "Localhost"}:
            problems.append(f"{where}: seccompProfile is {seccomp!r}, not RuntimeDefault")
        if own.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{where}: allowPrivilegeEscalation is not false")
        if "ALL" not in own.get("capabilities", {}).get("drop", []):
            problems.append(f"{where}: capabilities do not drop ALL")
    return problems


def check_policies(docs: list[tuple[pathlib.Path, dict]]) -> list[str]:
    problems = []
    scaled = {
        doc["spec"]["scaleTargetRef"]["name"]
        for _, doc in docs
        if doc.get("kind") == "ScaledObject" and doc.get("spec", {}).get("scaleTargetRef", {}).get("name")
    }
    for path, doc in docs:
        kind, name = doc.get("kind"), doc.get("metadata", {}).get("name")
        spec = pod_spec(doc)
        if spec is not None:
            problems += [f"{path}: {kind} {problem}" for problem in check_restricted(name, spec)]
        if kind == "Deployment" and name in scaled and "replicas" in doc.get("spec", {}):
            problems.append(f"{path}: Deployment {name} is scaled by KEDA but sets spec.replicas")
        if kind == "Job" and "ttlSecondsAfterFinished" not in doc.get("spec", {}):
            problems.append(f"{path}: Job {name} stays after finishing; the next release's cannot be created")
        if kind in MONITORING and SELECTOR_LABEL not in doc.get("metadata", {}).get("labels", {}):
            problems.append(f"{path}: {kind} {name} lacks the {SELECTOR_LABEL!r} label Prometheus selects by")
    return problems


def main(root: str) -> int:
    problems = []
    checked = 0
    docs = []
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
            docs.append((path, doc))
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
    problems += check_policies(docs)
    for problem in problems:
        print(problem, file=sys.stderr)
    print(f"{checked} manifests checked, {len(problems)} problems", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
