# mcpgate — run `make help` for the targets.
SHELL := /usr/bin/env bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
COMMIT  ?= $(shell git rev-parse --short HEAD 2>/dev/null || echo unknown)
LDFLAGS := -s -w -X main.version=$(VERSION) -X main.commit=$(COMMIT)
BIN     := $(CURDIR)/bin

# Pinned tool versions (see ../shared/TOOLING.md); installed into ./bin on first use.
STATICCHECK_VERSION := v0.8.2
OPA_VERSION         := v1.22.2
BUF_VERSION         := v1.75.0
# The protoc plugins of buf.gen.yaml: protoc-gen-go matches google.golang.org/protobuf in
# go.mod, so generated code and runtime agree.
PROTOC_GEN_GO_VERSION      := v1.36.12
PROTOC_GEN_GO_GRPC_VERSION := v1.6.0
STATICCHECK := $(BIN)/staticcheck-$(STATICCHECK_VERSION)
OPA         := $(BIN)/opa-$(OPA_VERSION)
BUF         := $(BIN)/buf-$(BUF_VERSION)
PROTOC_GEN  := $(BIN)/protoc-gen-go-$(PROTOC_GEN_GO_VERSION)-grpc-$(PROTOC_GEN_GO_GRPC_VERSION)

FUZZTIME ?= 15s
BENCHTIME ?= 2s

.PHONY: help build test test-integration tsclient lint proto-lint proto fmt bench fuzz opa-test demo testdata tools clean

help: ## Show this help
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-18s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

build: ## Build bin/mcpgate and bin/mcpgate-demo (the compose demo's server, issuer and agent)
	go build -trimpath -ldflags '$(LDFLAGS)' -o $(BIN)/mcpgate ./cmd/mcpgate
	go build -trimpath -o $(BIN)/mcpgate-demo ./cmd/mcpgate-demo

test: redis otlpsink ## Unit, loopback and end-to-end tests, with the race detector
	go test -race -count=1 ./...
	$(MAKE) test-integration

test-integration: tsclient spire ## End-to-end tests (build tag "integration"): the real binary, emulated Envoys, SPIRE, SDK peers
	go test -race -count=1 -tags integration ./integration/...

tsclient: integration/tsclient/node_modules/.package-lock.json ## The official TypeScript MCP SDK client (npm, pinned by package-lock.json)

integration/tsclient/node_modules/.package-lock.json: integration/tsclient/package-lock.json
	cd integration/tsclient && npm ci --no-audit --no-fund --ignore-scripts

lint: $(STATICCHECK) proto-lint ## gofmt, go vet, staticcheck, buf lint and breaking, generated code fresh
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	  if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	go vet ./...
	go vet -tags integration ./...
	$(STATICCHECK) ./...

# buf breaking compares with main's proto/ (a change that breaks wire or JSON
# compatibility of a published message fails); before main has any proto there is nothing
# to break. The generated Go must be what buf.gen.yaml makes of the .proto files now.
proto-lint: $(BUF) $(PROTOC_GEN)
	cd proto && $(BUF) lint
	@if git cat-file -e main:proto/buf.yaml 2>/dev/null; then \
	  echo "buf breaking proto --against .git#branch=main,subdir=proto"; \
	  $(BUF) breaking proto --against '.git#branch=main,subdir=proto'; \
	else echo "buf breaking: main has no proto/ yet"; fi
	@tmp=$$(mktemp -d); trap 'rm -rf $$tmp' EXIT; \
	  (cd proto && PATH=$(PROTOC_GEN):$$PATH $(BUF) generate --output $$tmp); \
	  for f in $$(cd $$tmp && find . -name '*.go'); do \
	    if ! cmp -s $$tmp/$$f proto/$$f; then echo "proto/$$f is stale: run make proto"; exit 1; fi; \
	  done; \
	  if [ "$$(cd proto && find . -name '*.pb.go' | sort)" != "$$(cd $$tmp && find . -name '*.pb.go' | sort)" ]; then \
	    echo "proto/ holds generated files no .proto makes: run make proto"; exit 1; fi

proto: $(BUF) $(PROTOC_GEN) ## Regenerate the Go of proto/ (buf generate with the pinned plugins)
	cd proto && PATH=$(PROTOC_GEN):$$PATH $(BUF) generate

fmt: ## Format the code
	gofmt -w $$(git ls-files '*.go')

bench: redis otlpsink ## Benchmarks: Check and ext_proc exchanges beside no-op servers, Rego, list filtering, parsing, outbound credentials
	go test -run '^$$' -bench . -benchmem -benchtime $(BENCHTIME) ./extauthz/... ./extproc/... ./policy/... ./xds/...
	go test -run '^$$' -bench . -benchmem -benchtime $(BENCHTIME) ./integration/envoyemu/

fuzz: ## Run each fuzz target briefly (FUZZTIME=15s); seeds live in testdata/fuzz
	go test -run '^$$' -fuzz '^FuzzLoad$$' -fuzztime $(FUZZTIME) ./policy
	go test -run '^$$' -fuzz '^FuzzCheck$$' -fuzztime $(FUZZTIME) ./extauthz
	go test -run '^$$' -fuzz '^FuzzParseBody$$' -fuzztime $(FUZZTIME) ./extproc/mcp
	go test -run '^$$' -fuzz '^FuzzFramer$$' -fuzztime $(FUZZTIME) ./extproc/mcp
	go test -run '^$$' -fuzz '^FuzzResponse$$' -fuzztime $(FUZZTIME) ./extproc/mcp
	go test -run '^$$' -fuzz '^FuzzPruneOutputSchema$$' -fuzztime $(FUZZTIME) ./extproc/mcp
	go test -run '^$$' -fuzz '^FuzzErrorBodies$$' -fuzztime $(FUZZTIME) ./extproc
	go test -run '^$$' -fuzz '^FuzzGRPCFramer$$' -fuzztime $(FUZZTIME) ./extproc/grpcframe

opa-test: $(OPA) ## The demo Rego policy's tests with the opa CLI
	$(OPA) test -v testdata/demo/rego

demo: build tsclient otlpsink ## Run the demo: mcpgate, emulated sidecars and SDK peers; a scripted session; transcripts
	@out=$$(mktemp); \
	if go test -count=1 -tags integration -run '^TestDemo(Mesh)?$$' -v ./integration/ >$$out 2>&1; then \
	  sed -n '/^=== TRANSCRIPT/,/^=== END/p' $$out; rm -f $$out; \
	else cat $$out; rm -f $$out; exit 1; fi

testdata: ## Regenerate golden files (the xDS translation brings the first ones)
	@if grep -rlq -- '-update' --include='*_test.go' . ; then go test ./xds ./envoy/contract -update; else echo "no golden files yet"; fi

tools: $(STATICCHECK) $(OPA) $(BUF) $(PROTOC_GEN) ## Install pinned tools into ./bin

$(STATICCHECK):
	@mkdir -p $(BIN)
	GOBIN=$(BIN) go install honnef.co/go/tools/cmd/staticcheck@$(STATICCHECK_VERSION)
	mv $(BIN)/staticcheck $@

$(OPA):
	@mkdir -p $(BIN)
	GOBIN=$(BIN) go install github.com/open-policy-agent/opa@$(OPA_VERSION)
	mv $(BIN)/opa $@

$(BUF):
	@mkdir -p $(BIN)
	GOBIN=$(BIN) go install github.com/bufbuild/buf/cmd/buf@$(BUF_VERSION)
	mv $(BIN)/buf $@

$(PROTOC_GEN):
	@mkdir -p $@
	GOBIN=$@ go install google.golang.org/protobuf/cmd/protoc-gen-go@$(PROTOC_GEN_GO_VERSION)
	GOBIN=$@ go install google.golang.org/grpc/cmd/protoc-gen-go-grpc@$(PROTOC_GEN_GO_GRPC_VERSION)

clean: ## Remove build outputs
	rm -rf $(BIN) integration/tsclient/node_modules

# The bootstraps come from the shipped policy, which names mcpgate's SPIFFE ID
# (authz.spiffeId), so their xds_cluster is SPIFFE mTLS; the issuer, the only other change
# in deploy/compose/policy, is not part of a bootstrap.
.PHONY: bootstraps
bootstraps: ## Regenerate deploy/compose/policy, envoy/bootstrap/*.yaml (mcpgate bootstrap: xDS over SPIFFE mTLS), the Kubernetes ConfigMaps (testdata/demo plus mcpgate's SPIFFE ID) and deploy/kubernetes/ha/mesh.yaml
	go test -count=1 -run '^TestComposePolicy$$' ./deploy -update
	@mkdir -p envoy/bootstrap
	go run ./cmd/mcpgate bootstrap --config deploy/compose/policy --app inventory --xds-address mcpgate:18000 > envoy/bootstrap/inventory.yaml
	go run ./cmd/mcpgate bootstrap --config deploy/compose/policy --app my-agent --xds-address mcpgate:18000 > envoy/bootstrap/my-agent.yaml
	go test -count=1 -run '^(TestKubernetesConfigMaps|TestKubernetesHAPolicy)$$' ./deploy -update

# SPIRE server and agent for the integration suite (issue 6), built from the pinned tools
# module integration/tools/spire (its own go.mod; see ../shared/TOOLING.md). Skipped when
# the binaries exist; a cold build takes minutes, a warm one about a minute and a half.
SPIRE_VERSION := v1.15.3
SPIRE_SERVER  := $(BIN)/spire-server-$(SPIRE_VERSION)
SPIRE_AGENT   := $(BIN)/spire-agent-$(SPIRE_VERSION)

.PHONY: spire
spire: $(SPIRE_SERVER) $(SPIRE_AGENT) ## Build SPIRE server and agent (pinned) into ./bin for the integration suite

$(BIN)/spire-%-$(SPIRE_VERSION):
	@mkdir -p $(BIN)
	cd integration/tools/spire && go build -o $@.tmp github.com/spiffe/spire/cmd/spire-$*
	mv $@.tmp $@

# The OpenTelemetry Collector's OTLP receiver for the tracing tests (integration/otlptest
# runs it on a loopback port), built from the pinned tools module integration/tools/otlpsink:
# its own go.mod, because the collector's confmap needs a gobwas/glob that OPA's conflicts with.
OTLPSINK_VERSION := v0.165.0
OTLPSINK := $(BIN)/otlpsink-$(OTLPSINK_VERSION)

.PHONY: otlpsink
otlpsink: $(OTLPSINK) ## Build the OTLP receiver (OpenTelemetry Collector otlpreceiver, pinned) for the tracing tests

$(OTLPSINK): integration/tools/otlpsink/main.go integration/tools/otlpsink/go.mod integration/tools/otlpsink/go.sum
	@mkdir -p $(BIN)
	cd integration/tools/otlpsink && go build -o $@.tmp .
	mv $@.tmp $@

# redis-server for the shared rate limit's tests (extproc/ratelimit starts a real one on a
# loopback port through integration/redistest). The Debian package, installed only when
# missing, as root or with passwordless sudo; its postinst may start the system service
# (on 6379), which the tests do not use, so it is stopped again.
.PHONY: redis
redis: ## Install redis-server (Debian package) for the rate-limit tests, if missing
	@if ! command -v redis-server >/dev/null && [ ! -x /usr/bin/redis-server ]; then \
	  SUDO=; \
	  if [ "$$(id -u)" != 0 ]; then \
	    sudo -n true 2>/dev/null || { echo "make redis: need root or passwordless sudo to install redis-server" >&2; exit 1; }; \
	    SUDO=sudo; \
	  fi; \
	  $$SUDO apt-get update; \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server; \
	  $$SUDO service redis-server stop >/dev/null 2>&1 || true; \
	fi
	@"$$(command -v redis-server || echo /usr/bin/redis-server)" --version
