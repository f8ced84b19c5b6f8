"""bench.py run as on a bare GPU box (torch only) in subprocesses: the quick smoke runs write valid JSON, and
the script and benchmarks/gpu_check.sh parse. Smoke runs of the benchmark: marked slow. The benchmarks'
machinery (reference loop, FLOP counting, timing) is tested in tests/unit/test_benchmarks.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]

# Runs `python -m benchmarks.bench` as on a bare GPU box: the project not installed (only the working
# directory on sys.path) and Ray, MLflow, pydantic, webdataset, boto3 and tqdm unimportable.
_BARE_BOX_RUN = """
import runpy, sys
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
for name in ("ray", "mlflow", "pydantic", "pydantic_settings", "webdataset", "boto3", "tqdm", "pipeline.config"):
    sys.modules[name] = None  # import raises ImportError; importlib.util.find_spec gives None
sys.argv = ["bench", *sys.argv[1:]]
runpy.run_module("benchmarks.bench", run_name="__main__", alter_sys=True)
"""


def _run_bench(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-c", _BARE_BOX_RUN, *args, "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(out.read_text())


def test_bench_quick_smoke_writes_valid_json(tmp_path):
    d = _run_bench(tmp_path, "--preset", "tiny", "--image-size", "8", "--channels", "1", "--quick", "--device", "cpu")
    assert {"meta", "flops", "train", "sample", "goals"} <= set(d)
    assert d["meta"]["preset"] == "tiny" and d["meta"]["device"] == "cpu"
    assert d["flops"]["fwd_flops_per_image"] > 0 and d["flops"]["fwd_bwd_flops_per_image"] > 0
    train, samp = d["train"]["variants"], d["sample"]["variants"]
    assert {"fp32", "math", "channels_last"} <= set(train) and {"fp32", "math", "channels_last"} <= set(samp)
    assert train["fp32"]["speedup_vs_fp32"] == pytest.approx(1.0)
    for r in train.values():
        assert r["images_per_s"] > 0 and r["achieved_gflops"] > 0 and r["fraction_of_peak"] is None
        assert r["loss_rel_diff_vs_fp32"] < 1e-4
    for r in samp.values():
        assert r["ancestral_1000_images_per_s"] > 0 and r["ddim50_images_per_s"] > r["ancestral_1000_images_per_s"]
        assert r["max_abs_diff_vs_fp32"]["ancestral"] < 1e-4
    # GPU-only options are listed with the reason they were not run.
    assert "bf16" in d["train"]["skipped"] and "300x" in d["train"]["skipped"]["bf16"]
    assert "cuda_graph" in d["sample"]["skipped"] and "compile" in d["sample"]["skipped"]
    assert d["train"]["failed"] == {} and d["sample"]["failed"] == {}
    assert d["goals"]["train_images_per_s"]["goal"] == 6000 and d["goals"]["train_images_per_s"]["met"] is None


def test_bench_sampler_vs_reference_smoke(tmp_path):
    d = _run_bench(tmp_path, "sampler-vs-reference", "--quick", "--preset", "tiny", "--no-channels-last")
    assert set(d["ratios"]) == {"sample_vs_reference|clip", "sample_vs_reference|noclip"}
    assert d["loops"]["reference|clip"]["model_evals_per_step"] == 2.0
    assert d["loops"]["sample|clip"]["model_evals_per_step"] == 1.0
    assert max(d["max_abs_diff_reference_vs_sample_same_noise"].values()) < 1e-3


def test_bench_runs_as_a_script_and_the_gpu_check_parses():
    """`python benchmarks/bench.py` (project installed) and benchmarks/gpu_check.sh, which a GPU box runs unseen."""
    proc = subprocess.run(
        [sys.executable, "benchmarks/bench.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and "sampler-vs-reference" in proc.stdout, proc.stderr
    proc = subprocess.run(["bash", "-n", "benchmarks/gpu_check.sh"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
