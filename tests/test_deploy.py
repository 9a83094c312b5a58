"""What can be checked of the deployment files without a Docker engine."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from stock.core.config import Settings

ROOT = Path(__file__).resolve().parent.parent


def compose() -> dict:  # type: ignore[type-arg]
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_sets_only_known_settings() -> None:
    known = set(Settings.variables())
    seen: set[str] = set()
    for name, service in compose()["services"].items():
        env = service.get("environment") or {}
        for variable in env:
            if variable.startswith("STOCK_"):
                assert variable in known, f"{name} sets unknown {variable}"
                seen.add(variable)
    assert {"STOCK_REDIS_URL", "STOCK_REDIS_CLUSTER", "STOCK_DATABASE_URL"} <= seen


def test_compose_has_the_promised_shape() -> None:
    services = compose()["services"]
    redis_nodes = [s for s in services.values() if "--cluster-enabled yes" in str(s.get("command"))]
    assert len(redis_nodes) == 6  # 3 masters + 3 replicas
    assert "--cluster-replicas 1" in str(services["redis-cluster-init"]["command"])
    assert services["migrate"]["command"] == ["migrate"]
    assert services["api"]["deploy"]["replicas"] == 2
    assert services["api"]["environment"]["STOCK_REDIS_CLUSTER"] == "1"


def test_dockerfile_runs_stock_serve_as_non_root() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert text.count("FROM ") >= 2  # multi-stage
    assert "\nUSER 10001\n" in text
    assert 'ENTRYPOINT ["stock"]' in text and 'CMD ["serve"]' in text
    assert "HEALTHCHECK" in text and "/healthz" in text


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint not installed")
def test_hadolint_is_clean() -> None:
    done = subprocess.run(["hadolint", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_wheel_ships_lua_and_migrations(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp_path)]
    subprocess.run([*command, str(ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("stock-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    lua = {p.name for p in (ROOT / "lua").glob("*.lua")}
    assert {f"stock/lua/{name}" for name in lua} <= names
    assert "persist/migrations/0001_init.sql" in names
    assert {f"stock/static/console.{ext}" for ext in ("html", "js", "css")} <= names


def test_compose_ships_no_default_admin_token() -> None:
    """The admin token must be set by whoever runs the stack: a default is public."""
    for name, service in compose()["services"].items():
        token = (service.get("environment") or {}).get("STOCK_ADMIN_TOKEN")
        if token is not None:
            assert str(token).startswith("${STOCK_ADMIN_TOKEN:?"), f"{name}: {token!r}"
