"""The KubeRay CRDs ship inside the package (infra/deploy/crds/, the oldest supported release and the
newest, with their source and hashes recorded) and every rendered manifest is validated against each."""

from __future__ import annotations

import hashlib
import json
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import pytest

from infra.deploy import check, cli

ROOT = Path(__file__).resolve().parents[3]
CRDS = ROOT / "infra" / "deploy" / "crds"


def test_the_crds_are_in_the_package_with_version_and_source_recorded():
    sources = json.loads((CRDS / "sources.json").read_text())
    assert sorted(sources) == [f"v{v}" for v in check.CRD_VERSIONS]
    for version, entry in sources.items():
        assert entry["repository"] == "https://github.com/ray-project/kuberay" and entry["tag"] == version
        assert len(entry["commit"]) == 40
        for name, digest in entry["sha256"].items():
            assert hashlib.sha256((CRDS / version / name).read_bytes()).hexdigest() == digest, (version, name)
        assert set(entry["sha256"]) == set(check.CRD_FILES.values())
    assert check.CRD_ROOT == CRDS and check.MIN_OPERATOR == "1.6.0"


def test_nothing_outside_the_repository_is_read(monkeypatch):
    monkeypatch.setenv("DDPM_KUBERAY_CRDS", "/nonexistent")
    for version in check.CRD_VERSIONS:
        assert check.crd_dir(version).is_relative_to(ROOT / "infra" / "deploy")
    assert "shared" not in Path(check.__file__).read_text()


def test_the_packages_data_carries_the_crds_and_templates():
    """A non-editable install (the image, a wheel) must have them: pyproject's package-data lists them."""
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    patterns = patterns["infra.deploy"]
    base = ROOT / "infra" / "deploy"
    for sub in ("crds", "templates"):
        for f in (base / sub).rglob("*"):
            if f.is_file():
                rel = f.relative_to(base).as_posix()
                assert any(fnmatch(rel, p) and rel.count("/") == p.count("/") for p in patterns), (
                    f"{rel} is not package data: pyproject.toml [tool.setuptools.package-data] needs "
                    '"infra.deploy" = ["templates/*.yaml", "crds/*.json", "crds/*.md", "crds/*/*.yaml"]'
                )


def test_secret_name_needs_kuberay_1_6_so_older_operators_are_refused(tmp_path, capsys):
    # Ray's token from a Secret (authOptions.secretName) is in v1.6.0's schema: the minimum.
    auth = check.crd_schema("RayCluster", "1.6.0")["properties"]["spec"]["properties"]["authOptions"]
    assert "secretName" in auth["properties"]
    out = tmp_path / "job.yaml"
    argv = ["kuberay", "--image", "i:1", "-o", str(out), "--operator-version"]
    assert cli.main([*argv, "1.5.1", "--", "--cluster.num-workers", "2"]) == 2
    err = capsys.readouterr().err
    assert "--operator-version 1.5.1" in err and ">= 1.6.0" in err and not out.exists()
    assert cli.main([*argv, "v1.6.2", "--", "--cluster.num-workers", "2"]) == 0 and out.exists()
    assert cli.main(["check", "--operator-version", "1.6.0", str(out)]) == 0
    assert cli.main(["check", "--operator-version", "1.5.0", str(out)]) == 2


@pytest.mark.parametrize(("asked", "used"), [(None, ("1.6.0", "1.7.0")), ("1.6.9", ("1.6.0",)), ("1.8", ("1.7.0",))])
def test_the_operator_version_picks_the_newest_crds_at_or_below_it(asked, used):
    assert check.crd_versions(asked) == used


def test_a_field_only_the_newer_crd_knows_is_named_with_the_release(monkeypatch):
    """A problem that only some releases have says which: the manifest would fail on those operators."""
    doc = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": "x"}, "spec": {"headGroupSpec": {}}}
    fake = {"1.6.0": ["spec.x: unknown field"], "1.7.0": []}
    monkeypatch.setattr(check, "_schema_problems", lambda d, validator: fake[validator.version])
    monkeypatch.setattr(check, "crd_validator", lambda kind, v: type("V", (), {"version": v})())
    assert check.schema_problems(doc) == ["spec.x: unknown field (KubeRay v1.6.0)"]
