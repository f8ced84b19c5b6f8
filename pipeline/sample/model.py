"""The trained model as an MLflow Model: a pyfunc whose ``predict`` turns seeds into images.

``DiffusionModel`` holds one artifact, ``checkpoint``: the training run's sampling export
(``pipeline.checkpoint.sampling_export``: EMA weights, U-Net config, schedule, objective), read with
``torch.load(weights_only=True)``. The class travels as code (MLflow's "models from code": the file
``model_code.py`` is copied into the model and executed at load time), so loading the model unpickles
nothing. Load it anywhere the package is installed, without Ray or the stack::

    model = mlflow.pyfunc.load_model("models:/ddpm-digits@champion")
    images = model.predict(pd.DataFrame({"seed": [0, 1, 2]}), params={"steps": 50})  # uint8 (3, H, W, C)

The image of a seed is the one ``jobs/sample.py`` makes with the same sampler settings and ``chunk``
on the same kind of device: the same per-seed noise streams (``pipeline.ddpm.sampler``) and model
calls of exactly ``chunk`` images (``pipeline.sample.pool.FixedShapeCalls``), with the torch threads
of a sampling actor (``threads``, default 1).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from mlflow.pyfunc import PythonModel

from pipeline.checkpoint import load_sampling_export, model_for_sampling
from pipeline.config import ClusterConfig, SampleConfig
from pipeline.ddpm.sampler import sample, to_uint8
from pipeline.ddpm.schedule import NoiseSchedule
from pipeline.ddpm.unet import UNetConfig
from pipeline.sample.pool import FixedShapeCalls
from pipeline.sample.settings import SampleSettings

CODE_FILE = Path(__file__).with_name("model_code.py")
ARTIFACT = "checkpoint"
BATCH = 256  # seeds per sampler call: bounds memory; an image does not depend on it
# The sampler settings predict takes as params, with jobs/sample.py's defaults.
_JOB = SampleSettings.model_fields
PARAM_DEFAULTS: dict[str, Any] = _JOB["sample"].default.model_dump() | {
    "chunk": _JOB["chunk"].default,
    "threads": ClusterConfig.model_fields["threads_per_worker"].default,
}


def seeds_of(model_input: Any) -> list[int]:
    """The seeds of a DataFrame with a ``seed`` column, a dict, an array or a list."""
    if hasattr(model_input, "columns"):
        if "seed" not in model_input.columns:
            raise ValueError(f"expected a column 'seed', got columns {list(model_input.columns)}")
        values = model_input["seed"]
    elif isinstance(model_input, dict):
        values = model_input["seed"]
    else:
        values = model_input
    seeds = np.asarray(values).reshape(-1)
    if not np.issubdtype(seeds.dtype, np.integer) or (seeds < 0).any():
        raise ValueError("seeds must be non-negative integers")
    return [int(s) for s in seeds]


class DiffusionModel(PythonModel):
    """Seeds in, uint8 images (N, H, W, C) out, from the EMA weights of a sampling export."""

    def load_context(self, context) -> None:
        state = load_sampling_export(context.artifacts[ARTIFACT])
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.net = model_for_sampling(state, ema=True).to(self.device)
        self.schedule = NoiseSchedule.from_dict(state["schedule"])
        self.objective = state["objective"]
        unet = UNetConfig.from_dict(state["unet"])
        self.shape = (unet.in_channels, unet.image_size, unet.image_size)

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> np.ndarray:
        p = PARAM_DEFAULTS | {k: v for k, v in (params or {}).items() if v is not None}
        seeds = seeds_of(model_input)
        options = SampleConfig(**{k: p[k] for k in SampleConfig.model_fields}).options(self.objective)
        call = FixedShapeCalls(self.net, int(p["chunk"]))
        c, h, w = self.shape
        out = np.empty((len(seeds), h, w, c), dtype=np.uint8)
        threads = torch.get_num_threads()
        if self.device.type == "cpu":
            torch.set_num_threads(int(p["threads"]))
        try:
            for i in range(0, len(seeds), BATCH):
                x = sample(call, self.schedule, seeds[i : i + BATCH], self.shape, options, device=self.device)
                out[i : i + BATCH] = to_uint8(x)
        finally:
            torch.set_num_threads(threads)
        return out


def signature(image_size: int, channels: int):
    """Input: a ``seed`` column; params: the sampler settings; output: uint8 images (N, H, W, C)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    types = {str: "string", int: "long", float: "double", bool: "boolean"}
    return ModelSignature(
        inputs=Schema([ColSpec("long", "seed")]),
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, image_size, image_size, channels))]),
        params=ParamSchema([ParamSpec(k, types[type(v)], v) for k, v in PARAM_DEFAULTS.items()]),
    )


def input_example():
    """Two seeds and a one-step sampler: MLflow runs the example once while logging, so it stays cheap."""
    import pandas as pd

    return pd.DataFrame({"seed": [0, 1]}), {"method": "ddim", "steps": 1, "chunk": 2}


def pip_requirements() -> list[str]:
    """What the model needs besides this package (installed from the repository, not from an index)."""
    from importlib.metadata import version

    return [f"{p}=={version(p)}" for p in ("mlflow", "torch", "numpy", "pandas")]
