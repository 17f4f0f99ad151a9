"""A registered model behind a real `mlflow models serve` process: valid JSON gets class names and
probabilities, every bad body gets HTTP 400 with the project's one-line explanation, and the server stays up."""
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from mlflow import MlflowClient

from conftest import free_port
from fmnist import data as fdata
from fmnist.config import load_config
from fmnist.data import CLASSES
from fmnist.pipeline import run_experiment
from fmnist.tracking import MLflowTracker

pytestmark = pytest.mark.slow


def post(url: str, body) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def scoring_server(mlflow_server, tiny_data, tmp_path_factory):
    os.environ["MLFLOW_TRACKING_URI"] = mlflow_server  # module scope: set by hand, restored below
    cfg = load_config("cnn", overrides=[f"data.data_dir={tiny_data}", "train.epochs=3", "model.widths=[8,16]"])
    run_id = run_experiment(cfg, MLflowTracker("serving")).run_id
    [version] = MlflowClient().search_model_versions(f"run_id = '{run_id}'")
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    # The venv's bin on PATH: `mlflow models serve` starts `uvicorn` by name (README says so too).
    env = os.environ | {"PATH": f"{os.path.dirname(os.sys.executable)}{os.pathsep}{os.environ['PATH']}"}
    server = subprocess.Popen(["mlflow", "models", "serve", "-m", f"models:/fmnist-cnn/{version.version}",
                               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)], env=env,
                              stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2):
                break
        except OSError:
            assert server.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
    yield url, MlflowClient().get_run(run_id)
    os.killpg(server.pid, signal.SIGTERM)
    server.wait(timeout=30)
    del os.environ["MLFLOW_TRACKING_URI"]


def test_valid_bodies_get_class_names_and_probabilities(scoring_server, tiny_data):
    url, run = scoring_server
    data = fdata.load(tiny_data, 0.1, seed=0)
    images = data.x_test.numpy()
    status, answer = post(f"{url}/invocations", {"inputs": images.tolist()})
    assert status == 200
    rows = answer["predictions"]
    assert len(rows) == len(images) and set(rows[0]) == {"class", "probability", *CLASSES}
    accuracy = np.mean([r["class"] == CLASSES[k] for r, k in zip(rows, data.y_test.tolist())])
    assert accuracy == run.data.metrics["test_accuracy"]  # the served model is the evaluated one
    status, one = post(f"{url}/invocations", {"instances": images[0].tolist()})  # one (28, 28) image
    assert status == 200 and one["predictions"][0]["class"] == rows[0]["class"]


@pytest.mark.parametrize("body,expected", [
    ({"inputs": (np.zeros((2, 28, 28)) + 0.5).tolist()}, "dtype float64 (0-1 floats? send (x * 255).round() as "
                                                         "integers); expected uint8 pixel values 0-255"),
    ({"inputs": np.zeros((2, 32, 32), int).tolist()}, "shape (2, 32, 32); expected uint8 pixel values"),
    ({"inputs": []}, "empty (shape (0,)); expected uint8 pixel values"),
    ({"inputs": "a picture"}, "text; expected uint8 pixel values"),
    ({"inputs": np.full((1, 28, 28), 300).tolist()}, "pixel values from 300 to 300 are out of range; expected"),
    ({"inputs": [[None] * 28] * 28}, "null or mixed values; expected uint8 pixel values"),
])
def test_bad_bodies_get_400_with_the_one_line_explanation_and_the_server_stays_up(scoring_server, body, expected):
    url, _ = scoring_server
    status, answer = post(f"{url}/invocations", body)
    assert status == 400
    assert answer["message"].startswith("input: ") and expected in answer["message"]
    assert "\n" not in answer["message"] and "Traceback" not in json.dumps(answer)
    with urllib.request.urlopen(f"{url}/ping", timeout=5) as r:
        assert r.status == 200
