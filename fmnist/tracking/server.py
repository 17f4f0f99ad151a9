"""`fmnist server`: an MLflow tracking server for one machine, a sqlite store and the artifacts under one folder."""
from __future__ import annotations

import os
import sys
from pathlib import Path


def serve(host: str, port: int, root: Path, workers: int = 1) -> None:
    """Replace this process with `mlflow server`: a sqlite store and artifacts served by the server, under root."""
    root.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(port), "--workers", str(workers),
            "--backend-store-uri", f"sqlite:///{(root / 'mlflow.db').resolve()}",
            "--artifacts-destination", str((root / "mlartifacts").resolve())]
    print(" ".join(argv[2:]), flush=True)
    # MLflow 3 also starts five job-runner processes for its GenAI jobs, which fmnist does not use: off unless asked.
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    os.execv(sys.executable, argv)
