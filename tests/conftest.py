"""Shared fixtures: the seeded sample catalogues, a running sample server, a manifests root.

    async def test_x(sample_server, sample_lists):      # async: server on this test's loop
        ...
    def test_y(sample_server_thread, tmp_path):          # sync/CLI: server in a thread
        lists = write_lists(sample_server_thread.catalogue, sample_server_thread, tmp_path)

Catalogues are built once per session and copied per test, so a test may `add` items.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from imatsample import Catalogue, SampleServer, build_catalogue, serve_in_thread, write_lists


@pytest.fixture(scope="session")
def _faults_catalogue_base() -> Catalogue:
    return build_catalogue("faults", seed=0)


@pytest.fixture(scope="session")
def _demo_catalogue_base() -> Catalogue:
    return build_catalogue("demo", seed=0)


@pytest.fixture
def faults_catalogue(_faults_catalogue_base: Catalogue) -> Catalogue:
    """Every image oddity and network fault once; items carry `expected_status`."""
    return _faults_catalogue_base.copy()


@pytest.fixture
def demo_catalogue(_demo_catalogue_base: Catalogue) -> Catalogue:
    """The learnable demo catalogue (9 classes, ~550 records, a few faults)."""
    return _demo_catalogue_base.copy()


@pytest.fixture
async def sample_server(faults_catalogue: Catalogue) -> AsyncIterator[SampleServer]:
    """A running SampleServer over the faults catalogue, on the test's event loop."""
    async with SampleServer(faults_catalogue) as srv:
        yield srv


@pytest.fixture
def sample_server_thread(faults_catalogue: Catalogue) -> Iterator[SampleServer]:
    """The same server on its own loop in a thread: for sync tests and CLI subprocesses."""
    with serve_in_thread(faults_catalogue) as srv:
        yield srv


@pytest.fixture
def sample_lists(sample_server: SampleServer, tmp_path: Path) -> dict[str, Path]:
    """train/val/test.json for `sample_server` (async tests), in tmp_path/lists."""
    return write_lists(sample_server.catalogue, sample_server, tmp_path / "lists")


@pytest.fixture
def sample_lists_thread(sample_server_thread: SampleServer, tmp_path: Path) -> dict[str, Path]:
    """train/val/test.json for `sample_server_thread` (sync tests), in tmp_path/lists."""
    return write_lists(sample_server_thread.catalogue, sample_server_thread, tmp_path / "lists")


@pytest.fixture
def tmp_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty manifests root; IMAT_ROOT points at it so no test writes to ./manifests."""
    root = tmp_path / "manifests"
    monkeypatch.setenv("IMAT_ROOT", str(root))
    return root


@pytest.fixture
def restore_torch_threads() -> Iterator[None]:
    """Put torch's intra-op thread count back after the test (a run on a CPU device sets it,
    and it is process-wide). Opt in with `pytestmark = pytest.mark.usefixtures(...)`."""
    import torch  # here, not at the top: most test files never load torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)
