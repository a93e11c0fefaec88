# asyncserve in a small image: python slim, two stages, a non-root user (docs/deploy.md).
#
#   docker build -t asyncserve .
#   docker run --rm -p 8000:8000 -e ASYNCSERVE_INSECURE=true asyncserve
#
# The image serves deploy/example/service.py as /app/service.py; serve your own service by building
# FROM this image, copying your module into /app and setting CMD ["serve", "yourmodule:service"].
# Liveness: GET /v2/health/live (the HEALTHCHECK below). Readiness, for a load balancer or Kubernetes:
# GET /v2/health/ready, 200 once every model is loaded and warm, 503 while loading and once SIGTERM
# has begun the drain.
ARG PYTHON_VERSION=3.12

FROM python:${PYTHON_VERSION}-slim AS build
# The extras the server needs in production: Redis (jobs, cache), PostgreSQL (prediction log),
# aiohttp (HTTP feature sources), OpenTelemetry (tracing when an OTLP endpoint is set).
ARG EXTRAS=redis,postgres,http,otel
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/asyncserve
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN /opt/asyncserve/bin/pip install "./[${EXTRAS}]" \
 && find /opt/asyncserve -name '__pycache__' -prune -exec rm -rf {} +

FROM python:${PYTHON_VERSION}-slim
RUN useradd --system --uid 10001 --user-group --home-dir /app --shell /usr/sbin/nologin asyncserve \
 && install -d -o asyncserve -g asyncserve /app /var/lib/asyncserve
COPY --from=build /opt/asyncserve /opt/asyncserve
COPY --chown=asyncserve:asyncserve deploy/example/service.py /app/service.py
WORKDIR /app
# Listen beyond loopback (which then needs API keys, or ASYNCSERVE_INSECURE=true on a trusted network);
# keep what the server writes under /var/lib/asyncserve (a volume in production); log JSON lines.
ENV PATH=/opt/asyncserve/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    ASYNCSERVE_HOST=0.0.0.0 \
    ASYNCSERVE_PORT=8000 \
    ASYNCSERVE_LOG_FORMAT=json \
    ASYNCSERVE_JOBS=sqlite:///var/lib/asyncserve/jobs.db \
    ASYNCSERVE_PREDICTION_LOG_SPILL=/var/lib/asyncserve/predlog-spill.jsonl
USER 10001:10001
EXPOSE 8000
# SIGTERM drains: readiness turns 503, in-flight requests finish within ASYNCSERVE_GRACE_PERIOD_S.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/v2/health/live' % os.environ.get('ASYNCSERVE_PORT', '8000'), timeout=2)"]
ENTRYPOINT ["asyncserve"]
CMD ["serve", "service:service"]
