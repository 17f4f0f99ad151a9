"""The logged model: an MLflow pyfunc that takes raw uint8 (N, 28, 28) images and answers class names and
probabilities, running the run's saved `torch.export` program through fmnist.predict.Classifier.

Precision is chosen where the model is loaded (bf16 on CPUs with native bf16, fp32 elsewhere);
`mlflow.pyfunc.load_model(uri, model_config={"precision": "fp32"})` or FMNIST_PRECISION=fp32 asks for fp32.
Bad input is answered with MLflow's own exception and a bad-request code, so a REST client of
`mlflow models serve` gets HTTP 400 whose `message` is the one-line explanation of what was expected.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature, infer_signature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from fmnist.errors import ConfigError, InputError
from fmnist.predict import Classifier

MODEL_FILE = Path(__file__).with_name("pyfunc_model.py")
PACKAGE = Path(__file__).resolve().parents[1]


class InputRefused(MlflowException):
    """Bad input: MLflow's own exception with a bad-request code, so `mlflow models serve` answers HTTP 400. The
    scoring server prefixes `message` with a dump of the request data before answering; the answer keeps the
    one-line explanation alone."""

    def __init__(self, reason: str):
        super().__init__(reason, error_code=INVALID_PARAMETER_VALUE)
        self.reason = reason

    def serialize_as_json(self) -> str:
        return json.dumps({"error_code": self.error_code, "message": self.reason})


class PyfuncClassifier(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        precision = (context.model_config or {}).get("precision", os.environ.get("FMNIST_PRECISION", "auto"))
        self.classifier = Classifier.load(context.artifacts["network"], precision)

    def predict(self, context, model_input: np.ndarray, params=None):  # the hint: no MLflow input schema
        try:
            return self.classifier.predict(model_input)
        except InputError as e:
            raise InputRefused(str(e)) from None


def model_arguments(network: Path, example: np.ndarray) -> dict:
    """What MLflow needs to save the pyfunc: the models-from-code file, the program, this package's code."""
    output = Classifier.load(network).predict(example)
    return dict(
        python_model=str(MODEL_FILE), artifacts={"network": str(network)}, code_paths=[str(PACKAGE)],
        input_example=example,
        # Output schema only: MLflow's input enforcement would refuse a (28, 28) image and answer a float
        # batch with a dump of the data; Classifier checks the input and says what it expected.
        signature=ModelSignature(inputs=None, outputs=infer_signature(example, output).outputs),
        # explicit, because inferring them loads the model once more in a subprocess
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}",
                          "numpy", "pandas", "pyyaml", "tqdm"])


def log_model(run_id: str, network: Path, example: np.ndarray) -> str:
    """Log the saved program `network` as run `run_id`'s model; returns its models:/ URI."""
    info = Model.log(artifact_path=None, name="model", flavor=mlflow.pyfunc, run_id=run_id,
                     **model_arguments(network, example))
    return info.model_uri


def save_model(path: Path, network: Path, example: np.ndarray) -> None:
    """The same model in a local folder, without a tracking store (benchmarks, offline use)."""
    mlflow.pyfunc.save_model(str(path), **model_arguments(network, example))


def classify(model_uri: str, images: np.ndarray):
    """`fmnist predict`: the model's table (class, probability, one column per class) for these images."""
    model = load_classifier(model_uri, "--model ")
    try:
        return model.predict(images)
    except MlflowException as e:
        raise ConfigError(f"--model {model_uri}: {e.message}") from None


def load_classifier(model_uri: str, option: str):
    """A logged or registered model (`models:/fmnist-cnn@champion`, `runs:/<id>/model`) as a pyfunc model;
    `option` names where the URI came from in the error."""
    try:
        return mlflow.pyfunc.load_model(model_uri)
    except (MlflowException, OSError) as e:
        raise ConfigError(f"{option}{model_uri}: cannot load it from {mlflow.get_tracking_uri()} "
                          f"({getattr(e, 'message', e)})") from None


def load_teacher(model_uri: str) -> tuple[Classifier, str | None]:
    """train.teacher: the network inside a logged or registered fmnist model (or a saved model's folder), run as
    the model serves it, and the id of the run that logged it."""
    model = load_classifier(model_uri, "train.teacher=")
    try:
        return model.unwrap_python_model().classifier, model.metadata.run_id
    except (MlflowException, AttributeError):  # another flavour, or a pyfunc not of this project
        raise ConfigError(f"train.teacher={model_uri}: not an fmnist model (expected one logged by fmnist train)") \
            from None
