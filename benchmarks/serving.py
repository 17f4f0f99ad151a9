"""The logged model against the training code's own inference, side by side in one process, per architecture:
throughput on the 10,000 test images, CPU time (user and system) per image, batch-1 latency in process and over
REST (`mlflow models serve`). Target: the pyfunc at >= 70 % of the training path's throughput (transfer >= 450
images/s on the reference machine).

  training path  fmnist.train.predict_logits on the trained modules with the training runtime (bf16 autocast and
                 channels_last where the CPU has native bf16); for transfer, the frozen part with batch norm
                 folded (what the activation cache computes) followed by the trained stages
  pyfunc         mlflow.pyfunc.load_model(...).predict(uint8 images): input checks, the exported program with
                 precision chosen at load, probabilities and class names as a DataFrame

    python benchmarks/serving.py [--arch ann cnn transfer] [--rest-requests 200]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import torch

from fmnist import data as fdata
from fmnist.config import load_config
from fmnist.errors import reported
from fmnist.models.layers import fold_batchnorm
from fmnist.models.transfer import TransferNet
from fmnist.pipeline import build
from fmnist.predict import export_network
from fmnist.tracking.pyfunc import save_model
from fmnist.train import predict_logits


def timed(fn, images) -> tuple[float, float, float]:
    """(images/s, user CPU ms per image, system CPU ms per image), after one warm-up call."""
    fn(images[:256])
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    fn(images)
    seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    n = len(images)
    return n / seconds, 1000 * (after.ru_utime - before.ru_utime) / n, 1000 * (after.ru_stime - before.ru_stime) / n


def latencies(fn, image, repeats: int) -> tuple[float, float]:
    for _ in range(5):
        fn(image)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(image)
        times.append(1000 * (time.perf_counter() - start))
    return float(np.percentile(times, 50)), float(np.percentile(times, 99))


def training_path(model, rt, cfg):
    if isinstance(model, TransferNet) and model.cut > 0:
        frozen, trained = fold_batchnorm(model.frozen_part()), model.trained_part()
        frozen.to(memory_format=rt.memory_format)

        def run(x):
            return predict_logits(trained, predict_logits(frozen, x, rt, cfg.train.eval_batch_size), rt,
                                  cfg.train.eval_batch_size)
        return run
    model.to(memory_format=rt.memory_format)
    return lambda x: predict_logits(model, x, rt, cfg.train.eval_batch_size)


def rest_latency(model_dir: Path, image: np.ndarray, requests: int) -> tuple[float, float]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    server = subprocess.Popen(["mlflow", "models", "serve", "-m", str(model_dir), "--env-manager", "local", "-h",
                               "127.0.0.1", "-p", str(port)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"{url}/ping", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        body = json.dumps({"inputs": image.tolist()}).encode()

        def call(_):
            request = urllib.request.Request(f"{url}/invocations", body, {"Content-Type": "application/json"})
            urllib.request.urlopen(request, timeout=30).read()
        return latencies(call, None, requests)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", nargs="+", default=["ann", "cnn", "transfer"])
    ap.add_argument("--latency-repeats", type=int, default=200)
    ap.add_argument("--rest-requests", type=int, default=200)
    args = ap.parse_args()
    rows = []
    for arch in args.arch:
        cfg = load_config(arch)
        data = fdata.load(cfg.data.data_dir, cfg.data.val_fraction, cfg.train.seed)
        images = data.x_test.numpy()
        model, rt = build(cfg)  # the shipped architecture; its weights do not change the speed
        model.eval()
        with tempfile.TemporaryDirectory() as tmp:
            network = Path(tmp) / "network.pt2"
            torch.export.save(export_network(model, images[:2]), network)
            save_model(Path(tmp) / "model", network, images[:2])
            pyfunc = mlflow.pyfunc.load_model(str(Path(tmp) / "model"))
            train_fn = training_path(model, rt, cfg)
            ours = timed(lambda x: train_fn(torch.from_numpy(x)), images)
            served = timed(pyfunc.predict, images)
            p50, p99 = latencies(pyfunc.predict, images[:1], args.latency_repeats)
            rest = rest_latency(Path(tmp) / "model", images[:1], args.rest_requests) if args.rest_requests else (0, 0)
        rows.append((arch, rt.describe(), ours, served, p50, p99, rest))
        print(f"{arch}: training path {ours[0]:.0f} img/s, pyfunc {served[0]:.0f} img/s "
              f"({served[0] / ours[0]:.0%}), batch-1 p50 {p50:.1f} ms p99 {p99:.1f} ms, REST p50 {rest[0]:.1f} ms "
              f"p99 {rest[1]:.1f} ms", flush=True)
    print("\n| arch | runtime | training path img/s | pyfunc img/s | pyfunc / training | CPU ms/img user+sys "
          "(training; pyfunc) | batch-1 p50 / p99 ms | REST batch-1 p50 / p99 ms |\n|---|---|---|---|---|---|---|---|")
    for arch, runtime, ours, served, p50, p99, rest in rows:
        print(f"| {arch} | {runtime} | {ours[0]:,.0f} | {served[0]:,.0f} | {served[0] / ours[0]:.2f}x | "
              f"{ours[1]:.2f}+{ours[2]:.2f}; {served[1]:.2f}+{served[2]:.2f} | {p50:.1f} / {p99:.1f} | "
              f"{rest[0]:.1f} / {rest[1]:.1f} |")


if __name__ == "__main__":
    with reported("serving.py"):
        main()
