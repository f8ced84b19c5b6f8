"""The file MLflow executes to build the model when it loads it ("models from code"): see pipeline.sample.model."""

import mlflow

from pipeline.sample.model import DiffusionModel

mlflow.models.set_model(DiffusionModel())
