"""README's team set-up, for real: `mlflow server` on a PostgreSQL backend store with basic auth and an allowed-hosts
list; a training run logs to it with credentials, and requests without them are refused."""
import base64
import os
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from werkzeug.security import generate_password_hash

from conftest import free_port

pytestmark = pytest.mark.slow
ADMIN, PASSWORD = "admin", "fmnist-test-password"


def status(url: str, headers: dict[str, str] = ()) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=dict(headers)), timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:  # not listening yet
        return 0


def test_postgresql_backend_with_basic_auth_and_allowed_hosts(postgres_url, tiny_data, tmp_path, monkeypatch):
    import psycopg2

    connection = psycopg2.connect(postgres_url)
    connection.autocommit = True
    connection.cursor().execute("CREATE DATABASE mlflow")
    connection.close()
    (tmp_path / "auth.ini").write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{tmp_path / 'auth.db'}\n"
        f"admin_username = {ADMIN}\nadmin_password = {PASSWORD}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", postgres_url.rsplit("/", 1)[0] + "/mlflow",
         "--artifacts-destination", str(tmp_path / "artifacts"), "--app-name", "basic-auth",
         "--allowed-hosts", f"127.0.0.1:{port},localhost:{port}"],
        env=os.environ | {"MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "auth.ini"),
                          "MLFLOW_FLASK_SERVER_SECRET_KEY": "fmnist-test-csrf-key"}, cwd=tmp_path,
        stdout=open(tmp_path / "server.log", "w"), stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while status(f"{uri}/health") != 200:
            assert server.poll() is None and time.time() < deadline, (tmp_path / "server.log").read_text()[-3000:]
            time.sleep(0.5)
        # The server checks the password on every request, and its default scrypt hash costs 0.13 s of CPU each
        # time: a run's few hundred requests would spend a minute on it. The same password under a one-round
        # PBKDF2 hash (a format the server reads as well) keeps the check and drops that cost.
        with sqlite3.connect(tmp_path / "auth.db") as auth:
            auth.execute("UPDATE users SET password_hash = ? WHERE username = ?",
                         (generate_password_hash(PASSWORD, "pbkdf2:sha256:1"), ADMIN))
        search = f"{uri}/api/2.0/mlflow/experiments/search?max_results=1"
        credentials = base64.b64encode(f"{ADMIN}:{PASSWORD}".encode()).decode()
        assert status(search) == 401  # no credentials
        assert status(search, {"Authorization": f"Basic {credentials}"}) == 200
        assert status(search, {"Authorization": f"Basic {credentials}", "Host": "evil.example"}) in (400, 403)

        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
        out = subprocess.run([sys.executable, "-m", "fmnist", "train", "--arch", "ann", "--data-dir", str(tiny_data),
                              "--experiment", "team", "train.epochs=1", "model.widths=[16]"],
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        from mlflow import MlflowClient

        client = MlflowClient(uri)
        [run] = client.search_runs([client.get_experiment_by_name("team").experiment_id])
        assert run.info.status == "FINISHED" and "test_accuracy" in run.data.metrics
        assert client.get_model_version_by_alias("fmnist-ann", "champion").run_id == run.info.run_id
        assert any((tmp_path / "artifacts").rglob("confusion_matrix.png"))  # artifacts land where the server says
    finally:
        server.terminate()
        server.wait(timeout=30)
