# ijepa_viz: `make demo` runs the main job offline, `make test` runs every test. Both create .venv if missing.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export MPLBACKEND := Agg

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

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks/

bench: $(STAMP)
	$(VENV)/bin/ijepa-viz bench --json benchmarks/results/bench_cpu-tiny.json

quality: $(STAMP)
	$(PY) benchmarks/quality.py

ablations: $(STAMP)
	$(PY) benchmarks/ablations.py --epochs 1 --set optim.warmup_epochs=0.1

clean:
	rm -rf runs/demo .pytest_cache
