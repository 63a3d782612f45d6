# syntax=docker/dockerfile:1
# mes-trace-proxy image: a venv built in one stage, copied alone into a slim runtime that
# runs as uid 10001 and writes only to /var/lib/mes-trace-proxy (read-only root works).
# Build:  docker build -t mes-trace-proxy:dev .
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
# A C compiler for the native build (mypyc compiles the hot path; docs/performance.md). Only
# this stage has it: the runtime gets the built extensions, which need nothing but libc.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
# /opt/build holds pip, setuptools, mypy and the dependencies for compiling; /opt/venv, the
# only thing the runtime gets, is made without pip: the build venv's pip installs into it, so
# pip and setuptools (23 MB that serve nothing at run time) never land there.
RUN python -m venv --without-pip /opt/venv && python -m venv /opt/build
ENV PATH=/opt/venv/bin:$PATH
# Where the build must trust a TLS-inspecting proxy's CA (scripts/image-test mounts the host's
# CA directory and names its bundle here); unset, pip uses its own bundle.
ARG PIP_CERT
WORKDIR /src
# constraints.txt pins every dependency, so two builds of one commit get the same versions.
COPY constraints.txt pyproject.toml setup.py README.md ./
COPY mes_trace_proxy ./mes_trace_proxy
# mypyc type-checks what it compiles, so the wheel is built in a venv that holds the
# dependencies and mypy (/opt/build, left behind); the runtime venv gets the wheel alone.
RUN MES_TRACE_PROXY_PURE_PYTHON=1 /opt/build/bin/pip install -c constraints.txt . mypy "setuptools>=77" wheel \
    && /opt/build/bin/pip wheel --no-build-isolation --no-deps --wheel-dir /wheels . \
    && /opt/build/bin/python -c "import sys, zipfile, glob; names = zipfile.ZipFile(glob.glob('/wheels/*.whl')[0]).namelist(); sys.exit(0 if any(n.endswith('.so') for n in names) else 'the wheel holds no native build')"
# pip runs under /opt/venv's python (--python) and byte-compiles there, so the read-only
# runtime never needs to write .pyc. The check runs isolated (-I) from /: run in /src, a plain
# `python -c` would import the source tree beside it instead of the installed wheel.
RUN /opt/build/bin/pip --python /opt/venv/bin/python install -c constraints.txt /wheels/mes_trace_proxy-*.whl \
    && cd / && /opt/venv/bin/python -I -c "from mes_trace_proxy import native; b = native.current(); print(b.reason); assert b.active, b.reason" \
    && ! /opt/venv/bin/python -I -c "import pip" 2>/dev/null

FROM ${PYTHON_IMAGE} AS runtime
ARG PYTHON_IMAGE
ARG VERSION=0.0.0-dev
ARG REVISION=unknown
LABEL org.opencontainers.image.title="mes-trace-proxy" \
      org.opencontainers.image.description="Tracing sidecar reverse proxy for a MES API: order-aware OpenTelemetry spans and a stuck-order watchdog" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="LicenseRef-Proprietary" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# uid/gid 10001: above every distribution's system range, and what k8s/base pins in
# runAsUser, so the image and the manifests agree without a name lookup.
# Not --system: 10001 is above SYS_UID_MAX on purpose, and --system would warn about it.
RUN groupadd --gid 10001 mesproxy \
    && useradd --uid 10001 --gid 10001 --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin mesproxy \
    && mkdir -p /var/lib/mes-trace-proxy \
    && chown 10001:10001 /var/lib/mes-trace-proxy
COPY --from=builder /opt/venv /opt/venv
# The default state URL (sqlite:///./mes-trace-proxy-orders.db) is relative to the working
# directory, so it lands in the volume, the only writable path.
WORKDIR /var/lib/mes-trace-proxy
VOLUME ["/var/lib/mes-trace-proxy"]
USER 10001:10001
# 8080 ingress, 8090 egress, 9901 admin (health, metrics, orders page).
EXPOSE 8080 8090 9901
STOPSIGNAL SIGTERM
# Exec form with the venv's python: needs no shell or curl. It probes the admin listener's
# default port 9901 on loopback, which answers whether admin binds 127.0.0.1 or 0.0.0.0;
# a different admin port needs a matching --health-cmd at run time.
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9901/healthz', timeout=2)"]
ENTRYPOINT ["mes-trace-proxy"]
CMD ["serve"]
