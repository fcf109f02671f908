# syntax=docker/dockerfile:1
#
# nexus-analytics container image.
#
#   docker build -t nexus-analytics .          (context: the repository root)
#
# Stages
#   chef     Rust toolchain + the C toolchain that rdkafka-sys needs to build the
#            bundled librdkafka (./configure && make: make, gcc/g++, pkg-config,
#            OpenSSL and zlib headers), plus cargo-chef.
#   planner  computes recipe.json: the dependency graph without our sources.
#   builder  `cargo chef cook` builds every dependency (librdkafka included) in a
#            layer that is reused as long as Cargo.toml/Cargo.lock do not change;
#            then the real sources are copied and only our crate is compiled.
#   runtime  distroless cc-debian12 (glibc, libgcc, libssl3, CA certificates,
#            tzdata; no shell, no package manager) + libz.so.1 + the binary,
#            running as the numeric non-root UID 65532.
#
# Expected size: about 45 MB uncompressed (~18 MB compressed): distroless cc is
# ~23 MB, the release binary ~20 MB (it keeps line tables for backtraces:
# profile.release debug = "line-tables-only"), libz 120 kB. The builder stages
# (~2.5 GB with target/) never reach the runtime image.
#
# Base images: each is one ARG holding a full reference. Release builds pin it by
# digest, `tag@sha256:...` (then the digest alone decides what is pulled and the tag
# only documents it). One plain ${X_IMAGE} per FROM, because skaffold parses FROM
# lines itself (ONBUILD check, `skaffold dev`) and leaves a ${X:+...} literal:
#
#   docker buildx imagetools inspect rust:1.95-slim-bookworm --format '{{json .Manifest.Digest}}'
#   docker buildx imagetools inspect gcr.io/distroless/cc-debian12:nonroot --format '{{json .Manifest.Digest}}'
#   docker build --build-arg RUST_IMAGE=docker.io/library/rust:1.95-slim-bookworm@sha256:... \
#     --build-arg RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot@sha256:... \
#     --build-arg REVISION="$(git rev-parse HEAD)" -t nexus-analytics:0.1.0 .
#
# To bump: resolve the new tag's digest as above (the multi-arch index digest),
# change the tag and the digest together, rebuild, rerun scripts/validate-k8s
# (docs/kubernetes.md, "Image").
ARG RUST_IMAGE=docker.io/library/rust:1.95-slim-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM ${RUST_IMAGE} AS chef
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Unpinned apt versions on purpose, see .hadolint.yaml (DL3008).
RUN apt-get update \
 && apt-get install -y --no-install-recommends g++ make pkg-config libssl-dev zlib1g-dev \
 && rm -rf /var/lib/apt/lists/*
RUN cargo install cargo-chef --version 0.1.78 --locked \
 && rm -rf "${CARGO_HOME}/registry"
WORKDIR /app

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# The crate uses no compile-time-checked sqlx query macros; SQLX_OFFLINE keeps any
# that get added from reaching for a database at build time.
ENV SQLX_OFFLINE=true \
    CARGO_TERM_COLOR=never
COPY --from=planner /app/recipe.json recipe.json
RUN cargo chef cook --release --locked --recipe-path recipe.json
COPY . .
RUN cargo build --release --locked --bin nexus-analytics \
 && install -D -m 0755 target/release/nexus-analytics /out/usr/local/bin/nexus-analytics \
 && multiarch="$(gcc -print-multiarch)" \
 && install -D -m 0644 "/usr/lib/${multiarch}/libz.so.1" "/out/usr/lib/${multiarch}/libz.so.1"
# Fail the build if the binary links a shared library that the runtime image
# does not provide (distroless cc: glibc, libgcc_s, libstdc++, libssl3; plus
# the libz copied above).
RUN unexpected="$(ldd /out/usr/local/bin/nexus-analytics \
      | awk '{print $1}' \
      | grep -Ev '^(linux-vdso\.so\.1|/lib(64)?/ld-linux.*|ld-linux.*|libc\.so\.6|libm\.so\.6|libdl\.so\.2|libpthread\.so\.0|librt\.so\.1|libgcc_s\.so\.1|libstdc\+\+\.so\.6|libssl\.so\.3|libcrypto\.so\.3|libz\.so\.1)$' \
      || true)" \
 && if [ -n "${unexpected}" ]; then echo "unexpected shared libraries: ${unexpected}" >&2; exit 1; fi

FROM ${RUNTIME_IMAGE} AS runtime
ARG RUNTIME_IMAGE
# OCI annotations (https://github.com/opencontainers/image-spec/blob/main/annotations.md).
# version defaults to Cargo.toml's; CI passes REVISION (git commit) and CREATED (RFC 3339).
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
ARG SOURCE=https://github.com/nexuscore/nexus-analytics
LABEL org.opencontainers.image.title="nexus-analytics" \
      org.opencontainers.image.description="Kafka -> PostgreSQL event analytics consumer" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.url="${SOURCE}" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.base.name="${RUNTIME_IMAGE}"
COPY --from=builder /out/ /
USER 65532:65532
EXPOSE 9090
ENTRYPOINT ["/usr/local/bin/nexus-analytics"]
CMD ["run"]
