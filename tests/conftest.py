"""Shared fixtures: one tiny real bundle (trained, exported, parity-checked) per test session.

The tiny bundle uses the from-scratch encoders at 64x64 so the whole suite stays fast; tests
about the real pretrained default bundle build their own.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")
# The suite starts hundreds of apps in one process: freezing each one's start-up objects would keep
# all of them (their reference cycles) for the whole run. tests/app/test_endpoints.py checks the freeze.
os.environ.setdefault("MMFUSION_GC_FREEZE", "false")
DEMO_IMAGES = 160


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("demo")


@pytest.fixture(scope="session")
def tiny_config(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    from model.config import TrainConfig

    return TrainConfig(
        data="demo", demo_dir=str(demo_dir), demo_images=DEMO_IMAGES, demo_image_size=96,
        run_dir=str(tmp_path_factory.mktemp("run")), name="tiny-test", version="0.0.1",
        image_encoder="small_cnn", text_encoder="bilstm", fusion="concat", image_size=64,
        epochs=2, batch_size=32, hidden_dim=64, embed_dim=32, seed=0, num_threads=1,
        encoder_kwargs={"image": {"width": 8, "out_dim": 32}, "text": {"embed_dim": 16, "hidden": 16}},
    )


@pytest.fixture(scope="session")
def tiny_run(tiny_config) -> Path:
    from model.train import train

    return train(tiny_config, progress=False)


@pytest.fixture(scope="session")
def tiny_bundle(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from model.export import export_bundle

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    export_bundle(tiny_run, out, progress=False)
    return out


@pytest.fixture
def bundle_copy(tiny_bundle: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny bundle, for tests that tamper with it."""
    import shutil

    dst = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, dst)
    return dst


@pytest.fixture
def settings(tiny_bundle: Path, tmp_path: Path):
    from app.core.config import Settings

    return Settings(bundle=tiny_bundle, index_path=tmp_path / "index", intra_op_threads=1, decode_threads=2)


@pytest.fixture
def client(settings) -> Iterator:
    from fastapi.testclient import TestClient

    from app.main import create_app

    with TestClient(create_app(settings)) as c:
        yield c
