"""The pipeline never imports the development stack: it reads the services' standard variables."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PIPELINE = Path(__file__).resolve().parents[3] / "pipeline"


def test_no_pipeline_module_imports_infra():
    offenders = []
    for path in sorted(PIPELINE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{path.relative_to(PIPELINE.parent)}: {n}" for n in names if n.split(".")[0] == "infra"]
    assert offenders == []


def test_the_jobs_settings_and_ray_connection_load_without_infra():
    code = (
        "import sys, pipeline.config, pipeline.cluster, pipeline.cli; "
        "assert not [m for m in sys.modules if m.split('.')[0] == 'infra'], sorted(sys.modules)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
