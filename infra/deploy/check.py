"""Offline validation of deployment files: KubeRay manifests, built-in Kubernetes kinds, `ray up` configs.

- RayJob / RayCluster: the openAPIV3Schema of the KubeRay CRDs shipped in ``crds/`` (every supported
  release, oldest to newest; see crds/README.md) with unknown fields rejected, then the rules KubeRay
  checks in its webhook and controller rather than in the schema, then this project's own: GPUs =
  training workers, secrets only through ``secretKeyRef``.
- Secret, Service, ConfigMap, ...: ``kubernetes-validate``'s bundled schemas (strict).
- `ray up` configs: Ray's own ``prepare_config`` + ``validate_config``, in a subprocess without a
  network (``unshare -n`` where it can be made) so that nothing reaches a cloud.

Every problem is one line that starts with the file and the field's path.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import yaml

from infra.deploy.job import entrypoint_kind, entrypoint_settings
from infra.deploy.kuberay import ENTRYPOINT_ANNOTATION, GPU_RESOURCE
from pipeline.config import ConfigError

# Package data (infra/deploy/crds/), found next to this file in a checkout and in an installed wheel alike.
CRD_ROOT = Path(__file__).resolve().parent / "crds"
CRD_VERSIONS = ("1.6.0", "1.7.0")  # oldest supported (authOptions.secretName) .. newest, each a folder v<X.Y.Z>
MIN_OPERATOR = CRD_VERSIONS[0]
CRD_FILES = {"RayJob": "ray.io_rayjobs.yaml", "RayCluster": "ray.io_rayclusters.yaml"}
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
RAYJOB_NAME_MAX = 47  # KubeRay derives the cluster's and submitter's names from it
RAYCLUSTER_NAME_MAX = 63
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}
SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|ACCESS_KEY|CREDENTIAL", re.IGNORECASE)


class CheckError(ValueError):
    """A file failed validation; the message lists every problem found, one per line."""


def crd_dir(version: str = CRD_VERSIONS[-1]) -> Path:
    return CRD_ROOT / f"v{version}"


def parse_version(text: str, flag: str = "--operator-version") -> tuple[int, ...]:
    try:
        parts = tuple(int(p) for p in str(text).strip().removeprefix("v").split("."))
    except ValueError:
        parts = ()
    if not 1 <= len(parts) <= 3:
        raise ConfigError(f"{flag} {text!r}: expected a KubeRay release such as 1.6.0")
    return parts + (0,) * (3 - len(parts))


def crd_versions(operator_version: str | None = None) -> tuple[str, ...]:
    """The shipped CRD releases to validate against: all of them, or the newest at or below the operator's
    release. ``ConfigError`` naming --operator-version when it is older than the oldest supported one."""
    if operator_version is None:
        return CRD_VERSIONS
    asked = parse_version(operator_version)
    usable = [v for v in CRD_VERSIONS if parse_version(v) <= asked]
    if not usable:
        raise ConfigError(
            f"--operator-version {operator_version}: the manifests need KubeRay >= {MIN_OPERATOR} "
            "(spec.authOptions.secretName, the Ray token from a Secret, is not in older CRDs); upgrade the operator"
        )
    return (usable[-1],)


def strict(schema: dict) -> dict:
    """The schema with unknown fields rejected wherever it lists the fields (as kubeconform -strict does)."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(schema)
    return schema


@functools.cache
def crd_validator(kind: str, version: str = CRD_VERSIONS[-1]) -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(crd_schema(kind, version))


def crd_schema(kind: str, version: str = CRD_VERSIONS[-1]) -> dict:
    path = crd_dir(version) / CRD_FILES[kind]
    if not path.is_file():
        raise CheckError(
            f"the KubeRay v{version} CRD for {kind} is not at {path}: the package was installed without its "
            "data files (pyproject.toml's package-data lists infra/deploy/crds)"
        )
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 1 MB: libyaml
    for version in crd["spec"]["versions"]:
        if version["name"] == "v1":
            return strict(version["schema"]["openAPIV3Schema"])
    raise CheckError(f"{path} has no v1 version")


def _path(parts) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(document)"


def schema_problems(doc: dict, versions: tuple[str, ...] = CRD_VERSIONS) -> list[str]:
    """Problems against each release's CRD; one that only some releases have names them."""
    found = {v: _schema_problems(doc, crd_validator(doc["kind"], v)) for v in versions}
    out: list[str] = []
    for problem in dict.fromkeys(p for ps in found.values() for p in ps):
        where = [v for v in versions if problem in found[v]]
        out.append(problem if len(where) == len(versions) else f"{problem} (KubeRay v{', v'.join(where)})")
    return out


def _schema_problems(doc: dict, validator: jsonschema.Draft7Validator) -> list[str]:
    problems = []
    for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path))):
        where = _path(e.absolute_path)
        if e.validator == "additionalProperties" and e.validator_value is False:
            known = set(e.schema.get("properties", {}))
            for extra in sorted(set(e.instance) - known):
                close = [k for k in known if k.lower() == extra.lower()]
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                problems.append(f"{_path([*e.absolute_path, extra])}: unknown field{hint}")
        else:
            problems.append(f"{where}: {e.message}")
    return problems


def _worker_groups(spec: dict, prefix: str):
    for i, group in enumerate(spec.get("workerGroupSpecs") or []):
        if isinstance(group, dict):
            yield f"{prefix}.workerGroupSpecs[{i}]", group


def kuberay_rule_problems(doc: dict) -> list[str]:
    """The KubeRay rules its webhook/controller enforce and the CRD schema does not carry."""
    problems = []
    kind, meta = doc["kind"], doc.get("metadata") or {}
    limit = RAYJOB_NAME_MAX if kind == "RayJob" else RAYCLUSTER_NAME_MAX
    if "name" not in meta and isinstance(meta.get("generateName"), str):
        # The API server appends 5 characters to generateName (`kubectl create`; `apply` needs a name).
        field, name, shown = "metadata.generateName", meta["generateName"] + "x" * 5, meta["generateName"]
    else:
        field, name, shown = "metadata.name", meta.get("name", ""), meta.get("name", "")
    if not isinstance(name, str) or not DNS_1035.match(name):
        problems.append(f"{field}: {shown!r} is not a DNS-1035 label (lower-case letters, digits, '-')")
    elif len(name) > limit:
        problems.append(f"{field}: {shown!r} makes a name of {len(name)} characters; a {kind} name has at most {limit}")
    spec = doc.get("spec") or {}
    if kind == "RayJob":
        mode = spec.get("submissionMode")
        if mode is not None and mode not in SUBMISSION_MODES:
            problems.append(f"spec.submissionMode: {mode!r} is not one of {sorted(SUBMISSION_MODES)}")
        if spec.get("ttlSecondsAfterFinished") and spec.get("shutdownAfterJobFinishes") is not True:
            problems.append("spec.ttlSecondsAfterFinished: needs spec.shutdownAfterJobFinishes: true")
        cluster, prefix = spec.get("rayClusterSpec") or {}, "spec.rayClusterSpec"
    else:
        cluster, prefix = spec, "spec"
    for where, group in _worker_groups(cluster, prefix):
        lo, hi, n = group.get("minReplicas"), group.get("maxReplicas"), group.get("replicas")
        if lo is None or hi is None:
            problems.append(f"{where}: needs minReplicas and maxReplicas")
            continue
        if all(isinstance(v, int) for v in (lo, hi)) and lo > hi:
            problems.append(f"{where}.minReplicas: {lo} is greater than maxReplicas {hi}")
        if isinstance(n, int) and all(isinstance(v, int) for v in (lo, hi)) and not lo <= n <= hi:
            problems.append(f"{where}.replicas: {n} is outside minReplicas..maxReplicas ({lo}..{hi})")
    return problems


def _containers(cluster: dict, prefix: str):
    head = cluster.get("headGroupSpec") or {}
    groups = [(f"{prefix}.headGroupSpec", head)] + list(_worker_groups(cluster, prefix))
    for where, group in groups:
        for i, c in enumerate(((group.get("template") or {}).get("spec") or {}).get("containers") or []):
            if isinstance(c, dict):
                yield f"{where}.template.spec.containers[{i}]", c, group


def project_problems(doc: dict) -> list[str]:
    """This project's rules: secrets only through secretKeyRef, GPUs in the pods = training workers."""
    problems = []
    spec = doc.get("spec") or {}
    cluster, prefix = (
        (spec.get("rayClusterSpec") or {}, "spec.rayClusterSpec") if doc["kind"] == "RayJob" else (spec, "spec")
    )
    runtime_env = spec.get("runtimeEnvYAML")
    if isinstance(runtime_env, str):
        try:
            env_vars = (yaml.safe_load(runtime_env) or {}).get("env_vars") or {}
        except (yaml.YAMLError, AttributeError) as e:
            problems.append(f"spec.runtimeEnvYAML: not a YAML mapping: {e}")
            env_vars = {}
        problems += [
            f"spec.runtimeEnvYAML.env_vars.{k}: a secret in the runtime env is readable by anyone who can list "
            "jobs; take it from a Secret (env valueFrom.secretKeyRef in the pod templates)"
            for k in env_vars
            if SECRET_NAME.search(str(k))
        ]
    for where, c, _ in _containers(cluster, prefix):
        for i, e in enumerate(c.get("env") or []):
            if isinstance(e, dict) and SECRET_NAME.search(str(e.get("name", ""))) and "value" in e:
                problems.append(f"{where}.env[{i}].value: {e['name']} must come from valueFrom.secretKeyRef")
    entrypoint = spec.get("entrypoint") if doc["kind"] == "RayJob" else None
    entrypoint = entrypoint or ((doc.get("metadata") or {}).get("annotations") or {}).get(ENTRYPOINT_ANNOTATION)
    if not isinstance(entrypoint, str):
        return problems
    where_entry = "spec.entrypoint" if doc["kind"] == "RayJob" else f"metadata.annotations.{ENTRYPOINT_ANNOTATION}"
    try:
        settings = entrypoint_settings(entrypoint)
    except ConfigError as e:
        return [*problems, f"{where_entry}: {e}"]
    use_gpu = settings.cluster.use_gpu
    if entrypoint_kind(entrypoint) == "sample":
        lo_workers = hi_workers = settings.workers or settings.cluster.max_workers
        flag = "--workers"
    else:
        lo_workers, hi_workers = settings.cluster.min_workers, settings.cluster.max_workers
        flag = "--cluster.num-workers"
    asked = f"{lo_workers}-{hi_workers}" if lo_workers != hi_workers else str(hi_workers)
    lo_gpus = hi_gpus = 0
    where_gpus = []
    for where, c, group in _containers(cluster, prefix):
        limit = ((c.get("resources") or {}).get("limits") or {}).get(GPU_RESOURCE)
        if limit is None:
            continue
        try:
            per_pod = int(str(limit))
        except ValueError:
            problems.append(f"{where}.resources.limits.{GPU_RESOURCE}: {limit!r} is not a whole number of GPUs")
            continue
        if "replicas" not in group and "minReplicas" not in group:  # the head group: no training workers there
            problems.append(f"{where}.resources.limits.{GPU_RESOURCE}: the head takes no GPUs (num-gpus 0)")
            continue
        n, lo, hi = group.get("replicas"), group.get("minReplicas", group.get("replicas")), group.get("maxReplicas")
        hi = n if hi is None or (isinstance(n, int) and lo == hi) else hi
        if isinstance(lo, int) and isinstance(hi, int):
            lo_gpus, hi_gpus = lo_gpus + per_pod * lo, hi_gpus + per_pod * hi
            where_gpus.append(f"{lo} x {per_pod}" if lo == hi else f"{lo}..{hi} x {per_pod}")
    if use_gpu != "yes":
        problems.append(f"{where_entry}: --cluster.use-gpu is {use_gpu!r}; GPU pods need --cluster.use-gpu yes")
    if (lo_gpus, hi_gpus) != (lo_workers, hi_workers):
        have = f"{lo_gpus}" if lo_gpus == hi_gpus else f"{lo_gpus}..{hi_gpus}"
        problems.append(
            f"{prefix}.workerGroupSpecs: {have} GPU(s) in the worker pods ({' + '.join(where_gpus) or 'none'}) "
            f"but {where_entry} asks for {flag} {asked} (one GPU each)"
        )
    if hi_gpus != lo_gpus and cluster.get("enableInTreeAutoscaling") is not True:
        problems.append(
            f"{prefix}.enableInTreeAutoscaling: an elastic worker group (minReplicas < maxReplicas) needs Ray's "
            "autoscaler (true); without it KubeRay never adds the pods above minReplicas"
        )
    return problems


def builtin_problems(doc: dict) -> list[str]:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{_path(e.absolute_path)}: {e.message}"]
    except kubernetes_validate.SchemaNotFoundError:
        return [f"kind: {doc.get('apiVersion')}/{doc.get('kind')} is neither a KubeRay nor a built-in kind"]
    return []


def manifest_problems(doc: dict, versions: tuple[str, ...] = CRD_VERSIONS) -> list[str]:
    if not isinstance(doc, dict) or "kind" not in doc:
        return ["(document): not a Kubernetes object (no kind)"]
    if doc["kind"] in CRD_FILES and str(doc.get("apiVersion", "")).startswith("ray.io/"):
        problems = schema_problems(doc, versions)
        problems += kuberay_rule_problems(doc)
        return problems + project_problems(doc)
    return builtin_problems(doc)


RAY_CHECK = """
import json, sys, yaml
from ray.autoscaler._private.util import prepare_config, validate_config
for name in sys.argv[1:]:
    try:
        validate_config(prepare_config(yaml.safe_load(open(name))))
        print(json.dumps({"file": name}))
    except BaseException as e:  # cli_logger.abort raises SystemExit-like errors too
        path = ".".join(str(p) for p in getattr(e, "absolute_path", []))
        message = getattr(e, "message", None) or f"{type(e).__name__}: {e}"
        print(json.dumps({"file": name, "path": path, "message": message}))
"""


def _offline_prefix() -> list[str]:
    """``unshare -n`` where a network namespace can be made (root), so the check cannot reach a cloud."""
    unshare = shutil.which("unshare")
    if unshare and subprocess.run([unshare, "-n", "true"], capture_output=True).returncode == 0:
        return [unshare, "-n"]
    return []


def ray_up_problems(paths: list[Path]) -> dict[Path, list[str]]:
    """Ray's own validation of `ray up` configs, all in one offline subprocess (importing Ray takes seconds)."""
    if not paths:
        return {}
    r = subprocess.run(
        [*_offline_prefix(), sys.executable, "-c", RAY_CHECK, *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    results = {}
    for line in r.stdout.splitlines():
        if line.startswith("{"):
            d = json.loads(line)
            results[d["file"]] = [f"{d['path'] or '(config)'}: {d['message']}"] if "message" in d else []
    failed = f"(config): Ray's validation did not run: {(r.stderr or r.stdout).strip()[-2000:]}"
    return {p: results.get(str(p), [failed]) for p in paths}


def is_ray_up_config(docs: list) -> bool:
    return len(docs) == 1 and isinstance(docs[0], dict) and "provider" in docs[0] and "kind" not in docs[0]


def files_problems(paths: list[Path], versions: tuple[str, ...] = CRD_VERSIONS) -> dict[Path, list[str]]:
    """Every problem of each file, each line starting with the file (an empty list: the file is valid)."""
    out: dict[Path, list[str]] = {}
    ray_up = []
    for path in paths:
        try:
            docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        except (OSError, yaml.YAMLError) as e:
            out[path] = [f"{path}: cannot read: {e}"]
            continue
        if is_ray_up_config(docs):
            ray_up.append(path)
            continue
        out[path] = []
        for i, doc in enumerate(docs):
            label = f"{path} (document {i + 1})" if len(docs) > 1 else f"{path}"
            out[path] += [f"{label}: {p}" for p in manifest_problems(doc, versions)]
    for path, problems in ray_up_problems(ray_up).items():
        out[path] = [f"{path}: {p}" for p in problems]
    return {p: out[p] for p in paths}


def check_documents(docs: list[dict], label: str, versions: tuple[str, ...] = CRD_VERSIONS) -> None:
    """Raise ``CheckError`` listing every problem of rendered manifests (used before writing them)."""
    problems = [f"{label}: {p}" for doc in docs for p in manifest_problems(doc, versions)]
    if problems:
        raise CheckError("\n".join(problems))
