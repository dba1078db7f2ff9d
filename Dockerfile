# podproxy: the static musl binary in a scratch image (measured size in docs/containers.md).
# The default config is embedded; mount a file and pass `--config` to change it.
#
# Build from source (any machine with Docker or podman and registry access):
#   docker build --build-arg PODPROXY_GIT_COMMIT=$(git rev-parse --short=12 HEAD) -t podproxy .
# Build from a static binary you already built (offline; this is what CI does):
#   cargo build --release --locked --target x86_64-unknown-linux-musl --bin podproxy
#   podman build --build-arg PODPROXY_BINARY=prebuilt -t podproxy .
# Run (see docs/containers.md):
#   docker run --rm -p 8080:8080 -p 5050:5050 -e MLNODE_URL=http://mlnode:8080 podproxy

# `build` compiles in the builder stage below; `prebuilt` takes
# target/x86_64-unknown-linux-musl/release/podproxy from the build context. Either way the
# one final stage at the bottom is the image. BuildKit (Docker's default builder since 23.0)
# and podman skip the stage not selected; Docker's legacy builder would run both.
ARG PODPROXY_BINARY=build

FROM docker.io/library/rust:1.95-bookworm AS build
# ring's build for the musl target needs a musl C compiler (x86_64-linux-musl-gcc); the
# official rust images have none.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends musl-tools \
 && rm -rf /var/lib/apt/lists/* \
 && rustup target add x86_64-unknown-linux-musl
WORKDIR /src
COPY . .
ARG PODPROXY_GIT_COMMIT=unknown
ENV PODPROXY_GIT_COMMIT=${PODPROXY_GIT_COMMIT}
RUN cargo build --release --locked --target x86_64-unknown-linux-musl --bin podproxy \
 && mkdir /out && cp target/x86_64-unknown-linux-musl/release/podproxy /out/podproxy \
 && /out/podproxy --version && /out/podproxy check >/dev/null

FROM scratch AS prebuilt
COPY target/x86_64-unknown-linux-musl/release/podproxy /out/podproxy

FROM ${PODPROXY_BINARY} AS binary

FROM scratch
ARG PODPROXY_GIT_COMMIT=unknown
LABEL org.opencontainers.image.title="podproxy" \
      org.opencontainers.image.description="Streaming reverse proxy for Gonka ML nodes (replaces the nginx in front of mlnode and vLLM)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.revision="${PODPROXY_GIT_COMMIT}"
COPY --from=binary /out/podproxy /podproxy
COPY LICENSE /LICENSE
# No /etc/passwd needed: a numeric uid. Ports above 1024, so no capabilities either.
USER 65532:65532
EXPOSE 8080 5050
ENTRYPOINT ["/podproxy"]
CMD ["run"]
