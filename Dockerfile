# syntax=docker/dockerfile:1
# The `bridge` binary in a small runtime image. Every component (stages,
# relay, settlement runner, notifier, API, simulator) is this one image with
# a different command.

FROM rust:1.95-bookworm AS build
# librdkafka is built from source by rdkafka-sys (Debian's is too old),
# against Debian's OpenSSL (TLS, SASL/SCRAM) and libcurl (OAUTHBEARER/OIDC),
# so their security fixes arrive with the base image's updates.
RUN apt-get update \
    && apt-get install -y --no-install-recommends cmake build-essential python3 pkg-config \
       libssl-dev libcurl4-openssl-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# Queries are checked at run time, so the build needs no database.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p bridge \
    && cp target/release/bridge /usr/local/bin/bridge

FROM debian:bookworm-slim
# libssl3 and libcurl4: what the binary links; ca-certificates: the trust
# store a Kafka or registry with a public CA is verified against.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl libcurl4 libssl3 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin bridge
COPY --from=build /usr/local/bin/bridge /usr/local/bin/bridge
COPY schemas /usr/share/bridge/schemas
USER 10001
ENTRYPOINT ["/usr/local/bin/bridge"]
CMD ["--help"]
