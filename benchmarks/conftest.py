"""Benchmark options. ``pytest benchmarks/ --benchmark`` runs full sizes; without the flag, small smoke sizes."""

from __future__ import annotations

import subprocess

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--benchmark", action="store_true", default=False,
                     help="run the full benchmark sizes (default: small sizes that only check the harness)")


@pytest.fixture
def full(request) -> bool:
    return request.config.getoption("--benchmark")


@pytest.fixture
def env_info() -> dict:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        sha = "unknown"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"device": device, "torch": torch.__version__, "git": sha, "threads": torch.get_num_threads()}
