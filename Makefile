# edgelb: `make demo` runs a demo, `make test` runs every test.
SHELL := /bin/bash
GO ?= go
BIN := $(CURDIR)/bin
CONSUL_VERSION := 1.13.9
export PATH := $(BIN):$(PATH)
# What `edgelb -version` and /status report: git describe of the tree.
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo devel)

.PHONY: all build test test-race test-alloc bench consul curl chromium demo vet fmt clean peers bench-scenarios fuzz

all: build

build:
	$(GO) build -ldflags "-X github.com/edgelb/edgelb/internal/version.version=$(VERSION)" -o $(BIN)/ ./cmd/...

# Consul: one on PATH is used as is; otherwise v$(CONSUL_VERSION) is built
# from the Go module proxy (about 3 minutes the first time on 2 cores).
consul: $(BIN)/consul

$(BIN)/consul:
	@mkdir -p $(BIN)
	@if command -v consul >/dev/null 2>&1 && [ "$$(command -v consul)" != "$(BIN)/consul" ]; then \
		echo "using $$(command -v consul)"; ln -sf "$$(command -v consul)" $(BIN)/consul; \
	else \
		echo "building consul v$(CONSUL_VERSION) into $(BIN)/consul (first time: a few minutes)"; \
		cd cmd/consul && $(GO) build -o $(BIN)/consul github.com/hashicorp/consul; \
	fi
	@$(BIN)/consul version | head -1

# curl for the tests that talk HTTPS to edgelb as a real client does.
curl:
	@command -v curl >/dev/null 2>&1 || { \
		echo "installing curl"; \
		$$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get update -qq && \
		$$( [ "$$(id -u)" = 0 ] || echo sudo ) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq curl; \
	}

# Chromium and NSS's certutil for the browser tests (balancer/browser_test.go,
# balancer/ui_browser_test.go; their client is balancer/cdp_test.go, which
# looks for the same binaries): a headless Chromium, trusting the test's CA
# through an NSS database where it needs to.
chromium:
	@missing=""; command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
		missing="$$missing chromium"; \
	command -v certutil >/dev/null 2>&1 || missing="$$missing libnss3-tools"; \
	if [ -n "$$missing" ]; then \
		echo "installing$$missing"; \
		$$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get update -qq && \
		$$( [ "$$(id -u)" = 0 ] || echo sudo ) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=600 --no-install-recommends $$missing; \
	fi

vet:
	@unformatted=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	if [ -n "$$unformatted" ]; then echo "gofmt needed:"; echo "$$unformatted"; exit 1; fi
	$(GO) vet ./...

# Every test: vet, the race-enabled suite (Consul integration tests
# included, against a real agent), then the allocation tests, which only
# build without -race.
test: consul curl chromium vet
	$(GO) test -race -count=1 -timeout 30m ./...
	$(GO) test -count=1 -run 'AllocatesNothing' -timeout 10m ./balancer/... ./health

# Searches for client input that makes edgelb send a backend a request the
# client did not send, or more requests than the client gets answers, and
# for bytes that the HTTP/1 scanners of balancer/h1 forward but fasthttp's
# parser reads otherwise; each target runs FUZZTIME. What they find lands in
# testdata/fuzz beside them, which `make test` then runs.
FUZZTIME ?= 60s
H1_FUZZ := FuzzParseRequest FuzzParseResponse FuzzChunked
fuzz:
	$(GO) test -run '^$$' -fuzz '^FuzzProxyHead$$' -fuzztime $(FUZZTIME) ./balancer
	@set -e; for t in $(H1_FUZZ); do \
		$(GO) test -run '^$$' -fuzz "^$$t\$$" -fuzztime $(FUZZTIME) ./balancer/h1; \
	done

bench:
	$(GO) test -run '^$$' -bench . -benchmem -benchtime 2s ./...

# nginx, HAProxy and wrk for side-by-side comparisons in the bench suite.
peers:
	@missing=""; for p in nginx haproxy wrk; do command -v $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing$$missing"; \
		$$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get update -qq && \
		$$( [ "$$(id -u)" = 0 ] || echo sudo ) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

# Every load scenario through real processes, edgelb next to nginx and
# HAProxy for steady state and backend kill: bench/out/report.{json,html}.
bench-scenarios: build consul peers $(BIN)/echarts.min.js
	$(BIN)/edgelb-bench -scenario all -peers -out bench/out \
		$$( [ -s $(BIN)/echarts.min.js ] && echo -echarts-js $(BIN)/echarts.min.js )

# ECharts from the npm registry, inlined into the bench report so that it
# opens offline. Without npm the report loads ECharts from the web instead.
ECHARTS_VERSION := 5.6.0
$(BIN)/echarts.min.js:
	@mkdir -p $(BIN)
	@tmp=$$(mktemp -d); \
	if command -v npm >/dev/null 2>&1 && (cd $$tmp && npm pack echarts@$(ECHARTS_VERSION) --silent >/dev/null 2>&1) && \
		tar -xzf $$tmp/echarts-$(ECHARTS_VERSION).tgz -C $$tmp package/dist/echarts.min.js; then \
		mv $$tmp/package/dist/echarts.min.js $@; \
	else \
		echo "note: cannot fetch echarts $(ECHARTS_VERSION) with npm; the bench report will load it from the web"; : > $@; \
	fi; rm -rf $$tmp

demo: build consul
	$(BIN)/edgelb-demo

clean:
	rm -rf $(BIN) ./state ./.demo
