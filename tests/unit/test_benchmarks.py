"""The benchmarks' own machinery: the reference sampling loop, FLOP counting, the peak table, interleaved
timing, and bench.py run as on a bare GPU box (torch only).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.perf import count_flops, interleaved, model_flops, paired_speedup, peak_tflops, perturb_
from benchmarks.reference import reference_sampling
from pipeline.ddpm.sampler import SamplerOptions, SeededNoise, sample
from pipeline.ddpm.schedule import NoiseSchedule
from pipeline.ddpm.unet import UNet, preset

ROOT = Path(__file__).resolve().parents[2]
SHAPE = (1, 8, 8)


def _tiny() -> UNet:
    """Weights perturbed: the zero-initialised output layers would make every sampler agree trivially."""
    torch.manual_seed(0)
    return perturb_(UNet(preset("tiny", image_size=8, in_channels=1)), 0.05, 0)


# -- the reference loop ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("clip", [True, False])
def test_reference_loop_equals_sample_given_the_same_noise(clip):
    """The loop sample() is measured against computes the same images: the comparison is like for like."""
    model = _tiny().eval()
    s = NoiseSchedule("linear", 25)
    calls = []
    handle = model.register_forward_pre_hook(lambda *_: calls.append(1))
    noise = SeededNoise(range(6), SHAPE, torch.device("cpu"))
    x_T = noise.initial()
    ref = reference_sampling(model, s, x_T, clipping=clip, noise_fn=lambda _x: noise.next())
    assert len(calls) == (2 if clip else 1) * 25  # the reference evaluates the model twice per clipped step
    calls.clear()
    got = sample(model, s, range(6), SHAPE, SamplerOptions("ancestral", clip=clip))
    assert len(calls) == 25
    handle.remove()
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert not torch.equal(got[0], got[1])


# -- measurement helpers ----------------------------------------------------------------------------------


def test_flop_count_matches_the_paper_cifar_model():
    """The paper's CIFAR-10 model: 35.7M parameters, 6.05 GMAC of convolutions per 32x32 forward."""
    torch.manual_seed(0)
    model = UNet(preset("cifar", image_size=32, in_channels=3))
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(35.7e6, rel=0.005)
    x, t = torch.randn(1, 3, 32, 32), torch.zeros(1, dtype=torch.long)
    with torch.no_grad():
        total, by_op = count_flops(lambda: model(x, t))
    assert by_op["aten.convolution"] / 2e9 == pytest.approx(6.05, rel=0.005)
    assert total / 1e9 == pytest.approx(12.44, rel=0.005)  # + attention (bmm) and the linear layers


def test_model_flops_training_is_about_three_forwards():
    f = model_flops(_tiny(), torch.randn(2, 1, 8, 8), torch.zeros(2, dtype=torch.long))
    assert 2.7 < f["train_over_fwd"] <= 3.0
    assert f["fwd_flops_per_image"] > 0


def test_peak_table():
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("x86_64 CPU, 2 threads") is None


def test_interleaved_rounds_and_errors():
    calls: list[str] = []
    errors: dict[str, str] = {}

    def bad():
        calls.append("bad")
        if calls.count("bad") > 1:
            raise RuntimeError("boom")

    runners = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b"), "bad": bad}
    out = interleaved(runners, device=torch.device("cpu"), warmup=1, repeats=3, errors=errors)
    assert set(out) == {"a", "b"} and errors == {"bad": "RuntimeError: boom"}
    assert len(out["a"].times) == len(out["b"].times) == 3
    assert paired_speedup([2.0, 2.0, 4.0], [1.0, 1.0, 1.0]) == 2.0


# -- the bench itself ---------------------------------------------------------------------------------------

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
