"""A real Docker engine for the container tests: a private `dockerd` (its own socket, data
root, exec root and pidfile under a temp dir; no iptables, no bridge, no ip_forward change),
a local base image (no registry is reachable: debootstrap'd once, cached outside the repo),
and the openai SDK for the container's Python, installed on the host once and mounted
read-only. Everything started here is stopped and removed by `Dockerd.stop()`, including
what dockerd leaves outside its own directories.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

CACHE = Path(os.environ.get("EGRESS_GUARD_TEST_CACHE", "/var/cache/egress-guard-tests"))
SUITE = "trixie"  # python3.13, as egress-guard needs >= 3.12
BASE_IMAGE = f"eg-base:{SUITE}"
AGENT_IMAGE = "egress-guard-agent:test"
REPO = Path(__file__).parents[2]
# Paths dockerd writes outside the directories it is given: removed after it stops, unless
# they were there before it started.
STRAYS = [Path(p) for p in ("/run/docker", "/run/containerd/s", "/run/containerd", "/etc/docker/key.json")]


class DockerUnavailable(Exception):
    """No Docker engine can be started here; the message says why."""


def log(message: str) -> None:
    print(f"docker tests: {message}", file=sys.__stderr__, flush=True)


@contextlib.contextmanager
def cache_lock(name: str) -> Iterator[None]:
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f".{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def debian_mirror() -> str:
    """The Debian mirror this machine's apt sources name (deb822 or one-line format)."""
    sources = [*sorted(Path("/etc/apt/sources.list.d").glob("*")), Path("/etc/apt/sources.list")]
    for path in sources:
        with contextlib.suppress(OSError):
            text = path.read_text()
            for url in re.findall(r"^URIs:\s*(\S+)", text, re.M) + re.findall(
                r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)", text, re.M
            ):
                if re.search(r"/debian/?$", url):
                    return url
    return "http://deb.debian.org/debian"


def base_tarball() -> Path:
    """The cached rootfs tarball (debootstrap --variant=minbase, python3), built if missing."""
    tarball = CACHE / f"{SUITE}-minbase-python3.tar.gz"
    with cache_lock(tarball.name):
        if tarball.exists():
            return tarball
        if not shutil.which("debootstrap"):
            raise DockerUnavailable(
                f"{tarball} is missing and debootstrap is not installed (apt-get install debootstrap)"
            )
        mirror = debian_mirror()
        log(f"building {tarball} with debootstrap from {mirror} (about 45 s, once)")
        with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
            root = Path(tmp) / "rootfs"
            started = time.monotonic()
            done = subprocess.run(
                ["debootstrap", "--variant=minbase", "--include=python3,python3-venv", SUITE, str(root), mirror],
                capture_output=True,
                text=True,
            )
            if done.returncode != 0:
                raise DockerUnavailable(f"debootstrap failed: {done.stderr[-500:] or done.stdout[-500:]}")
            for cached in [*root.glob("var/cache/apt/archives/*.deb"), *root.glob("var/lib/apt/lists/*_*")]:
                cached.unlink()  # apt's downloads: half the size, no use in the image
            part = Path(tmp) / "rootfs.tar.gz"
            with open(part, "wb") as out:
                tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
                subprocess.run(["gzip", "-1"], stdin=tar.stdout, stdout=out, check=True)
                assert tar.wait() == 0
            part.replace(tarball)
            log(f"built {tarball} in {time.monotonic() - started:.1f} s")
    return tarball


def agent_site(python: str = "3.13") -> Path:
    """The openai SDK (the host's version) and its dependencies for the container's Python:
    `pip install --target`, cached; mounted read-only with PYTHONPATH."""
    from importlib.metadata import version

    wanted = version("openai")
    machine = platform.machine()
    target = CACHE / f"agent-site-openai-{wanted}-cp{python.replace('.', '')}-{machine}"
    with cache_lock(target.name):
        if (target / "openai").is_dir():
            return target
        log(f"installing openai {wanted} for Python {python} into {target} (once)")
        with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
            done = subprocess.run(
                [sys.executable, "-m", "pip", "install", "-q", "--target", tmp, "--python-version", python,
                 "--implementation", "cp", "--only-binary=:all:", "--platform", f"manylinux2014_{machine}",
                 "--platform", f"manylinux_2_28_{machine}", f"openai=={wanted}"],
                capture_output=True,
                text=True,
            )  # fmt: skip
            if done.returncode != 0:
                raise DockerUnavailable(f"pip could not fetch the openai SDK for the container: {done.stderr[-400:]}")
            os.chmod(tmp, 0o755)
            Path(tmp).rename(target)
            Path(tmp).mkdir()  # TemporaryDirectory removes it
    return target


class Dockerd:
    """A private Docker engine under `root` (keep it short: socket paths are <= 107 bytes)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.socket = root / "docker.sock"
        self.host = f"unix://{self.socket}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.strays = [p for p in STRAYS if not p.exists()]
        self.timings: dict[str, float] = {}

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "DOCKER_HOST": self.host, "DOCKER_BUILDKIT": "0", "DOCKER_CLI_HINTS": "false"}

    def start(self) -> Dockerd:
        if os.geteuid() != 0:
            raise DockerUnavailable("the tests are not running as root (dockerd needs root)")
        if not shutil.which("dockerd") or not shutil.which("docker"):
            raise DockerUnavailable("dockerd/docker not installed (apt-get install docker.io)")
        started = time.monotonic()
        self.log = open(self.root / "dockerd.log", "wb")  # noqa: SIM115 - open while dockerd runs
        self.proc = subprocess.Popen(
            ["dockerd", "--host", self.host, "--data-root", str(self.root / "data"),
             "--exec-root", str(self.root / "exec"), "--pidfile", str(self.root / "dockerd.pid"),
             "--iptables=false", "--ip-forward=false", "--bridge=none", "--log-level=warn"],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while not self.ping():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = (self.root / "dockerd.log").read_text(errors="replace")[-800:]
                self.stop()
                raise DockerUnavailable(f"dockerd did not start: {tail}")
            time.sleep(0.05)
        self.timings["dockerd start"] = time.monotonic() - started
        return self

    def ping(self) -> bool:
        s = socket.socket(socket.AF_UNIX)
        try:
            s.settimeout(1)
            s.connect(str(self.socket))
            s.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            return s.recv(64).startswith(b"HTTP/1.0 200") or False
        except OSError:
            return False
        finally:
            s.close()

    def docker(self, *args: str, check: bool = True, timeout: float = 120, **kw) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(["docker", *args], env=self.env, capture_output=True, text=True, timeout=timeout, **kw)
        if check and done.returncode != 0:
            raise AssertionError(f"docker {' '.join(args[:3])}… failed ({done.returncode}): {done.stderr[-1500:]}")
        return done

    def import_base(self) -> None:
        tarball = base_tarball()
        started = time.monotonic()
        with open(tarball, "rb") as fh:
            self.docker("import", "-", BASE_IMAGE, stdin=fh)
        self.timings["base image import"] = time.monotonic() - started

    def build_agent_image(self) -> None:
        started = time.monotonic()
        self.docker(
            "build", "-q", "--build-arg", f"BASE={BASE_IMAGE}", "-t", AGENT_IMAGE, str(REPO / "containers" / "agent")
        )
        self.timings["agent image build"] = time.monotonic() - started

    def pid(self, container: str) -> int:
        return int(self.docker("inspect", "-f", "{{.State.Pid}}", container).stdout.strip())

    def state(self, container: str) -> dict:
        return json.loads(self.docker("inspect", "-f", "{{json .State}}", container).stdout)

    def stop(self) -> None:
        """Remove every container, stop dockerd (SIGTERM, then SIGKILL), unmount what it left
        mounted, remove its directories and the strays it wrote outside them."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(Exception):
                ids = self.docker("ps", "-aq", check=False, timeout=20).stdout.split()
                if ids:
                    self.docker("rm", "-f", *ids, check=False, timeout=30)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        # containerd and its shims were started by dockerd (the same session): make sure
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if self.proc is not None:
                os.killpg(self.proc.pid, signal.SIGKILL)
        if getattr(self, "log", None):
            self.log.close()
        for mount in reversed(mounts_under(self.root)):
            subprocess.run(["umount", "-l", mount], capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)
        for path in self.strays:
            with contextlib.suppress(OSError):
                shutil.rmtree(path) if path.is_dir() else path.unlink()


def mounts_under(root: Path) -> list[str]:
    prefix = str(root.resolve()) + "/"
    with open("/proc/self/mounts") as fh:
        points = [line.split()[1].replace("\\040", " ") for line in fh]
    return [p for p in points if p.startswith(prefix)]


def wheelhouse() -> Path:
    """Wheels of egress-guard's dependencies (and setuptools, to build it) for the image's
    Python: the image is built with `--no-index` (no registry is reachable from the engine).
    Fetched once per dependency list, cached."""
    import hashlib
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    wanted = [*project["project"]["dependencies"], *project["build-system"]["requires"]]
    digest = hashlib.sha256("\n".join(wanted).encode()).hexdigest()[:12]
    target = CACHE / f"wheelhouse-cp{sys.version_info.major}{sys.version_info.minor}-{digest}"
    with cache_lock(target.name):
        if target.is_dir():
            return target
        log(f"fetching egress-guard's dependency wheels into {target} (once)")
        with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
            done = subprocess.run(
                [sys.executable, "-m", "pip", "wheel", "-q", "-w", tmp, *wanted], capture_output=True, text=True
            )
            if done.returncode != 0:
                raise DockerUnavailable(f"pip could not fetch egress-guard's dependencies: {done.stderr[-400:]}")
            os.chmod(tmp, 0o755)
            Path(tmp).rename(target)
            Path(tmp).mkdir()
    return target


def egress_guard_context(directory: Path) -> Path:
    """A build context for containers/Dockerfile: the sources (as the repository's
    .dockerignore leaves them) plus the wheelhouse in containers/wheelhouse."""
    directory.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "wheelhouse")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, directory / name)
    for name in ("proxy", "addons", "allowlists", "containers"):
        shutil.copytree(REPO / name, directory / name, ignore=ignore)
    shutil.copytree(wheelhouse(), directory / "containers" / "wheelhouse")
    return directory
