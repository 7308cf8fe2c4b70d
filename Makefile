# The two commands a newcomer runs: `make demo` and `make test`. Both set up .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup browser demo test lint bench clean

setup: $(STAMP)

# torch is installed first and pinned: an unpinned torch (or anything that pulls torchvision)
# resolves a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[app,dev]'
	touch $(STAMP)

demo: setup
	$(BIN)/sd-lora train --config examples/demo.toml $(if $(wildcard runs/demo/checkpoint-*),--resume,)
	$(BIN)/sd-lora generate --base toy --lora runs/demo/demo.safetensors:1.0 --prompt "zkpastel, three purple triangles on an orange background" --seed 1 --output runs/demo/generated.png
	$(BIN)/sd-lora inspect runs/demo/demo.safetensors
	@printf '\nquality report: runs/demo/report.png\ntry it in the browser: $(BIN)/sd-lora app --adapters runs/demo\n'

# One pytest worker per core (pytest-xdist); a test file's tests stay on one worker, so its
# module-scoped fixtures (the toy-world trainings) are built once; files start in the order
# tests/conftest.py gives them (the longest first).
TEST_WORKERS ?= 2

test: setup browser
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# The app's browser tests drive Debian's chromium through the playwright package (which cannot
# download its own browsers here). Install it when missing and apt-get can (root, or sudo
# without a password); never fail: without chromium those tests skip and say why.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1; then \
	    if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO="sudo -n"; fi; \
	    echo "installing Debian's chromium for the browser tests (apt-get)"; \
	    { $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium; } >/dev/null 2>&1 \
	      || echo "note: could not install chromium; the browser tests will skip"; \
	  else \
	    echo "note: no chromium and no apt-get; the browser tests will skip"; \
	  fi; }

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python bench/train_speed.py

clean:
	rm -rf runs .pytest_cache
