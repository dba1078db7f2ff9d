# podproxy: static musl binary in a scratch image (~4 MB). The default config is embedded;
# mount a file and pass `--config` to change it.
#   docker build --build-arg PODPROXY_GIT_COMMIT=$(git rev-parse --short=12 HEAD) -t podproxy .
#   docker run --rm -p 8080:8080 -p 5000:5000 -e MLNODE_URL=http://mlnode:8080 podproxy

FROM rust:1.95-bookworm AS build
RUN rustup target add x86_64-unknown-linux-musl
WORKDIR /src
COPY . .
ARG PODPROXY_GIT_COMMIT=unknown
ENV PODPROXY_GIT_COMMIT=${PODPROXY_GIT_COMMIT}
RUN cargo build --release --locked --target x86_64-unknown-linux-musl --bin podproxy \
 && cp target/x86_64-unknown-linux-musl/release/podproxy /podproxy \
 && /podproxy --version && /podproxy check >/dev/null

FROM scratch
ARG PODPROXY_GIT_COMMIT=unknown
LABEL org.opencontainers.image.title="podproxy" \
      org.opencontainers.image.description="Streaming reverse proxy for Gonka ML nodes (replaces the nginx in front of mlnode and vLLM)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.revision="${PODPROXY_GIT_COMMIT}"
COPY --from=build /podproxy /podproxy
# No /etc/passwd needed: a numeric uid. Ports above 1024, so no capabilities either.
USER 65532:65532
EXPOSE 8080 5000
ENTRYPOINT ["/podproxy"]
CMD ["run"]
