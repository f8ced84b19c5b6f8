"""The model registry: one MLflow Model per finished training run, registered as a version of its
model; versions resolved from ``models:/`` URIs; aliases moved by the evaluation's promotion policy.

It sits above training and sampling (``pipeline.train`` finishes a run, ``pipeline.sample.model`` is the
pyfunc, ``pipeline.sample.evaluate`` scores a checkpoint); the jobs call it: ``jobs/train.py`` registers
a finished run (``register``), ``jobs/sample.py --model`` evaluates a version (``evaluate_model``).
"""

from __future__ import annotations

import contextlib
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.checkpoint import images_of, load_sampling_export
from pipeline.config import MODEL_URI_RE
from pipeline.sample import model
from pipeline.sample.evaluate import evaluate, require_tracking
from pipeline.sample.plan import SizeMismatch
from pipeline.sample.settings import SampleSettings
from pipeline.tracking import TrackedRun, TrackingError, mlflow_client

MODEL_ARTIFACT = "model"  # the pyfunc in the training run (pipeline.sample.model)
MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")  # as TrainConfig.register_as
# Version tags: where the model came from, and what the sampling job needs to evaluate it.
TAG_CHECKPOINT = "ddpm.checkpoint"  # the artifact checkpoints/images_<N>.pt of the source run
TAG_IMAGES_SEEN = "ddpm.images_seen"


@contextlib.contextmanager
def _fluent_uri(uri: str) -> Iterator[Any]:
    """MLflow's fluent API (which log_model needs) pointed at ``uri`` for the duration."""
    import mlflow

    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield mlflow
    finally:
        mlflow.set_tracking_uri(before)


def log_and_register_model(
    uri: str, run_id: str, checkpoint_artifact: str, name: str, tags: dict[str, Any], work: str | Path
) -> Any:
    """Log the sampling checkpoint ``checkpoint_artifact`` of run ``run_id`` as its MLflow Model
    (``pipeline.sample.model``) and register it as a new version of ``name``, tagged with ``tags``,
    the checkpoint and its images seen. Returns the ``ModelVersion``."""
    if not MODEL_NAME_RE.match(name):
        raise TrackingError(f"invalid registered model name {name!r}: use letters, digits, '.', '_' and '-'")
    run = TrackedRun(uri, run_id)
    local = run.download(checkpoint_artifact, work)
    unet = load_sampling_export(local)["unet"]
    try:
        with _fluent_uri(uri) as mlflow, mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name=MODEL_ARTIFACT,
                python_model=str(model.CODE_FILE),
                artifacts={model.ARTIFACT: str(local)},
                signature=model.signature(int(unet["image_size"]), int(unet["in_channels"])),
                input_example=model.input_example(),
                pip_requirements=model.pip_requirements(),
                registered_model_name=name,
            )
        version = run.client.get_model_version(name, str(info.registered_model_version))
        all_tags = {**tags, TAG_CHECKPOINT: checkpoint_artifact, TAG_IMAGES_SEEN: images_of(checkpoint_artifact)}
        for k, v in all_tags.items():
            run.client.set_model_version_tag(name, version.version, k, str(v))
    except Exception as e:
        raise TrackingError(f"could not log and register the model of MLflow run {run_id!r} as {name!r}: {e}") from None
    return run.client.get_model_version(name, version.version)


def registered_versions(uri: str, name: str) -> list[Any]:
    """Every ``ModelVersion`` of registered model ``name``, oldest first."""
    return sorted(mlflow_client(uri).search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))


def _registry_listing(client, name: str) -> str:
    versions = registered_versions(client.tracking_uri, name)
    aliases = client.get_registered_model(name).aliases  # alias -> version
    if not versions:
        return f"registered model {name!r} has no versions"
    return f"registered model {name!r} has versions {', '.join(v.version for v in versions)}" + (
        f" and aliases {', '.join(f'@{a} -> {v}' for a, v in sorted(aliases.items()))}"
        if aliases
        else " and no aliases"
    )


def model_version(uri: str, model_uri: str) -> Any:
    """The ``ModelVersion`` of ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS``; ``TrackingError``
    naming what was asked and what the registry has otherwise."""
    from mlflow.exceptions import MlflowException

    m = MODEL_URI_RE.match(model_uri)
    if not m:
        raise TrackingError(f"{model_uri!r} is not a model URI: expected models:/NAME/VERSION or models:/NAME@ALIAS")
    name, client = m["name"], mlflow_client(uri)
    try:
        try:
            client.get_registered_model(name)
        except MlflowException:
            names = sorted(r.name for r in client.search_registered_models(max_results=50))
            raise TrackingError(
                f"{model_uri}: no registered model {name!r} at {uri}; registered models: {', '.join(names) or 'none'}"
            ) from None
        try:
            if m["alias"]:
                return client.get_model_version_by_alias(name, m["alias"])
            return client.get_model_version(name, m["version"])
        except MlflowException:
            what = f"alias @{m['alias']}" if m["alias"] else f"version {m['version']}"
            raise TrackingError(f"{model_uri}: no {what}; {_registry_listing(client, name)}") from None
    except TrackingError:
        raise
    except Exception as e:  # connection refused, DNS, ...
        raise TrackingError(f"cannot reach the MLflow tracking server {uri} to resolve {model_uri}: {e}") from None


def version_metric(uri: str, version: Any, key: str) -> float | None:
    """The latest value of metric ``key`` that the source run holds for this version's checkpoint
    (evaluations log at the checkpoint's images seen), or None."""
    step = version.tags.get(TAG_IMAGES_SEEN)
    hist = [
        m for m in mlflow_client(uri).get_metric_history(version.run_id, key) if step is None or str(m.step) == step
    ]
    return max(hist, key=lambda m: m.timestamp).value if hist else None


def promote_if_better(uri: str, version: Any, alias: str, key: str, value: float) -> dict[str, Any]:
    """Set ``alias`` on ``version`` when its ``value`` of metric ``key`` (lower is better) beats the
    current holder's, or when no version holds the alias; returns the decision."""
    from mlflow.exceptions import MlflowException

    client = mlflow_client(uri)
    decision: dict[str, Any] = {"alias": alias, "metric": key, "version": version.version, "value": value}
    try:
        holder = client.get_model_version_by_alias(version.name, alias)
    except MlflowException:
        holder = None
    if holder is None:
        promote, reason = True, f"no version held @{alias}"
    elif holder.version == version.version:
        promote, reason = False, f"version {version.version} already holds @{alias}"
    else:
        held = version_metric(uri, holder, key)
        decision["holder"] = {"version": holder.version, "value": held}
        if held is None:
            # Nothing to compare with: keep the holder until it is evaluated with the same sampler.
            promote, reason = False, f"version {holder.version} (@{alias}) has no {key} to compare with; evaluate it"
        elif value < held:
            promote, reason = True, f"{value:.4g} < {held:.4g} of version {holder.version}"
        else:
            promote, reason = False, f"{value:.4g} >= {held:.4g} of version {holder.version}, which keeps @{alias}"
    if promote:
        try:
            client.set_registered_model_alias(version.name, alias, version.version)
        except Exception as e:
            raise TrackingError(
                f"could not set alias @{alias} on {version.name} version {version.version}: {e}"
            ) from None
    return decision | {"promoted": promote, "reason": reason}


def model_name(settings: Any) -> str:
    """``train.register_as``, else ``ddpm-<last part of data.url>`` (e.g. ddpm-digits)."""
    if settings.train.register_as:
        return settings.train.register_as
    last = settings.data.url.rstrip("/").rsplit("/", 1)[-1]
    return "ddpm-" + (re.sub(r"[^A-Za-z0-9._-]+", "-", last).strip("-.") or "model")


def register(settings: Any, run_id: str, *, log=print) -> Any:
    """Log the latest sampling checkpoint of the finished training run ``run_id`` as its MLflow Model
    and register it as a new version of ``model_name(settings)``, tagged with the run's data and key
    config. Returns the ``ModelVersion``."""
    uri = settings.tracking.uri
    checkpoints = TrackedRun(uri, run_id).checkpoints()
    if not checkpoints:
        raise TrackingError(f"MLflow run {run_id!r} has no sampling checkpoint to register as a model")
    images_seen = max(checkpoints)
    tags = {
        "ddpm.data_url": settings.data.url,
        "ddpm.preset": settings.model.preset,
        "ddpm.image_size": settings.data.image_size,
        "ddpm.channels": settings.data.channels,
        "ddpm.objective": settings.diffusion.objective,
        "ddpm.run_name": settings.train.run_name,
    }
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ddpm-model-") as work:
        version = log_and_register_model(uri, run_id, checkpoints[images_seen], model_name(settings), tags, work)
    log(
        f"registered the model of {images_seen} images as models:/{version.name}/{version.version} "
        f"({time.perf_counter() - t0:.1f} s)"
    )
    return version


def evaluate_model(s: SampleSettings, *, log=print) -> dict[str, Any]:
    """Evaluate the version ``s.model`` names (its source run's checkpoint, results into that run), then,
    with ``s.promote``, move that alias to it if its Frechet distance beats the holder's."""
    require_tracking(s)
    version = model_version(s.tracking.uri, s.model)
    at = s.model_copy(update={"run_id": version.run_id, "checkpoint": version.tags[TAG_CHECKPOINT]})
    try:
        summary = evaluate(at, log=log)
    except SizeMismatch as e:
        name = version.name
        have = [
            f"{v.version} ({v.tags.get('ddpm.image_size', '?')} px)" for v in registered_versions(s.tracking.uri, name)
        ]
        raise SizeMismatch(f"{e}; versions of {name!r}: {', '.join(have)}") from None
    summary["model"] = {"uri": s.model, "name": version.name, "version": version.version}
    if s.promote:
        key = next(k for k in summary["metrics"] if re.fullmatch(r".*/fd_[a-z0-9]+", k))
        summary["promotion"] = promote_if_better(s.tracking.uri, version, s.promote, key, summary["metrics"][key])
    return summary
