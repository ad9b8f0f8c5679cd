# A fresh clone needs nothing but python3 and make: every target creates or reuses .venv.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# GPU=1 installs onnxruntime-gpu instead of onnxruntime (the two cannot share one environment).
RUNTIME := $(if $(GPU),gpu,cpu)
EXTRAS  ?= $(RUNTIME),models,dev
comma   := ,
STAMP   := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))
PYTEST_ARGS ?=

.PHONY: install models run test rtsp-test-deps deploy-test-tools bench bench-adaptive bench-cameras soak eval lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[$(EXTRAS)]"
	@rm -f $(VENV)/.installed-*; touch $@

# Builds the default models into models/<name>/<version>/ (cached: skipped when present).
models: install
	$(BIN)/python models/build.py

# Embedded broker + worker + demo producer; prints verdicts as they arrive. Ctrl-C stops all.
run: models
	$(BIN)/inferstream demo --keep-running

test: models rtsp-test-deps deploy-test-tools
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The camera tests serve a clip with GStreamer's RTSP server: Debian packages bound to Debian's own
# /usr/bin/python3 (tests/rtsp_server.py). Installed when missing (root, or sudo); if that fails,
# those tests fail with the reason (never skipped) and the rest of the suite still runs.
RTSP_TEST_PACKAGES := python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-base \
	gstreamer1.0-plugins-good gstreamer1.0-plugins-bad gstreamer1.0-libav
rtsp-test-deps:
	@/usr/bin/python3 tests/rtsp_server.py --check 2>/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  echo "installing GStreamer's RTSP server for the camera tests: $(RTSP_TEST_PACKAGES)"; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq \
	    --no-install-recommends $(RTSP_TEST_PACKAGES) >/dev/null \
	  && /usr/bin/python3 tests/rtsp_server.py --check \
	  || echo "WARNING: GStreamer's RTSP server is not installed: tests/test_cameras.py will fail" >&2; }

# The deployment tests run shellcheck on every shell script, promtool on the Prometheus config and
# rules, and a real Prometheus scraping a worker (tests/test_integration_prometheus.py); the Docker
# images preload jemalloc, and tests/test_memory.py runs a process on it: Debian's shellcheck,
# prometheus and libjemalloc2 packages, installed when missing like the RTSP server above. If that
# fails, those tests fail with the reason (never skipped) and the rest of the suite still runs.
DEPLOY_TEST_TOOLS := shellcheck promtool prometheus
DEPLOY_TEST_LIBS := libjemalloc.so.2
DEPLOY_TEST_TOOLS_PRESENT := (for tool in $(DEPLOY_TEST_TOOLS); do command -v $$tool >/dev/null || exit 1; done; \
	for lib in $(DEPLOY_TEST_LIBS); do /sbin/ldconfig -p | grep -q "[[:space:]]$$lib " || exit 1; done)
deploy-test-tools:
	@$(DEPLOY_TEST_TOOLS_PRESENT) || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  echo "installing shellcheck, prometheus (with promtool) and libjemalloc2 for the deployment tests"; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq \
	    --no-install-recommends shellcheck prometheus libjemalloc2 >/dev/null \
	  && $(DEPLOY_TEST_TOOLS_PRESENT) \
	  || echo "WARNING: $(DEPLOY_TEST_TOOLS) $(DEPLOY_TEST_LIBS) not all installed: tests/test_deploy.py," \
	    "tests/test_integration_prometheus.py and tests/test_memory.py will fail" >&2; }

bench: models
	$(BIN)/python bench/record_path.py
	$(BIN)/python bench/frames_throughput.py
	$(BIN)/python bench/models_throughput.py
	$(BIN)/python bench/events_throughput.py

# Step load (30% -> 200% -> 30% of capacity): the best fixed batching (swept first), the controller, the ladder (~20 min)
bench-adaptive: models
	$(BIN)/python bench/adaptive.py

# Live cameras: cameras per ingester at 5 fps 640x480, memory under a 60 s broker stall, reconnect times (~20 min)
bench-cameras: install rtsp-test-deps
	$(BIN)/python bench/cameras.py

# Soak: two workers, frames + posts + events at 70% of the measured capacity, kill -9 / broker frozen /
# poison / hot swap on a schedule (10 min + ~3 min of capacity and drain; SOAK_ARGS="--minutes 60")
soak: models
	$(BIN)/python bench/soak.py $(SOAK_ARGS)

# PII evaluation: our NER model + recognizers vs Presidio on tests/data/pii_eval.jsonl -> bench/results/pii_eval.json
eval: models
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[$(RUNTIME),eval]"
	$(BIN)/python bench/pii_eval.py

lint: install
	$(BIN)/ruff check streams operators models tests bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
