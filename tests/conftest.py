"""Test setup: 8 simulated CPU devices and the location of the shared test data."""

import os
import pathlib

import pytest

# Must run before any JAX computation: every test sees an 8-device CPU platform.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

REPO = pathlib.Path(__file__).resolve().parent.parent
DATA_DIR = pathlib.Path(os.environ.get("M11B_DATA_DIR", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    """../shared/data (or $M11B_DATA_DIR). Missing data is a failure, never a skip."""
    if not (DATA_DIR / "gpt2_bpe" / "encoder.json").is_file():
        pytest.fail(f"test data not found at {DATA_DIR}: set M11B_DATA_DIR to the shared/data folder")
    return DATA_DIR
