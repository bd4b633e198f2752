# syntax=docker/dockerfile:1
# authgate image: install into a virtualenv in a builder stage, then copy only that
# virtualenv into a clean slim image that runs as an unprivileged numeric user.
#   docker build -t authgate:0.1.0 .        (or: make image; the tag is src/authgate/__init__.py's version)
#   docker run --rm -e AUTHGATE_PEPPER_FILE=... -e AUTHGATE_REDIS_URL=... -p 8080:8080 authgate:0.1.0
# The Kubernetes manifests (deploy/k8s) name this image, authgate:0.1.0; docs/deploy.md says
# how to push it to a registry and point the manifests at it.

# Both stages must use the same Python so the venv's interpreter links stay valid.
# Pin a digest (python:3.12-slim@sha256:...) for reproducible builds.
ARG PYTHON_IMAGE=python:3.12-slim

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# Every dependency ships binary wheels for linux amd64/arm64, so no compiler is needed.
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml constraints.txt README.md LICENSE ./
COPY src ./src
# The versions the suite passed on (constraints.txt, refreshed by `make constraints`),
# with the `grpc` extra, so AUTHGATE_GRPC_LISTEN (Envoy's ext_authz over gRPC) works too.
# pip compiles the bytecode here; at run time the root filesystem is read-only.
RUN pip install -c constraints.txt ".[grpc]"

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="authgate" \
      org.opencontainers.image.description="API-token authorization sidecar for nginx auth_request" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 authgate \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin authgate
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    AUTHGATE_LISTEN=0.0.0.0:8080 \
    AUTHGATE_METRICS_LISTEN=0.0.0.0:9180 \
    AUTHGATE_METRICS_DIR=/tmp/authgate-metrics \
    AUTHGATE_LOG_FORMAT=json
# Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
# 8080 /auth, /ext-authz/..., /healthz, /readyz; 9180 /metrics; 8081 management API
# (only when AUTHGATE_ADMIN_LISTEN is set).
EXPOSE 8080 9180 8081
ENTRYPOINT ["authgate"]
CMD ["serve"]
