# `make demo`: set up .venv and start the dashboard on the embedded Biased Digits demo.
# `make test`: same set-up, then the test suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONSTRAINTS ?= constraints.txt
PORT ?= 8501

.PHONY: demo test setup clean assets

setup: $(STAMP)

$(STAMP): requirements.txt $(CONSTRAINTS) pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/streamlit run app.py --server.port $(PORT) --server.headless true --browser.gatherUsageStats false

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .cfdebug .pytest_cache

# `make assets`: retrain the shipped demo models (assets/models/demo-cnn_<bed>.pt + .json) from scratch.
assets: $(STAMP)
	$(PY) -c "from cfdebug.workspace import write_demo_assets; write_demo_assets()"
