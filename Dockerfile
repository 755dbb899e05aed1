# syntax=docker/dockerfile:1
# mcpgate: ext_authz + ext_proc (gRPC :9001), xDS ADS (:18000), admin HTTP (:9902).
#
# Base images are pinned by tag. In production pin them by digest as well
# (FROM golang:1.26.8@sha256:..., FROM gcr.io/distroless/static-debian12:nonroot@sha256:...),
# so that a re-pushed tag cannot change what you ship.

FROM golang:1.26.8 AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=dev
ARG COMMIT=unknown
RUN CGO_ENABLED=0 go build -trimpath \
      -ldflags "-s -w -X main.version=${VERSION} -X main.commit=${COMMIT}" \
      -o /out/mcpgate ./cmd/mcpgate

# The demo programs of docker-compose.yaml (`mcpgate-demo inventory|issuer|agent`), built
# only for `docker build --target demo`: the default target below never includes them.
# DEVELOPMENT ONLY: its issuer signs tokens for anyone who asks.
FROM build AS build-demo
RUN CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o /out/mcpgate-demo ./cmd/mcpgate-demo

FROM gcr.io/distroless/static-debian12:nonroot AS demo
COPY --from=build-demo /out/mcpgate-demo /mcpgate-demo
USER 65532:65532
ENTRYPOINT ["/mcpgate-demo"]

# The mcpgate image: the last stage, so the default target.
# distroless/static: no shell, no package manager, CA certificates for JWKS fetching.
FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/mcpgate /mcpgate
# The demo policy, so that `docker run` without a mount serves something; mount your own
# policy directory over /etc/mcpgate/policy (docker-compose.yaml, deploy/kubernetes). It
# names no mcpgate SPIFFE ID (authz.spiffeId), so Envoys it programmed would not use mTLS
# to the listeners below (serve logs a warning); the policies compose and Kubernetes mount do.
COPY testdata/demo /etc/mcpgate/policy
USER 65532:65532
EXPOSE 9001 18000 9902
# No HEALTHCHECK: distroless has no shell or curl to run one. Orchestrators probe the admin
# server instead: GET :9902/readyz (200 once a policy snapshot is loaded) and /healthz.
ENTRYPOINT ["/mcpgate"]
# The gRPC listeners (ext_authz/ext_proc :9001, xDS :18000) serve SPIFFE mTLS only: serve
# refuses plaintext beyond loopback, since whoever reaches xDS reads every Envoy's
# configuration and whoever reaches ext_authz/ext_proc asks for decisions. mcpgate takes its
# SVID from the SPIRE agent's Workload API at the conventional /run/spire/agent.sock (mount
# the agent's socket directory at /run/spire and give mcpgate a registration entry: see
# docker-compose.yaml and deploy/kubernetes, which do) and admits only the bundled demo
# policy's sidecars; override the CMD with your policy's sidecar IDs, and name mcpgate's
# SPIFFE ID in your Mesh (authz.spiffeId) so that the Envoys use mTLS to it.
#
# A quick local try without SPIRE (plaintext, published on the host's loopback only; one
# command):
#   docker run --rm -p 127.0.0.1:9001:9001 -p 127.0.0.1:18000:18000 -p 127.0.0.1:9902:9902
#     mcpgate:dev serve --config /etc/mcpgate/policy --grpc-addr 0.0.0.0:9001
#     --xds-addr 0.0.0.0:18000 --admin-addr 0.0.0.0:9902 --insecure-listen
# The container's 0.0.0.0 is what Docker's port publishing reaches; --insecure-listen
# accepts it, with a warning. Never use it where others share the network.
CMD ["serve","--config","/etc/mcpgate/policy","--grpc-addr","0.0.0.0:9001","--xds-addr","0.0.0.0:18000","--admin-addr","0.0.0.0:9902","--spiffe-socket","unix:///run/spire/agent.sock","--allowed-client-ids","spiffe://example.org/ns/default/inventory,spiffe://example.org/ns/default/my-agent"]
