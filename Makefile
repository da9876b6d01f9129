# stepwise: `make run` sets up a fresh Debian/Ubuntu machine, builds and serves
# the demo; `make test` sets up, builds and runs every test.

GO        ?= $(shell command -v go 2>/dev/null || echo /usr/local/go/bin/go)
BUILD     ?= build
VERSION   := $(shell cat VERSION)
COMMIT    := $(shell git rev-parse --short HEAD 2>/dev/null || echo unknown)
JOBS      ?= $(shell nproc 2>/dev/null || echo 2)
DATA      ?= $(HOME)/.local/share/stepwise
# The stable-diffusion.cpp backend is built in when SDCPP_DIR (include/ and
# lib/ of a stable-diffusion.cpp build) exists: by default the prebuilt one
# beside the repository, for tests; without it the backend is left out.
SDCPP_DIR ?= $(wildcard ../shared/sdcpp)
CMAKE_ARGS ?= $(if $(SDCPP_DIR),-DSTEPWISE_SDCPP_DIR=$(abspath $(SDCPP_DIR)))

LIB := $(BUILD)/libstepwise.so
BIN := $(BUILD)/stepwise
export STEPWISE_LIB := $(abspath $(LIB))

.PHONY: all deps deps-test build lib bin test vet run bench clean

all: build

deps:
	@./scripts/setup.sh

deps-test:
	@./scripts/setup.sh --test

build: deps lib bin

$(BUILD)/CMakeCache.txt: CMakeLists.txt | deps
	cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=Release $(CMAKE_ARGS)

lib: $(BUILD)/CMakeCache.txt
	cmake --build $(BUILD) -j $(JOBS)

bin:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags "-X main.version=$(VERSION)+$(COMMIT)" -o $(BIN) ./cmd/stepwise

vet:
	CGO_ENABLED=0 $(GO) vet ./...

# Native parity tests first (components, samplers, pipelines against
# ../shared/fixtures), then the whole Go suite with CGO_ENABLED=0 (how stepwise
# ships) — here a single-file checkpoint of SD 1.5's full size is made and run
# with the built-in tokenizer (~2 min, ~9 GB); the binding's, the model cache's,
# the pipeline's and the server's tests run again with cgo and the race detector.
test: deps-test build vet
	$(BUILD)/stepwise_native_test
	STEPWISE_SD15_FULL=1 CGO_ENABLED=0 $(GO) test -count=1 ./...
	CGO_ENABLED=1 $(GO) test -count=1 -race ./binding/... ./modelcache/... ./pipeline/... ./server/...

# Serves the demo: the tiny random-weight models, made on first use, unless
# MODEL= / SEG_MODEL= name real ones.
ADDR ?= 127.0.0.1:7860
run: build
	$(BIN) serve --addr $(ADDR) --data $(DATA) $(if $(MODEL),--model $(MODEL)) $(if $(SEG_MODEL),--seg-model $(SEG_MODEL))

bench: build
	$(BIN) bench --sizes 256,512 --dtypes f32,bf16

# Times the current tree against commit BASE on the same work and prints the
# ratios (docs/benchmarks.md); the baseline is built once under .bench/.
# BENCH_ARGS: bench flags for both, e.g. BENCH_ARGS="--sizes 256 --dtypes f32,bf16".
.PHONY: bench-compare
bench-compare:
	@test -n "$(BASE)" || { echo "usage: make bench-compare BASE=<commit> [BENCH_ARGS=...]" >&2; exit 2; }
	BENCH_ARGS="$(BENCH_ARGS)" ROUNDS="$(ROUNDS)" GO="$(GO)" JOBS="$(JOBS)" ./scripts/bench-compare.sh $(BASE)

clean:
	rm -rf $(BUILD)
