# Two commands from a fresh clone: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: run test lint native install clean dist image base-image scan soak chaos stalled resumes profile instructions fleet screenshot bench-observability load bench node-deps

# The virtualenv, rebuilt whenever pyproject.toml changes.
# The compiled hot path is built apart (below), so the install needs no build
# isolation: the dev set already holds what setup.py would import.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip "setuptools>=77"
	CHATIQ_GATEWAY_NO_EXTENSIONS=1 $(BIN)/python -m pip install --quiet --no-build-isolation -e '.[dev]'
	touch $(STAMP)

# The compiled hot path (setup.py: mypyc), built in place whenever its sources
# change. Without a C compiler it is skipped with a warning: the pure path runs.
HOT_PATH     := $(shell grep -o '"gateway/[a-z_/]*\.py"' setup.py | tr -d '"')
NATIVE_STAMP := $(VENV)/.native-stamp
$(NATIVE_STAMP): $(STAMP) setup.py $(HOT_PATH)
	$(BIN)/python setup.py --quiet build_ext --inplace
	touch $(NATIVE_STAMP)

native: $(NATIVE_STAMP)

install: $(STAMP) $(NATIVE_STAMP)

## make run: the emulator and the gateway with config/gateway.toml, until Ctrl-C.
run: $(STAMP) $(NATIVE_STAMP)
	$(BIN)/python -m loadtest.stack --config config/gateway.toml

## make test: lint, types, then the whole suite, one process per core and one more (PYTEST_ARGS="-n 0": one),
## on the compiled path; then the tests of the per-read path again on the pure one.
# One worker more than cores: most tests wait on a process or a socket much of
# the time, and with one a core they left the CPU idle a third of the run.
PYTEST_ARGS ?= -n $(shell echo $$(( $$(nproc) + 1 )))
PURE_TESTS  ?= tests/test_sse.py tests/test_relay.py tests/test_wire.py tests/test_resume.py tests/test_native.py
test: $(STAMP)
	@# side by side: the compile (mypyc) and lint's type check take ~25 s each
	$(MAKE) --no-print-directory -j2 native lint node-deps
	$(BIN)/python -m pytest $(PYTEST_ARGS)
	CHATIQ_GATEWAY_NO_EXTENSIONS=1 $(BIN)/python -m pytest $(PYTEST_ARGS) $(PURE_TESTS)

# The Vercel AI SDK (npm package "ai") that the ai-sdk frontend's tests drive,
# when Node is there (without it those tests say so and skip, except in CI).
NODE_STAMP := tests/node/node_modules/.installed-stamp
$(NODE_STAMP): tests/node/package-lock.json
	cd tests/node && npm ci --no-audit --no-fund --silent
	touch $(NODE_STAMP)

node-deps:
	@if command -v npm >/dev/null; then $(MAKE) --no-print-directory $(NODE_STAMP); \
	else echo "node-deps: no npm here; the ai-sdk tests will skip"; fi

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

clean:
	find gateway -name '*.so' -delete; rm -f gateway/compiled.json
	rm -rf $(VENV) $(SCAN_VENV) build .pytest_cache .mypy_cache .ruff_cache .hypothesis tests/node/node_modules dist

## make dist: the wheel and the sdist in dist/ (pip install dist/chatiq_gateway-*.whl).
dist: $(STAMP)
	rm -rf dist
	@# both from the tree (not the wheel from the sdist): the wheel reuses the objects make compiled
	$(BIN)/python -m build --no-isolation --sdist --wheel --outdir dist .

## make image: the container image chatiq-gateway:<version> from the Dockerfile
## (buildah, or docker/podman; BASE=<image> for another Debian Python base).
IMAGE_TOOL ?= $(shell command -v buildah || command -v podman || command -v docker)
image: dist
	rm -rf dist/wheels
	# async-timeout too: redis-py wants it on a Python before 3.11.3 (Debian's is 3.11.2)
	$(BIN)/python -m pip wheel --quiet --wheel-dir dist/wheels dist/chatiq_gateway-*.whl "async-timeout>=4.0.3"
	$(IMAGE_TOOL) build $(if $(findstring buildah,$(IMAGE_TOOL)),--isolation chroot --format docker,) \
		$(if $(BASE),--build-arg BASE=$(BASE),) \
		-t chatiq-gateway:$$($(BIN)/python -c "from importlib.metadata import version; print(version('chatiq-gateway'))") .

## make base-image: a Debian bookworm Python base for make image, from Debian's
## own packages (debootstrap; as root), where no image registry is reachable.
base-image:
	root=$$(mktemp -d) && \
	debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
		bookworm "$$root" http://deb.debian.org/debian >/dev/null && \
	ctr=$$(buildah from scratch) && buildah copy --quiet $$ctr "$$root" / >/dev/null && \
	buildah commit --quiet $$ctr localhost/debian-python:bookworm >/dev/null && \
	buildah rm $$ctr >/dev/null && rm -rf "$$root" && \
	echo "base-image: localhost/debian-python:bookworm (make image BASE=localhost/debian-python:bookworm)"

## make scan: checkov over the Kubernetes manifests (as kubectl renders them)
## and the Dockerfile; deploy/checkov.yaml says why the checks it skips are.
SCAN_VENV := .venv-scan
CHECKOV   := checkov==3.3.30
scan:
	test -x $(SCAN_VENV)/bin/checkov || { $(PYTHON) -m venv $(SCAN_VENV) && \
		$(SCAN_VENV)/bin/python -m pip install --quiet --disable-pip-version-check $(CHECKOV); }
	kubectl kustomize deploy/kubernetes > $(SCAN_VENV)/kubernetes.yaml
	$(SCAN_VENV)/bin/checkov --config-file deploy/checkov.yaml \
		--file $(SCAN_VENV)/kubernetes.yaml --file Dockerfile

## make soak: 10,000 streams with faults and hang-ups through a real gateway (a few minutes).
soak: $(STAMP)
	$(BIN)/python -m loadtest.soak

## make chaos: Redis restarts and stalls, bursts, pings, bad input, a half-written reload, against two replicas (ARGS="--rounds 1").
chaos: $(STAMP)
	$(BIN)/python -m loadtest.chaos $(ARGS)

## make fleet: Redis, the emulator, two gateway replicas and HAProxy on :8080, until Ctrl-C.
fleet: $(STAMP)
	$(BIN)/python -m loadtest.fleet $(ARGS)

## make screenshot: the README's picture of the chat page (needs Chromium and the Noto fonts).
screenshot: $(STAMP)
	$(BIN)/python -m loadtest.screenshot $(ARGS)

## make stalled: 2,000 clients that stop reading 10 MB replies: memory each, CPU while stalled.
stalled: $(STAMP)
	$(BIN)/python -m loadtest.stalled $(ARGS)

## make profile: where one gateway process spends its CPU (py-spy), per stream and per event.
profile: $(STAMP)
	$(BIN)/python -m loadtest.profile $(ARGS)

## make instructions: CPU instructions per stream (callgrind; needs valgrind), ARGS="--rev HEAD~1" to compare.
instructions: $(STAMP)
	$(BIN)/python -m loadtest.instructions $(ARGS)

## make resumes: 1,000 resumable streams dropped and resumed (ARGS="--redis": on another replica).
resumes: $(STAMP)
	$(BIN)/python -m loadtest.resumes $(ARGS)

## make bench-observability: relay throughput with metrics and logging on vs off.
bench-observability: $(STAMP)
	$(BIN)/python -m loadtest.bench_observability

## make load: the Locust suite against make run's stack (starts it if needed).
## Pass options with ARGS, e.g. make load ARGS="--users 100 --run-time 2m --max-ttft-p99-ms 1500"
load: $(STAMP)
	$(BIN)/python -m loadtest.load $(ARGS)

## make bench: gateway vs direct vs nginx vs a naive proxy, side by side (installs nginx if missing).
## Options with ARGS, e.g. make bench ARGS="--levels 1,100 --hold 0"
bench: $(STAMP)
	$(BIN)/python -m loadtest.bench $(ARGS)
