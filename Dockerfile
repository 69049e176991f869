# syntax=docker/dockerfile:1.7
# The Foresight image: one binary (`foresight`), run as a non-root user, with CA certificates and
# nothing else. Build from the repository root:
#   docker build -t foresight:local .
# Dependencies are cached between builds by BuildKit cache mounts (the cargo registry and the
# target directory), so a source change rebuilds only Foresight's own crates.

FROM rust:1.88-slim-bookworm AS builder
# librdkafka is built from source by rdkafka-sys: it needs a C toolchain, make and zlib.
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential cmake pkg-config zlib1g-dev python3 \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /build
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/build/target \
    cargo build --release --locked --bin foresight \
    && cp target/release/foresight /usr/local/bin/foresight

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 foresight \
    && useradd --system --uid 10001 --gid foresight --no-create-home --shell /usr/sbin/nologin foresight
COPY --from=builder /usr/local/bin/foresight /usr/local/bin/foresight
COPY examples/foresight.toml /etc/foresight/foresight.toml
COPY examples/policies /etc/foresight/policies
USER 10001:10001
# /healthz, /readyz and /metrics (observability.listen).
EXPOSE 9464
ENV FORESIGHT_CONFIG=/etc/foresight/foresight.toml \
    FORESIGHT_OBSERVABILITY__LISTEN=0.0.0.0:9464
ENTRYPOINT ["/usr/local/bin/foresight", "--log-format", "json"]
CMD ["run", "all"]
