"""Images for containers/fleet.compose.yaml on the private Docker engine of docker_support:
a Debian bookworm base with PostgreSQL 15 (debootstrap'd once, cached outside the repo, as
no registry is reachable here) for containers/postgres/, and the egress-guard image built
offline from the wheelhouse, tagged as the compose file names them.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from docker_support import BASE_IMAGE, CACHE, REPO, Dockerd, DockerUnavailable, cache_lock, debian_mirror, log

PG_SUITE = "bookworm"
PG_BASE_IMAGE = f"eg-pg-base:{PG_SUITE}"


def pg_base_tarball() -> Path:
    """The cached rootfs tarball: debootstrap --variant=minbase bookworm with postgresql-15."""
    tarball = CACHE / f"{PG_SUITE}-minbase-postgresql15.tar.gz"
    with cache_lock(tarball.name):
        if tarball.exists():
            return tarball
        if not shutil.which("debootstrap"):
            raise DockerUnavailable(
                f"{tarball} is missing and debootstrap is not installed (apt-get install debootstrap)"
            )
        mirror = debian_mirror()
        log(f"building {tarball} with debootstrap from {mirror} (about a minute, once)")
        with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
            root = Path(tmp) / "rootfs"
            started = time.monotonic()
            done = subprocess.run(
                ["debootstrap", "--variant=minbase", "--include=postgresql-15", PG_SUITE, str(root), mirror],
                capture_output=True,
                text=True,
            )
            if done.returncode != 0:
                raise DockerUnavailable(f"debootstrap failed: {done.stderr[-500:] or done.stdout[-500:]}")
            for cached in [*root.glob("var/cache/apt/archives/*.deb"), *root.glob("var/lib/apt/lists/*_*")]:
                cached.unlink()
            shutil.rmtree(root / "var/lib/postgresql/15", ignore_errors=True)  # the package's own cluster
            shutil.rmtree(root / "etc/postgresql/15", ignore_errors=True)
            part = Path(tmp) / "rootfs.tar.gz"
            with open(part, "wb") as out:
                tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
                subprocess.run(["gzip", "-1"], stdin=tar.stdout, stdout=out, check=True)
                assert tar.wait() == 0
            part.replace(tarball)
            log(f"built {tarball} in {time.monotonic() - started:.1f} s")
    return tarball


def build_images(engine: Dockerd, work: Path) -> None:
    """The images fleet.compose.yaml names: egress-guard (containers/Dockerfile, offline from
    the wheelhouse, on the local trixie base), egress-guard-postgres (containers/postgres/ on
    the cached bookworm + postgresql-15 base) and egress-guard-agent (docker_support's)."""
    from docker_support import AGENT_IMAGE, egress_guard_context

    started = time.monotonic()
    with open(pg_base_tarball(), "rb") as fh:
        engine.docker("import", "-", PG_BASE_IMAGE, stdin=fh)
    engine.docker(
        "build", "-q", "--build-arg", f"BASE={PG_BASE_IMAGE}", "-t", "egress-guard-postgres",
        str(REPO / "containers" / "postgres"), timeout=300,
    )  # fmt: skip
    engine.timings["postgres image (import + build)"] = time.monotonic() - started
    started = time.monotonic()
    context = egress_guard_context(work / "context")
    try:
        engine.docker(
            "build", "-q", "--build-arg", f"BASE={BASE_IMAGE}",
            "--build-arg", "PIP_ARGS=--no-index --find-links /src/containers/wheelhouse",
            "-f", str(context / "containers" / "Dockerfile"), "-t", "egress-guard", str(context), timeout=300,
        )  # fmt: skip
    finally:
        shutil.rmtree(context)
    engine.docker("tag", AGENT_IMAGE, "egress-guard-agent")
    engine.timings["egress-guard image build"] = time.monotonic() - started


def kubernetes_pod(
    engine: Dockerd,
    manifest: list[dict],
    work: Path,
    *,
    name: str,
    networks: list[str],
    hosts: dict[str, str],
    secrets: dict[str, dict[str, bytes]],
    config_patch: dict,
    extra: tuple[str, ...] = (),
) -> str:
    """One pod of docs/kubernetes.yaml's Deployment as a container on `engine`, taken from the
    manifest as written: its command, env (fieldRef metadata.name = `name`), envFrom Secrets,
    volumes (a ConfigMap's and Secrets' files as Kubernetes mounts them: symlinks into ..data;
    emptyDir: tmpfs) and securityContext (user, read-only root, no capabilities). `secrets`
    holds the Secrets' contents (the manifest's are placeholders); `config_patch` is merged
    into the ConfigMap's egress-guard.yaml (the test's upstream, agents); `extra`: more
    `docker create` options (the test upstream's CA). Returns its id."""
    import yaml

    kinds = {d["kind"]: d for d in manifest if d}
    configmap = kinds["ConfigMap"]
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    security = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
    args = ["create", "--name", name, "--hostname", name, "--network", networks[0]]
    args += ["--user", f"{security['runAsUser']}:{security.get('runAsGroup', security['runAsUser'])}"]
    if security.get("readOnlyRootFilesystem"):
        args.append("--read-only")
    if "ALL" in security.get("capabilities", {}).get("drop", []):
        args += ["--cap-drop", "ALL"]
    if security.get("allowPrivilegeEscalation") is False:
        args += ["--security-opt", "no-new-privileges:true"]
    for host, address in hosts.items():
        args += ["--add-host", f"{host}:{address}"]
    for var in container.get("env", []):
        if "value" in var:
            args += ["-e", f"{var['name']}={var['value']}"]
        else:
            assert var["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name", var
            args += ["-e", f"{var['name']}={name}"]
    for source in container.get("envFrom", []):
        for key, value in secrets[source["secretRef"]["name"]].items():
            args += ["-e", f"{key}={value.decode()}"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    for mount in container["volumeMounts"]:
        volume = volumes[mount["name"]]
        if "emptyDir" in volume:
            args += ["--tmpfs", f"{mount['mountPath']}:uid={security['runAsUser']},gid={security.get('fsGroup', 0)}"]
            continue
        if "configMap" in volume:
            assert volume["configMap"]["name"] == configmap["metadata"]["name"]
            files = {}
            for key, text in configmap["data"].items():
                config = yaml.safe_load(text)
                config.update(config_patch)
                files[key] = yaml.safe_dump(config).encode()
        else:
            files = secrets[volume["secret"]["secretName"]]
        directory = work / mount["name"]
        (directory / "..data").mkdir(parents=True)
        for key, data in files.items():
            (directory / "..data" / key).write_bytes(data)
            (directory / "..data" / key).chmod(0o644)  # 0440 with the pod's fsGroup, in Kubernetes
            (directory / key).symlink_to(f"..data/{key}")
        directory.chmod(0o755)
        (directory / "..data").chmod(0o755)
        args += ["-v", f"{directory}:{mount['mountPath']}:ro"]
    ports = [p["containerPort"] for p in container.get("ports", [])]
    assert ports, container
    container_id = engine.docker(*args, *extra, "egress-guard", *container["command"]).stdout.strip()
    for network in networks[1:]:
        engine.docker("network", "connect", network, container_id)
    engine.docker("start", container_id)
    return container_id
