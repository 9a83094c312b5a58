# syntax=docker/dockerfile:1
# Build: docker build -t stock .
# Run:   docker run -e STOCK_REDIS_URL=redis://redis:6379/0 \
#          -e STOCK_DATABASE_URL=postgresql://stock:stock@postgres/stock -p 8080:8080 stock
# Every setting is a STOCK_* environment variable (docs/configuration.md).

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY stock ./stock
COPY persist ./persist
COPY lua ./lua
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin stock
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER 10001
ENV STOCK_HOST=0.0.0.0 \
    STOCK_PORT=8080 \
    PYTHONUNBUFFERED=1
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('STOCK_PORT', '8080') + '/healthz', timeout=2)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["stock"]
CMD ["serve"]
