"""Shared fixtures: small generated IDX files and a real `mlflow server` on a free loopback port."""
from __future__ import annotations

import gzip
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from fmnist.data import IMAGE_MAGIC, LABEL_MAGIC

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv running the tests: `mlflow` and `python` come from here

# A shell starts a background job (`make test &`) with SIGINT ignored, and the processes the tests start would
# inherit that and never see the Ctrl-C the interrupt tests send. A handler here is reset to the default in them.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_collection_modifyitems(items):
    """The slow tests first: `make test`'s two workers take tests as they become free, so the quick ones fill in
    at the end instead of one worker finishing a long test alone. Among them first, side by side, those that share
    a module-scoped fixture (a scoring server, a server the tests kill): pytest-xdist hands each worker a first
    batch of consecutive tests, so they all land in one batch and their server starts once, not on both workers."""
    def shares_a_module_fixture(item) -> bool:
        return any(defs[-1].scope == "module" for defs in item._fixtureinfo.name2fixturedefs.values())

    items.sort(key=lambda item: (item.get_closest_marker("slow") is None, not shares_a_module_fixture(item)))


def write_idx(path: Path, array: np.ndarray, magic: int, compress: bool = True) -> Path:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    raw = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


def synthetic(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Learnable fake Fashion-MNIST, robust to the training augmentation (+-2 px shifts, horizontal flips).

    Class k is a bright bar on noise: its row band is k // 2 (5 px apart), its length k % 2 (long or short,
    both centred, so a flip keeps the class).
    """
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    images = rng.integers(0, 60, size=(n, 28, 28), dtype=np.uint8)
    for i, k in enumerate(labels):
        row = 2 + 5 * (k // 2)
        images[i, row:row + 3, (3, 10)[k % 2]:(25, 18)[k % 2]] = 220
    return images, labels.astype(np.uint8)


def write_dataset(directory: Path, n_train: int = 600, n_test: int = 200, compress: bool = True) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if compress else ""
    for split, n, seed in (("train", n_train, 1), ("t10k", n_test, 2)):
        images, labels = synthetic(n, seed)
        write_idx(directory / f"{split}-images-idx3-ubyte{suffix}", images, IMAGE_MAGIC, compress)
        write_idx(directory / f"{split}-labels-idx1-ubyte{suffix}", labels, LABEL_MAGIC, compress)
    return directory


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("fmnist-tiny"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(root: Path, port: int) -> subprocess.Popen:
    """A real tracking server started by `fmnist server` (sqlite backend, artifacts served by the server), in a
    process group of its own so that a test can kill it and its workers at once, and start it again on the same
    root and port."""
    log = open(root / "server.log", "a")
    proc = subprocess.Popen([sys.executable, "-m", "fmnist", "server", "--port", str(port), "--root", str(root)],
                            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            stop_server(proc)
            pytest.fail(f"mlflow server did not start on {uri}:\n{(root / 'server.log').read_text()[-3000:]}")
        time.sleep(0.3)


def stop_server(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return
    proc.wait(timeout=30)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    proc = start_server(root, port)
    yield f"http://127.0.0.1:{port}"
    stop_server(proc)


@pytest.fixture
def tracking_env(mlflow_server, monkeypatch):
    """Point this process and its children at the test server, with the venv's tools on PATH."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    # mlflow.set_experiment() in an in-process run exports MLFLOW_EXPERIMENT_ID; undone after each test so a later
    # `mlflow run --experiment-name` does not see two experiments.
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ['PATH']}")
    import mlflow

    mlflow.set_tracking_uri(mlflow_server)
    yield mlflow_server
    mlflow.set_tracking_uri(None)  # back to MLFLOW_TRACKING_URI: a later test may point it at a store of its own


@pytest.fixture(scope="session")
def postgres_url():
    """A real PostgreSQL server on 127.0.0.1 in a temporary directory (`make test` installs postgresql-15)."""
    initdb = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not initdb:
        pytest.skip("PostgreSQL server binaries not found under /usr/lib/postgresql (apt-get install postgresql-15; "
                    "make test does it where apt is usable)")
    bindir = initdb[-1].parent
    root = Path(tempfile.mkdtemp(prefix="fmnist-pg-"))
    as_postgres = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        shutil.chown(root, "postgres")
        as_postgres = ["runuser", "-u", "postgres", "--"]
    port = free_port()

    def pg(tool: str, *args: str) -> None:
        out = subprocess.run([*as_postgres, str(bindir / tool), *args], capture_output=True, text=True, timeout=120)
        if out.returncode:
            pytest.fail(f"{tool} failed: {out.stdout[-2000:]}{out.stderr[-2000:]}")

    pg("initdb", "-D", str(root / "data"), "-U", "fmnist", "--auth=trust", "-E", "UTF8")
    pg("pg_ctl", "-D", str(root / "data"), "-l", str(root / "server.log"), "-w", "start",
       "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off "
       "-c full_page_writes=off")  # a throwaway cluster: durability only costs time
    try:
        pg("createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "fmnist", "optuna")
        yield f"postgresql://fmnist@127.0.0.1:{port}/optuna"
    finally:
        pg("pg_ctl", "-D", str(root / "data"), "-m", "fast", "stop")
        shutil.rmtree(root, ignore_errors=True)
