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
STATICCHECK := $(BIN)/staticcheck-$(STATICCHECK_VERSION)
OPA         := $(BIN)/opa-$(OPA_VERSION)

FUZZTIME ?= 15s
BENCHTIME ?= 2s

.PHONY: help build test test-integration tsclient lint fmt bench fuzz opa-test demo testdata tools clean

help: ## Show this help
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-18s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

build: ## Build bin/mcpgate and bin/mcpgate-demo (the compose demo's server, issuer and agent)
	go build -trimpath -ldflags '$(LDFLAGS)' -o $(BIN)/mcpgate ./cmd/mcpgate
	go build -trimpath -o $(BIN)/mcpgate-demo ./cmd/mcpgate-demo

test: ## Unit, loopback and end-to-end tests, with the race detector
	go test -race -count=1 ./...
	$(MAKE) test-integration

test-integration: tsclient spire ## End-to-end tests (build tag "integration"): the real binary, emulated Envoys, SPIRE, SDK peers
	go test -race -count=1 -tags integration ./integration/...

tsclient: integration/tsclient/node_modules/.package-lock.json ## The official TypeScript MCP SDK client (npm, pinned by package-lock.json)

integration/tsclient/node_modules/.package-lock.json: integration/tsclient/package-lock.json
	cd integration/tsclient && npm ci --no-audit --no-fund --ignore-scripts

lint: $(STATICCHECK) ## gofmt, go vet, staticcheck
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	  if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	go vet ./...
	go vet -tags integration ./...
	$(STATICCHECK) ./...

fmt: ## Format the code
	gofmt -w $$(git ls-files '*.go')

bench: ## Benchmarks: Check and ext_proc exchanges beside no-op servers, Rego, list filtering, parsing
	go test -run '^$$' -bench . -benchmem -benchtime $(BENCHTIME) ./extauthz/... ./extproc/... ./policy/... ./xds/...

fuzz: ## Run each fuzz target briefly (FUZZTIME=15s); seeds live in testdata/fuzz
	go test -run '^$$' -fuzz '^FuzzLoad$$' -fuzztime $(FUZZTIME) ./policy
	go test -run '^$$' -fuzz '^FuzzCheck$$' -fuzztime $(FUZZTIME) ./extauthz
	go test -run '^$$' -fuzz '^FuzzParseBody$$' -fuzztime $(FUZZTIME) ./extproc/mcp
	go test -run '^$$' -fuzz '^FuzzFramer$$' -fuzztime $(FUZZTIME) ./extproc/mcp
	go test -run '^$$' -fuzz '^FuzzResponse$$' -fuzztime $(FUZZTIME) ./extproc/mcp
	go test -run '^$$' -fuzz '^FuzzErrorBodies$$' -fuzztime $(FUZZTIME) ./extproc

opa-test: $(OPA) ## The demo Rego policy's tests with the opa CLI
	$(OPA) test -v testdata/demo/rego

demo: build tsclient ## Run the demo: mcpgate, emulated sidecars and SDK peers; a scripted session; transcripts
	@out=$$(mktemp); \
	if go test -count=1 -tags integration -run '^TestDemo(Mesh)?$$' -v ./integration/ >$$out 2>&1; then \
	  sed -n '/^=== TRANSCRIPT/,/^=== END/p' $$out; rm -f $$out; \
	else cat $$out; rm -f $$out; exit 1; fi

testdata: ## Regenerate golden files (the xDS translation brings the first ones)
	@if grep -rlq -- '-update' --include='*_test.go' . ; then go test ./xds ./envoy/contract -update; else echo "no golden files yet"; fi

tools: $(STATICCHECK) $(OPA) ## Install pinned tools into ./bin

$(STATICCHECK):
	@mkdir -p $(BIN)
	GOBIN=$(BIN) go install honnef.co/go/tools/cmd/staticcheck@$(STATICCHECK_VERSION)
	mv $(BIN)/staticcheck $@

$(OPA):
	@mkdir -p $(BIN)
	GOBIN=$(BIN) go install github.com/open-policy-agent/opa@$(OPA_VERSION)
	mv $(BIN)/opa $@

clean: ## Remove build outputs
	rm -rf $(BIN) integration/tsclient/node_modules

# The bootstraps come from the shipped policy, which names mcpgate's SPIFFE ID
# (authz.spiffeId), so their xds_cluster is SPIFFE mTLS; the issuer, the only other change
# in deploy/compose/policy, is not part of a bootstrap.
.PHONY: bootstraps
bootstraps: ## Regenerate deploy/compose/policy and the Kubernetes ConfigMaps (testdata/demo plus mcpgate's SPIFFE ID) and envoy/bootstrap/*.yaml (mcpgate bootstrap: xDS over SPIFFE mTLS)
	go test -count=1 -run '^TestComposePolicy$$' ./deploy -update
	@mkdir -p envoy/bootstrap
	go run ./cmd/mcpgate bootstrap --config deploy/compose/policy --app inventory --xds-address mcpgate:18000 > envoy/bootstrap/inventory.yaml
	go run ./cmd/mcpgate bootstrap --config deploy/compose/policy --app my-agent --xds-address mcpgate:18000 > envoy/bootstrap/my-agent.yaml
	go test -count=1 -run '^TestKubernetesConfigMaps$$' ./deploy -update

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
