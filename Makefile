# KubeDiskGuard. `make test` and `make demo` install and build everything they
# need on a fresh Debian machine (run as root); see README.md.

SHELL := /bin/bash
.DEFAULT_GOAL := build

KUBE_VERSION ?= v1.36.3
ETCD_VERSION ?= v3.6.8
CACHE        ?= $(CURDIR)/.cache
TEST_BIN_DIR ?= $(CACHE)/bin/k8s-$(KUBE_VERSION)
BIN          ?= $(CURDIR)/bin
GO           ?= go
GOTEST_FLAGS ?= -count=1 -timeout 60m

VM_DIR       ?= $(CACHE)/vm
# containerd 2.x built from the module proxy (hack/tools/containerd): the
# cgroup v2 node's runtime, and the second containerd of the host's runtime tests
CONTAINERD2_DIR ?= $(CACHE)/bin/containerd-$(shell awk '$$1 == "require" && $$2 == "github.com/containerd/containerd/v2" { print $$3 }' hack/tools/containerd/go.mod)

# NODE: the node kind the local cluster runs on (make up, make demo, the
# end-to-end tests): host (this machine: cgroup v1, cgroupfs, containerd 1.6)
# or v2 (a qemu VM: cgroup v2, systemd, containerd 2.x)
NODE         ?= host
UP_DIR       ?= /var/tmp/kdg-up

export KUBEBUILDER_ASSETS := $(TEST_BIN_DIR)
export KDG_NODE := $(NODE)
export KDG_VM_DIR := $(VM_DIR)
export KDG_CONTAINERD2_DIR := $(CONTAINERD2_DIR)

.PHONY: v2node build test unit-test lint bench bench-load bench-policy bench-applier bench-applier-load bench-protection test-bins vm-kernel host-deps fuzz demo up down clean

# Debian packages the real-component tests use: containerd and runc (the
# containerd runtime tests), docker.io (dockerd, for the Docker runtime tests),
# busybox-static (the containers' root filesystem), fio (IO measurements),
# containernetworking-plugins (the local cluster's pod network), e2fsprogs
# and mount (mkfs.ext4, losetup: the host node's loop-device data disk),
# iproute2 (its pod bridge); iptables (kube-proxy in a Full cluster: the
# deployment test's, make up's) and nftables (nft: teardown removes the
# tables iptables-nft made for it). make demo needs only the first set.
DEMO_PACKAGES := containerd runc busybox-static fio containernetworking-plugins iproute2 e2fsprogs mount
FULL_PACKAGES := iptables nftables
HOST_PACKAGES := $(DEMO_PACKAGES) docker.io $(FULL_PACKAGES)
# The pinned binaries make demo needs (a cluster without controller-manager,
# scheduler or kube-proxy; no cert-manager); make test needs them all.
DEMO_BINS := etcd kube-apiserver kubelet kubectl

## build: the two binaries into bin/
build:
	CGO_ENABLED=0 bash hack/gobuild.sh kubediskguard-webhook -trimpath -ldflags "-s -w" -o $(BIN)/kubediskguard-webhook ./webhook
	CGO_ENABLED=0 bash hack/gobuild.sh kubediskguard-applier -trimpath -ldflags "-s -w" -o $(BIN)/kubediskguard-applier ./applier

## host-deps: install the Debian packages the tests need (as root), if missing
host-deps:
	@$(MAKE) --no-print-directory apt-install PACKAGES="$(HOST_PACKAGES)"

# apt-install: install PACKAGES that are missing (as root)
.PHONY: apt-install demo-deps demo-bins
apt-install:
	@missing=$$(for p in $(PACKAGES); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages: $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

## demo-deps, demo-bins: only what make demo needs
demo-deps:
	@$(MAKE) --no-print-directory apt-install PACKAGES="$(DEMO_PACKAGES)"
demo-bins:
	KUBE_VERSION=$(KUBE_VERSION) ETCD_VERSION=$(ETCD_VERSION) bash hack/test-bins.sh $(TEST_BIN_DIR) $(DEMO_BINS)

## test-bins: the pinned etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kube-proxy, kubectl, kubelet and cert-manager-local
## (hack/test-bins.sh builds what is missing, and cert-manager-local when its source changed; else it returns at once)
test-bins:
	KUBE_VERSION=$(KUBE_VERSION) ETCD_VERSION=$(ETCD_VERSION) CONTAINERD2_DIR=$(CONTAINERD2_DIR) bash hack/test-bins.sh $(TEST_BIN_DIR)

## vm-kernel: qemu, cpio and Debian's 6.1 cloud kernel with its virtio modules,
## for the cgroup v2 test in a VM (the host's blkio is bound to cgroup v1)
vm-kernel:
	bash hack/vm-kernel.sh $(VM_DIR)

## v2node: the cgroup v2 node kind's VM image and snapshot (qemu, debootstrap;
## Debian rootfs + Debian's 6.1 cloud kernel + the pinned binaries + containerd
## 2.x), cached in /var/cache/kubediskguard/v2node by their inputs (cold: ~20 min)
V2NODE_PACKAGES := qemu-system-x86 qemu-utils debootstrap cpio e2fsprogs busybox-static
v2node: test-bins
	@$(MAKE) --no-print-directory apt-install PACKAGES="$(V2NODE_PACKAGES)"
	$(GO) run ./hack/cluster/cmd v2-image

## test: every test, real components included (CI=true: nothing may skip),
## then, with nothing else running, what boots the emulated cgroup v2 node:
## TestV2NodeUpSmokeDown (~1.5 min), TestE2E (the noisy neighbour and every
## end-to-end check on the built binaries, ~12 min) and of TestDeployment
## what the deployment adds to it (~7 min: E2E_V2, DEPLOY_V2) on it, unless
## NODE=v2 ran them there already. Under emulation the node needs both
## cores: beside go test's other packages and builds its apiserver stopped
## answering (CI, 2026-12-03 and 2026-12-04, with the host lock held)
test: host-deps test-bins vm-kernel v2node build lint
	$(GO) test $(GOTEST_FLAGS) -skip '^$(V2_SMOKE)$$' ./...
	$(GO) test $(GOTEST_FLAGS) -run '^$(V2_SMOKE)$$' -v ./hack/cluster/
	$(if $(filter v2,$(NODE)),,$(E2E_V2))
	$(if $(filter v2,$(NODE)),,$(DEPLOY_V2_TEST))
V2_SMOKE = TestV2NodeUpSmokeDown
E2E_V2 = KDG_NODE=v2 $(GO) test $(GOTEST_FLAGS) -run '^TestE2E$$' -v ./hack/e2e/
DEPLOY_V2_TEST = KDG_NODE=v2 $(GO) test $(GOTEST_FLAGS) -run '^TestDeployment$$/^($(DEPLOY_V2))$$' -v ./hack/e2e/

## test-e2e-v2: on the cgroup v2 node, TestE2E and of TestDeployment what the
## deployment adds to it (cert-manager, the checks that restart or stop its
## pods, the renewal), as make test runs them
.PHONY: test-e2e-v2
test-e2e-v2: host-deps test-bins vm-kernel v2node build
	$(E2E_V2)
	$(DEPLOY_V2_TEST)
DEPLOY_V2 = CertManagerIssuedAndInjected|Throttle|WebhookDown|ApplierCrashLosesNothing|RenewedCertificateServedWithoutRestart

## unit-test: only the tests that need no real component
unit-test:
	$(GO) test -short $(GOTEST_FLAGS) ./...

## lint: gofmt and go vet
lint:
	@out=$$(gofmt -l $$(git ls-files -co --exclude-standard '*.go')); \
	  if [ -n "$$out" ]; then echo "gofmt needed on:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...

## bench: micro-benchmarks of the hot paths (see BENCHMARKS.md)
bench:
	$(GO) test -run '^$$' -bench 'Handle|Resolve' -benchmem -count 5 ./webhook/...

## bench-load: 1,000 requests/s for 30 s over TLS, real handler vs no-op (see BENCHMARKS.md)
bench-load:
	$(GO) test -run '^$$' -bench BenchmarkLoad -benchtime 1x -timeout 10m ./webhook/mutate/

## bench-policy: the policy controller re-resolving 500 pods of one namespace (envtest), at the default write rate and unlimited, vs the same pods up to date (see BENCHMARKS.md)
bench-policy: test-bins
	$(GO) test -run '^$$' -bench BenchmarkPolicy -benchtime 1x -timeout 10m ./webhook/app/

## bench-applier: reaction to 100 container starts and startup with 200 containers on real containerd, 1.6 and 2.x in the same run (root)
bench-applier: host-deps test-bins
	$(GO) test -run '^$$' -bench 'Reaction$$|StartupReconcile' -benchtime 1x -v -timeout 30m ./applier/app/

## bench-applier-load: the start window on a busy node: 500 starts with every core saturated by CPU hogs, then 500 in bursts of 20, on containerd 1.6 and 2.x (root; KDG_REACTION_STARTS; about 35 min here: 14 min on containerd 2.4.2, 19 on 1.6, clean-up included)
bench-applier-load: host-deps test-bins
	$(GO) test -run '^$$' -bench ReactionUnderLoad -benchtime 1x -v -timeout 150m ./applier/app/

## bench-protection: the noisy neighbour: a victim pod's fio latency alone, next to an unlimited aggressor pod, and with the aggressor's namespace opted in live, alternated over 5 rounds on the real cluster; medians and ratios, the last two lines `victim p99 protected/alone X.XX` and `victim p99 unprotected/alone X.XX`. With NODE=v2 (cgroup v2) first 3 aggressors at once, per-container limits against all pods held by DATA_TOTAL_IOPS, with two more victims, fio on the node outside any pod and a Guaranteed pod (root; KDG_PROTECT_ROUNDS, KDG_PROTECT_SECONDS, KDG_PROTECT_LIMIT, KDG_PROTECT_JOBS, KDG_PROTECT_IODEPTH, KDG_PROTECT_AGGRESSORS, KDG_PROTECT_TOTAL_IOPS)
bench-protection: host-deps test-bins build $(if $(filter v2,$(NODE)),vm-kernel v2node)
	@mkdir -p $(CACHE)
	set -o pipefail; $(GO) test -run '^$$' -bench BenchmarkProtection -benchtime 1x -v -timeout 150m ./hack/e2e/ 2>&1 | tee $(CACHE)/bench-protection.log
	@grep -E '^victim p99 (protected|unprotected)/alone ' $(CACHE)/bench-protection.log | tail -2

## fuzz: run each fuzz target for FUZZTIME (default 30s)
FUZZTIME ?= 30s
fuzz:
	$(GO) test -run '^$$' -fuzz FuzzParseValue -fuzztime $(FUZZTIME) ./shared/limits
	$(GO) test -run '^$$' -fuzz FuzzResolvedRoundTrip -fuzztime $(FUZZTIME) ./shared/limits
	$(GO) test -run '^$$' -fuzz FuzzParseContainerValue -fuzztime $(FUZZTIME) ./webhook/resolve
	$(GO) test -run '^$$' -fuzz FuzzHandle -fuzztime $(FUZZTIME) ./webhook/mutate
	$(GO) test -run '^$$' -fuzz FuzzParseMountInfo -fuzztime $(FUZZTIME) ./applier/device
	$(GO) test -run '^$$' -fuzz FuzzParseDevice -fuzztime $(FUZZTIME) ./applier/device
	$(GO) test -run '^$$' -fuzz FuzzParseProcCgroup -fuzztime $(FUZZTIME) ./applier/cgroup
	$(GO) test -run '^$$' -fuzz FuzzParseV1File -fuzztime $(FUZZTIME) ./applier/cgroup
	$(GO) test -run '^$$' -fuzz FuzzParseIOMax -fuzztime $(FUZZTIME) ./applier/cgroup
	$(GO) test -run '^$$' -fuzz FuzzParseIOStat -fuzztime $(FUZZTIME) ./applier/cgroup
	$(GO) test -run '^$$' -fuzz FuzzParseV1Stat -fuzztime $(FUZZTIME) ./applier/cgroup

## demo: the end-to-end story on a local single-node cluster: a namespace opts
## in, fio in a pod is held to its limit (and not in a namespace that did not
## opt in), kubectl annotate changes it live, the applier's Event; then a table.
## Leaves nothing running (see hack/demo/main.go)
demo: demo-deps demo-bins build $(if $(filter v2,$(NODE)),v2node)
	$(GO) run ./hack/demo -node $(NODE)

## up: a local cluster with KubeDiskGuard installed, left running, on NODE;
## prints `export KUBECONFIG=…` and `export KDG_DATA_DIR=…` on stdout (so
## `eval "$$(make up)"` works; everything else goes to stderr) and what to try
up:
	@$(MAKE) --no-print-directory up-deps up-bins build $(if $(filter v2,$(NODE)),v2node) >&2
	@$(GO) run ./hack/up up -node $(NODE) -dir $(UP_DIR)

## down: stop what make up started and restore the host (also after a crash)
down:
	@$(GO) run ./hack/up down -dir $(UP_DIR)

## up-deps, up-bins: only what make up needs (the demo's, plus the
## scheduler, controller-manager and kube-proxy of a Full cluster)
.PHONY: up-deps up-bins
up-deps:
	@$(MAKE) --no-print-directory apt-install PACKAGES="$(DEMO_PACKAGES) $(FULL_PACKAGES)"
up-bins:
	KUBE_VERSION=$(KUBE_VERSION) ETCD_VERSION=$(ETCD_VERSION) bash hack/test-bins.sh $(TEST_BIN_DIR) $(DEMO_BINS) kube-controller-manager kube-scheduler kube-proxy

clean:
	rm -rf $(BIN)

## certs: a CA and a serving certificate for the webhook Service, for clusters
## without cert-manager: tls.crt, tls.key, ca.crt and a copy of the webhook
## configuration with caBundle set, in CERTS_DIR (see README.md, "Deploying")
CERTS_DIR ?= $(CACHE)/certs
.PHONY: certs
certs:
	$(GO) run ./certs --out $(CERTS_DIR) --patch-manifest manifests/webhook/mutatingwebhookconfiguration.yaml
