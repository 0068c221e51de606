# layercache: copy-on-write layered build caches for Kubernetes.
#
# `make help` lists the targets. Everything the targets need (Go tools,
# Kubernetes binaries, Debian packages) is installed by the targets
# themselves, idempotently, into bin/ or through apt-get.

SHELL := /usr/bin/env bash -o pipefail
.SHELLFLAGS := -ec
.DEFAULT_GOAL := help

BIN ?= $(CURDIR)/bin
TOOLS := $(BIN)/tools
GO ?= go

STATICCHECK_VERSION ?= v0.8.2
STATICCHECK := $(TOOLS)/staticcheck-$(STATICCHECK_VERSION)
CONTROLLER_TOOLS_VERSION ?= v0.19.0
CONTROLLER_GEN := $(TOOLS)/controller-gen-$(CONTROLLER_TOOLS_VERSION)

# Benchmark sizes (make bench BENCH_SIZE=256MiB BENCH_FILES=10000).
BENCH_SIZE ?= 1GiB
BENCH_FILES ?= 50000
# What make bench-e2e measures: synthetic (pod start, read), build (go build),
# load (60 build pods at once); and registry (caches across nodes, on 3
# nodes: make bench-e2e BENCH_E2E_PARTS=registry).
BENCH_E2E_PARTS ?= synthetic,build,load
# The registry part needs 3 nodes; the others measure one.
BENCH_E2E_NODES ?= $(if $(findstring registry,$(BENCH_E2E_PARTS)),3,1)
BENCH_SMALL_SIZE ?= 100MiB
BENCH_RUNS ?= 7
BENCH_DIR ?= /var/tmp/layercache-bench

# Kubernetes built from the Go module proxy (hack/k8s), for envtest and the
# local cluster.
KUBE_VERSION ?= v1.33.13
K8S_BIN := $(BIN)/k8s/$(KUBE_VERSION)
ENVTEST_ASSETS := $(K8S_BIN)

##@ General

.PHONY: help
help: ## Show this help.
	@awk 'BEGIN {FS = ":.*##"; printf "Usage: make \033[36m<target>\033[0m\n"} /^[a-zA-Z_0-9-]+:.*?##/ { printf "  \033[36m%-18s\033[0m %s\n", $$1, $$2 } /^##@/ { printf "\n\033[1m%s\033[0m\n", substr($$0, 5) }' $(MAKEFILE_LIST)

##@ Development

.PHONY: manifests
manifests: $(CONTROLLER_GEN) ## Generate the CRDs and the ClusterRoles of the manager and the node agent.
	$(CONTROLLER_GEN) rbac:roleName=layercache-manager-role crd paths="./api/..." paths="./webhook/..." paths="./controllers/..." \
		output:crd:artifacts:config=config/crd/bases
	$(CONTROLLER_GEN) rbac:roleName=layercache-node-agent-role paths="./nodeagent/..." output:rbac:artifacts:config=config/node-agent
	cp config/crd/bases/*.yaml dist/chart/crds/
	$(GO) test ./internal/docs -run TestAPIPageIsGenerated -update

.PHONY: generate
generate: $(CONTROLLER_GEN) ## Generate the DeepCopy methods of the API types.
	$(CONTROLLER_GEN) object:headerFile="hack/boilerplate.go.txt" paths="./api/..."

.PHONY: check-generated
check-generated: $(CONTROLLER_GEN) ## Fail if the generated files are not what the sources generate.
	@before=$$(mktemp -d); trap 'rm -rf "$$before"' EXIT; cp -a api config dist docs "$$before"/; \
	$(MAKE) -s generate manifests; \
	if ! diff -r "$$before/api" api || ! diff -r "$$before/config" config || ! diff -r "$$before/dist" dist || ! diff -r "$$before/docs" docs; then \
		echo "generated files were out of date (now regenerated): review and commit them"; exit 1; fi

.PHONY: fmt
fmt: ## Format the Go code.
	$(GO) fmt ./...

.PHONY: vet
vet: ## Run go vet (the e2e suites included).
	$(GO) vet -tags e2e,extended,upgrade ./...

.PHONY: lint
lint: vet $(STATICCHECK) ## Run go vet, staticcheck and a gofmt check.
	@unformatted=$$(gofmt -l $$( { git ls-files --cached --others --exclude-standard '*.go' 2>/dev/null || find . -name '*.go' -not -path './bin/*'; } | \
		while read -r f; do [ -f "$$f" ] && echo "$$f"; done)); \
	if [ -n "$$unformatted" ]; then echo "gofmt needed on: $$unformatted"; exit 1; fi
	$(STATICCHECK) -tags e2e,extended,upgrade ./...
	@[ -x $(BIN)/actionlint ] || hack/actionlint/build.sh $(BIN)
	$(BIN)/actionlint .github/workflows/*.yml

.PHONY: test
test: lint check-generated envtest-assets registry-bin helm-bin chart-lint test-e2e ## Run every test (as root: overlays, a real cluster, a real registry).
	@rc=0; KUBEBUILDER_ASSETS=$(ENVTEST_ASSETS) $(GO) test -race -count=1 ./... || rc=$$?; \
	hack/reap-envtest.sh; exit $$rc
	$(GO) test -run '^$$' -fuzz FuzzImageLayer -fuzztime 20s ./engine/
	cd hack/release && $(GO) vet ./... && $(GO) test -count=1 ./...

.PHONY: test-extended
test-extended: ## The extended e2e tests: the Helm chart installed, upgraded, uninstalled; a real Tekton pipeline with a cached workspace; nested podman in a cache (root; CI runs it after make test).
	hack/test-extended.sh

.PHONY: test-e2e
test-e2e: ## On a real local 3-node cluster: smoke test, install, the e2e suite, teardown checked clean (root).
	hack/test-e2e.sh

.PHONY: bench-e2e
bench-e2e: ## On the local cluster: pod start and read of a warm cache (vs copy, tar, emptyDir), a real Go build cold vs warm, 60 pods at once, caches across nodes through the registry (root; BENCH_E2E_PARTS=synthetic,build,load,registry).
	@rc=0; { NODES=$(BENCH_E2E_NODES) hack/cluster/up.sh && hack/deploy-local.sh && \
		hack/images/build.sh golang && hack/images/import.sh bin/bench/golang.tar && \
		$(GO) run ./hack/bench-e2e --size $(BENCH_SIZE) --files $(BENCH_FILES) --runs $(or $(BENCH_E2E_RUNS),5) \
			--parts $(BENCH_E2E_PARTS); } || rc=$$?; \
	hack/cluster/down.sh || rc=1; exit $$rc

.PHONY: registry-bin
registry-bin: ## Build CNCF Distribution's registry into bin/registry (for the registry tests and the local cluster).
	hack/registry/build.sh $(BIN)

.PHONY: helm-bin
helm-bin: ## Build Helm (hack/helm, pinned) into bin/helm.
	hack/helm/build.sh $(BIN)

.PHONY: chart-lint
chart-lint: helm-bin ## helm lint the chart in dist/chart (go test ./internal/chart checks it renders what config/ does).
	$(BIN)/helm lint --strict dist/chart
	$(BIN)/helm lint --strict dist/chart --set certificates.mode=builtin

.PHONY: fuzz
fuzz: ## Fuzz the name parsers, the layer importer and the tar-to-EROFS writer (its images mounted and read back) for a while (FUZZTIME=1m each).
	$(GO) test -run '^$$' -fuzz FuzzParseKey -fuzztime $(or $(FUZZTIME),1m) ./engine/
	$(GO) test -run '^$$' -fuzz FuzzValidateVolumeID -fuzztime $(or $(FUZZTIME),1m) ./engine/
	$(GO) test -run '^$$' -fuzz FuzzImportLayer -fuzztime $(or $(FUZZTIME),1m) ./engine/
	$(GO) test -run '^$$' -fuzz FuzzImageLayer -fuzztime $(or $(FUZZTIME),1m) ./engine/

.PHONY: bench
bench: ## Measure volume setup, commit and compaction against cp -a and tar -x (root).
	$(GO) run ./hack/bench --dir $(BENCH_DIR) --size $(BENCH_SIZE) --files $(BENCH_FILES) \
		--small-size $(BENCH_SMALL_SIZE) --runs $(BENCH_RUNS)

##@ Build

.PHONY: build
build: ## Build the binaries of cmd/ into bin/.
	@for d in cmd/*/; do n=$$(basename $$d); echo "building bin/$$n"; \
		CGO_ENABLED=0 $(GO) build -trimpath -o $(BIN)/$$n ./$$d || exit 1; done

.PHONY: run
run: ## Run the manager against the current kubeconfig, without webhooks (no certificates needed).
	$(GO) run ./cmd/manager --enable-webhooks=false --health-probe-bind-address=:8081

##@ Local cluster

.PHONY: k8s-binaries
k8s-binaries: ## Build etcd and Kubernetes into bin/k8s/VERSION (once; ~9 min cold on 2 cores).
	hack/k8s/build.sh $(K8S_BIN)

.PHONY: envtest-assets
envtest-assets: ## Build etcd, kube-apiserver (envtest's KUBEBUILDER_ASSETS) and kubectl into bin/k8s/VERSION.
	hack/k8s/build.sh $(K8S_BIN) etcd kube-apiserver kubectl

.PHONY: images
images: ## Write the OCI images into bin/images; import them if the cluster runs.
	hack/images/build.sh
	@if [ -S /var/lib/layercache-cluster/containerd/containerd.sock ]; then hack/images/import.sh; fi

.PHONY: cluster-up
cluster-up: ## Start a real cluster here (root; NODES=3 for 3 nodes, namespaces of this host); prints the KUBECONFIG to use.
	hack/cluster/up.sh

.PHONY: cluster-down
cluster-down: ## Stop the cluster and remove everything it made, then check that nothing is left.
	hack/cluster/down.sh

.PHONY: cluster-smoke
cluster-smoke: ## Bring the cluster up, run a Bidirectional overlay pod, tear down, check clean.
	@rc=0; { hack/cluster/up.sh && hack/cluster/smoke.sh; } || rc=$$?; \
	hack/cluster/down.sh || rc=1; exit $$rc

##@ Deployment

.PHONY: demo
demo: ## Build everything, start the local cluster, install layercache and play the build-cache story (root).
	hack/demo.sh

KUBECTL ?= $(K8S_BIN)/kubectl

.PHONY: deploy
deploy: ## Install layercache (config/default, cert-manager required) with the current kubeconfig.
	hack/k8s/build.sh $(K8S_BIN) kubectl
	$(KUBECTL) apply -k config/default

.PHONY: undeploy
undeploy: ## Remove what deploy installed.
	$(KUBECTL) delete -k config/default --ignore-not-found

.PHONY: deploy-local
deploy-local: ## Install layercache without cert-manager (config/local) on the running local cluster.
	hack/deploy-local.sh

.PHONY: undeploy-local
undeploy-local: ## Remove what deploy-local installed.
	$(KUBECTL) --kubeconfig /var/lib/layercache-cluster/admin.kubeconfig delete -k config/local --ignore-not-found

.PHONY: release
release: ## Build and push a release: VERSION=vX.Y.Z REGISTRY=HOST/PREFIX (REGISTRY_INSECURE=true, REGISTRY_AUTH_FILE=config.json): multi-arch images by digest with SBOMs, dist/release/install.yaml, the chart pushed to oci://REGISTRY/charts, SHA256SUMS.
	VERSION=$(VERSION) REGISTRY=$(REGISTRY) hack/release.sh

.PHONY: build-installer
build-installer: ## Render config/default into dist/install.yaml (one file to apply).
	hack/k8s/build.sh $(K8S_BIN) kubectl
	@mkdir -p dist
	$(KUBECTL) kustomize config/default > dist/install.yaml
	@echo "wrote dist/install.yaml"

##@ Tools

$(STATICCHECK):
	@mkdir -p $(TOOLS)
	GOBIN=$(TOOLS) $(GO) install honnef.co/go/tools/cmd/staticcheck@$(STATICCHECK_VERSION)
	mv $(TOOLS)/staticcheck $@

$(CONTROLLER_GEN):
	@mkdir -p $(TOOLS)
	GOBIN=$(TOOLS) $(GO) install sigs.k8s.io/controller-tools/cmd/controller-gen@$(CONTROLLER_TOOLS_VERSION)
	mv $(TOOLS)/controller-gen $@
