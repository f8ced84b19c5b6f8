"""The pyfunc model without the stack: saved locally, loaded in a fresh process, same bytes as an actor."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.config import Settings
from pipeline.registry import model_name
from pipeline.sample import model as pyfunc_model

SCHEDULE = {"kind": "linear", "num_timesteps": 100, "beta_start": 1e-3, "beta_end": 0.2, "cosine_s": 0.008}


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    from pipeline.checkpoint import sampling_export
    from pipeline.ddpm.schedule import NoiseSchedule
    from pipeline.ddpm.unet import preset
    from pipeline.train.state import OptimConfig, TrainState

    state = TrainState(preset("tiny", image_size=8, in_channels=1), NoiseSchedule.from_dict(SCHEDULE), OptimConfig())
    path = tmp_path_factory.mktemp("export") / "images_000000000001.pt"
    path.write_bytes(sampling_export(state.state_dict()))
    return path


def test_saved_model_loads_in_a_fresh_process_and_samples_as_an_actor(export, tmp_path):
    import mlflow

    from pipeline.sample.pool import SamplerWorker

    where = tmp_path / "model"
    mlflow.pyfunc.save_model(
        str(where),
        python_model=str(pyfunc_model.CODE_FILE),
        artifacts={pyfunc_model.ARTIFACT: str(export)},
        signature=pyfunc_model.signature(8, 1),
        input_example=pyfunc_model.input_example(),
        pip_requirements=pyfunc_model.pip_requirements(),
    )
    assert not list(where.rglob("*.pkl"))  # the model is code plus the checkpoint: nothing unpickled at load
    options = Settings.from_cli(["--sample.method", "ddim", "--sample.steps", "10"]).sample.options("eps")
    actor = SamplerWorker(export.read_bytes(), ema=True, options=options, threads=1, use_gpu=False, chunk=8)
    threads = torch.get_num_threads()
    try:
        expected, _, _ = actor.sample([5, 6, 7, 40])
    finally:
        torch.set_num_threads(threads)
    out = tmp_path / "images.npy"
    code = f"""
import sys, numpy as np, pandas as pd, mlflow
m = mlflow.pyfunc.load_model({str(where)!r})
np.save({str(out)!r}, m.predict(pd.DataFrame({{"seed": [5, 6, 7, 40]}}), params={{"steps": 10, "chunk": 8}}))
assert "ray" not in sys.modules
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    images = np.load(out)
    assert images.dtype == np.uint8 and images.shape == (4, 8, 8, 1)
    np.testing.assert_array_equal(images, expected)


def test_seeds_from_frames_arrays_and_lists():
    assert pyfunc_model.seeds_of(pd.DataFrame({"seed": [3, 1]})) == [3, 1]
    assert pyfunc_model.seeds_of(np.array([[2], [4]])) == [2, 4]
    assert pyfunc_model.seeds_of([7]) == [7]
    with pytest.raises(ValueError, match="seed"):
        pyfunc_model.seeds_of(pd.DataFrame({"x": [1]}))
    with pytest.raises(ValueError, match="non-negative"):
        pyfunc_model.seeds_of([-1])


def test_registered_name_defaults_to_the_dataset():
    s = Settings.from_cli(["--data.url", "s3://ddpm-data/digits/"])
    assert model_name(s) == "ddpm-digits"
    assert model_name(Settings.from_cli(["--train.register-as", "mine"])) == "mine"
    with pytest.raises(Exception, match="register_as"):
        Settings.from_cli(["--train.register-as", "a/b"])


def test_signature_takes_seeds_and_sampler_params():
    sig = pyfunc_model.signature(32, 3)
    assert sig.inputs.input_names() == ["seed"]
    assert sig.outputs.inputs[0].shape == (-1, 32, 32, 3) and sig.outputs.inputs[0].type == np.dtype(np.uint8)
    assert {p.name: p.default for p in sig.params} == pyfunc_model.PARAM_DEFAULTS
