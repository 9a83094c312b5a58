"""Docker for the image tests, with no container registry.

The machines that run CI reach Debian's mirror and PyPI but no registry, so the
images the project's Dockerfile and compose file name are made here: a Debian
bookworm root from debootstrap, imported as ``local/debian:bookworm``, and on it
stand-ins tagged with the names the files use (``python:3.11-slim`` is Debian's
python3 in a venv on PATH; ``redis:7.2`` is Debian's redis-server;
``postgres:16`` is Debian's PostgreSQL behind an entrypoint that reads the
official image's variables). Outgoing HTTPS goes through an intercepting proxy,
so the stand-in Python base gets the host's CA certificates: test-time only, the
product's Dockerfile never sees them. Each image is built once per machine and
reused (``docker image inspect`` first); stand-ins carry the label
``stock.standin`` and a real image of the same name is never overwritten.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

DEBIAN = "local/debian:bookworm"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "stock-docker"
ENV = {**os.environ, "DOCKER_BUILDKIT": "0"}  # BuildKit would fetch its frontend from a registry

PYTHON_STANDIN = f"""FROM {DEBIAN}
LABEL stock.standin=1
COPY certs/ /usr/local/share/ca-certificates/
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \\
    ca-certificates && rm -rf /var/lib/apt/lists/* && python3 -m venv /usr/local/python
COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
ENV PATH=/usr/local/python/bin:$PATH PIP_CERT=/etc/ssl/certs/ca-certificates.crt
"""

REDIS_STANDIN = f"""FROM {DEBIAN}
LABEL stock.standin=1
RUN apt-get update && apt-get install -y --no-install-recommends redis-server \\
    && rm -rf /var/lib/apt/lists/* && mkdir /data
WORKDIR /data
COPY entrypoint.sh /entrypoint.sh
ENTRYPOINT ["sh", "/entrypoint.sh"]
CMD ["redis-server"]
"""

# as the official image does when it runs redis-server without a config file
REDIS_ENTRYPOINT = """if [ "$1" = redis-server ]; then set -- "$@" --protected-mode no; fi
exec "$@"
"""

POSTGRES_STANDIN = f"""FROM {DEBIAN}
LABEL stock.standin=1
RUN apt-get update && apt-get install -y --no-install-recommends postgresql-15 \\
    && rm -rf /var/lib/apt/lists/*
ENV PATH=/usr/lib/postgresql/15/bin:$PATH PGDATA=/var/lib/postgresql/data
COPY entrypoint.sh /entrypoint.sh
ENTRYPOINT ["sh", "/entrypoint.sh"]
"""

# the official image's contract, as far as docker-compose.yml uses it
POSTGRES_ENTRYPOINT = """set -e
mkdir -p "$PGDATA" /run/postgresql && chown postgres "$PGDATA" /run/postgresql
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  echo "$POSTGRES_PASSWORD" > /tmp/pw && chown postgres /tmp/pw
  su postgres -c "initdb -U '$POSTGRES_USER' --pwfile=/tmp/pw --auth-host=md5 --auth-local=trust"
  echo "host all all all md5" >> "$PGDATA/pg_hba.conf"
  su postgres -c "pg_ctl -w -o '-c listen_addresses=' start"
  su postgres -c "createdb -U '$POSTGRES_USER' '$POSTGRES_DB'" || true
  su postgres -c "pg_ctl -w -m fast stop"
fi
exec su postgres -c "exec postgres -c listen_addresses='*'"
"""


def docker(
    *args: str, timeout: float = 120, check: bool = True
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout, check=check, env=ENV
    )


def daemon_problem() -> str | None:
    """Why the tests cannot use Docker here, or None when they can."""
    if shutil.which("docker") is None:
        return "no docker client (make ci-deps as root installs docker.io)"
    try:
        done = docker("info", timeout=30, check=False)
    except subprocess.TimeoutExpired:
        return "docker info timed out"
    if done.returncode != 0:
        return f"the Docker daemon is not reachable ({done.stderr.strip()[-200:]})"
    return None


def has_image(name: str) -> bool:
    return docker("image", "inspect", name, check=False).returncode == 0


def debian_mirror() -> str:
    """The Debian mirror apt uses for bookworm (sources.list or deb822 .sources)."""
    files = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in files:
        if not path.is_file():
            continue
        text = path.read_text(errors="replace")
        for line in text.splitlines():
            words = line.split()
            if words[:1] == ["deb"] and "bookworm" in words and "/debian" in line:
                return next(w for w in words[1:] if "://" in w)
        for stanza in text.split("\n\n"):
            fields = dict(
                (k.strip(), v.strip())
                for k, _, v in (x.partition(":") for x in stanza.splitlines())
                if v and not k.startswith("#")
            )
            if "bookworm" in fields.get("Suites", "").split() and "deb" in fields.get("Types", ""):
                return fields["URIs"].split()[0]
    return "http://deb.debian.org/debian"


def ensure_debian() -> float:
    """Import the debootstrap root as ``local/debian:bookworm``; seconds spent."""
    if has_image(DEBIAN):
        return 0.0
    started = time.monotonic()
    CACHE.mkdir(parents=True, exist_ok=True)
    tarball = CACHE / "debian-bookworm.tar"
    if not tarball.exists():
        root = Path(tempfile.mkdtemp(prefix="rootfs-", dir=CACHE))
        subprocess.run(
            ["debootstrap", "--variant=minbase", "bookworm", str(root), debian_mirror()],
            check=True,
            capture_output=True,
            timeout=900,
        )
        subprocess.run(["tar", "-C", str(root), "-cf", f"{tarball}.part", "."], check=True)
        os.replace(f"{tarball}.part", tarball)
        shutil.rmtree(root, ignore_errors=True)
    with tarball.open("rb") as data:
        subprocess.run(
            ["docker", "import", "-", DEBIAN],
            stdin=data,
            check=True,
            capture_output=True,
            timeout=300,
        )
    return time.monotonic() - started


def ensure_standin(name: str, dockerfile: str, files: dict[str, Path | str] | None = None) -> float:
    """Build ``dockerfile`` as ``name`` unless an image of that name exists; seconds spent."""
    if has_image(name):
        return 0.0
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as context:
        (Path(context) / "Dockerfile").write_text(dockerfile)
        for target, source in (files or {}).items():
            path = Path(context) / target
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(source, Path):
                shutil.copy(source, path)
            else:
                path.write_text(source)
        docker("build", "-q", "-t", name, context, timeout=900)
    return time.monotonic() - started


def ensure_python_base() -> float:
    """The stand-in for the Dockerfile's base, with the host's CA certificates."""
    certs: dict[str, Path | str] = {"certs/.keep": ""}
    for cert in Path("/usr/local/share/ca-certificates").glob("*.crt"):
        certs[f"certs/{cert.name}"] = cert
    bundle = Path("/etc/ssl/certs/ca-certificates.crt")
    certs["ca-certificates.crt"] = bundle if bundle.exists() else ""
    return ensure_debian() + ensure_standin("python:3.11-slim", PYTHON_STANDIN, certs)


def ensure_compose_bases() -> float:
    spent = ensure_debian()
    spent += ensure_standin("redis:7.2", REDIS_STANDIN, {"entrypoint.sh": REDIS_ENTRYPOINT})
    spent += ensure_standin("postgres:16", POSTGRES_STANDIN, {"entrypoint.sh": POSTGRES_ENTRYPOINT})
    return spent
