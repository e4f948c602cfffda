# ijepa_viz: `make demo` runs the main job offline, `make test` runs every test. Both create .venv if missing.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# JupyterLab on notebooks/. Jupyter refuses to start as root (as in most containers) without --allow-root.
# On a machine without a browser it prints the URL to open. tests/test_browser.py runs `make lab` itself and
# passes its port, token and settings through the environment and a Jupyter config dir, not on this line.
LAB    = $(VENV)/bin/jupyter lab $(if $(filter 0,$(shell id -u)),--allow-root) notebooks/

.PHONY: install demo test test-fast lab bench quality ablations clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (ijepa_viz)" >/dev/null
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ijepa-viz demo

# Unit and integration tests, then every notebook in quick mode under nbval.
test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests
	IJEPA_VIZ_QUICK=1 $(PY) -m pytest -q -p no:cacheprovider --nbval-lax notebooks

test-fast: $(STAMP)
	$(PY) -m pytest -q -x -m "not slow and not browser" tests

# Agg for the test processes only: a kernel inherits its server's environment, and with MPLBACKEND=Agg every
# plt.show() in JupyterLab draws nothing. The browser test removes it again before it runs `make lab`.
test test-fast: export MPLBACKEND := Agg

lab: $(STAMP)
	$(LAB)

bench: $(STAMP)
	$(VENV)/bin/ijepa-viz bench --json benchmarks/results/bench_cpu-tiny.json

# Both train on real CIFAR-10: IJEPA_VIZ_CIFAR10=path/to/cifar10 (an ImageFolder tree) make quality
quality: $(STAMP)
	$(PY) benchmarks/quality.py

ablations: $(STAMP)
	$(PY) benchmarks/ablations.py --epochs 1 --set optim.warmup_epochs=0.1

clean:
	rm -rf runs/demo .pytest_cache
