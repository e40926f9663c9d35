"""Test-wide settings: generated data and caches go to a temporary folder, never the user's cache."""

import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    previous = os.environ.get("CISDQ_BENCH_CACHE")
    os.environ["CISDQ_BENCH_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if previous is None:
        os.environ.pop("CISDQ_BENCH_CACHE", None)
    else:
        os.environ["CISDQ_BENCH_CACHE"] = previous
