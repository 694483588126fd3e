# hokusai-deployer: one image for the worker (`run`, the default) and the API (`api`).
#
# Build:  docker build --build-arg HOKUSAI_GIT_REVISION=$(git rev-parse --short=12 HEAD) -t hokusai-deployer .
#         (add --build-arg CARGO_FEATURES=aws-kms for deployer keys in AWS KMS)
# Worker: docker run hokusai-deployer            (ops server on 9091)
# API:    docker run hokusai-deployer api        (API and health on 3001)
# The runtime image is `scratch`: the binary, the C libraries it links and the CA bundle,
# nothing else (no shell); it runs as an unprivileged numeric user and handles SIGTERM itself.

ARG RUST_VERSION=1.95.0

FROM docker.io/library/rust:${RUST_VERSION}-slim-bookworm AS builder
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /src

# Optional features, e.g. --build-arg CARGO_FEATURES=aws-kms for deployer keys in AWS KMS.
ARG CARGO_FEATURES=""
# Dependencies first, in a layer that changes only with Cargo.toml and Cargo.lock.
COPY Cargo.toml Cargo.lock build.rs ./
RUN mkdir -p src benches \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && for b in health throughput api; do echo 'fn main() {}' > "benches/$b.rs"; done \
    && cargo build --release --locked --features "${CARGO_FEATURES}" --bin hokusai-deployer \
    && rm -rf src benches

COPY abi abi
COPY config config
COPY tests/data tests/data
COPY benches benches
COPY src src
ARG HOKUSAI_GIT_REVISION=unknown
ENV HOKUSAI_GIT_REVISION=${HOKUSAI_GIT_REVISION}
# The runtime tree: the binary, every shared library it links (found by ldd, so any
# architecture works), the CA bundle for HTTPS RPC and MLflow URLs.
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked --features "${CARGO_FEATURES}" --bin hokusai-deployer \
    && mkdir -p /rootfs/usr/local/bin /rootfs/etc/ssl/certs /rootfs/tmp \
    && cp target/release/hokusai-deployer /rootfs/usr/local/bin/ \
    && ldd target/release/hokusai-deployer | grep -o '/[^ ]*' | xargs -I{} cp --parents -L {} /rootfs \
    && cp /etc/ssl/certs/ca-certificates.crt /rootfs/etc/ssl/certs/ \
    && chmod 1777 /rootfs/tmp

FROM scratch
COPY --from=builder /rootfs /
ENV HOKUSAI__LOG__FORMAT=json
USER 10001:10001
EXPOSE 3001 9091
# Runs the binary itself: GET /health on the ops port or the API port.
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
    CMD ["/usr/local/bin/hokusai-deployer", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/hokusai-deployer"]
CMD ["run"]
