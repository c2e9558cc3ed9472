# The two commands of the README: `make repro` (set up, then the whole pipeline) and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup data repro repro-gpu test lint clean

$(BIN)/cdiff: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(BIN)/cdiff

setup: $(BIN)/cdiff data

# Fashion-MNIST: Debian's package where apt and root are there, else torchvision's download at prepare time.
data:
	@if [ -d /usr/share/datasets/fashion-mnist ]; then echo "Fashion-MNIST: /usr/share/datasets/fashion-mnist"; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  (apt-get install -y -qq dataset-fashion-mnist || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)); \
	else echo "Fashion-MNIST: no apt/root here; it is downloaded at prepare time (data.download: true)"; \
	  $(BIN)/python -c "import torchvision; torchvision.datasets.FashionMNIST('data/raw', download=True)"; fi

repro: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

# The GPU profile: params-gpu.yaml's values over params.yaml (dvc exp run -S ...), then the whole pipeline.
repro-gpu: setup
	eval "PATH=\"$(CURDIR)/$(BIN):$$PATH\" $(BIN)/dvc exp run $$($(BIN)/python -m pipelines.core.overlay params-gpu.yaml)"

test: setup
	$(BIN)/python -m pytest -q -n 2 --durations=15

lint: $(BIN)/cdiff
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV)
