"""Shared fixtures: real mosquitto / InfluxDB 1.x / VictoriaMetrics servers started once per session."""

from __future__ import annotations

import shutil
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

# `tests.servers` must import the same way under pytest as from bench scripts (repo root on sys.path).
_REPO_ROOT = Path(__file__).resolve().parent.parent
if str(_REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(_REPO_ROOT))

from tests.servers import InfluxDB1, Mosquitto, VictoriaMetrics  # noqa: E402

_INTEGRATION_DIR = Path(__file__).resolve().parent / "integration"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _INTEGRATION_DIR in item.path.resolve().parents:
            item.add_marker(pytest.mark.integration)


def require_binary(name: str) -> None:
    """Fail (not skip) when a server binary is missing: the project's setup is expected to install it."""
    if shutil.which(name) is None and not any((Path(d) / name).exists() for d in ("/usr/sbin", "/usr/bin")):
        pytest.fail(
            f"{name!r} is not installed; the integration tests need the real server "
            "(Debian packages mosquitto, mosquitto-clients, influxdb, victoria-metrics)",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    require_binary("mosquitto")
    with Mosquitto(tmp_path_factory.mktemp("mosquitto")) as broker:
        yield broker


@pytest.fixture(scope="session")
def influxdb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InfluxDB1]:
    require_binary("influxd")
    with InfluxDB1(tmp_path_factory.mktemp("influxdb")) as server:
        yield server


@pytest.fixture(scope="session")
def victoria(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VictoriaMetrics]:
    require_binary("victoria-metrics")
    with VictoriaMetrics(tmp_path_factory.mktemp("victoria")) as server:
        yield server


@pytest.fixture
def influx_db(influxdb: InfluxDB1) -> Iterator[tuple[InfluxDB1, str]]:
    """A fresh, uniquely named database on the session InfluxDB, dropped afterwards."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    influxdb.create_database(name)
    yield influxdb, name
    if influxdb.running:
        influxdb.drop_database(name)
