# `make demo [ROOTS="DIR …"]`: set up .venv and start the dashboard on the embedded Biased Digits demo (this machine only;
#   folders typed in its sidebar open wherever they are; ROOTS are folders a link may open too).
# `make serve HOST=0.0.0.0 [ROOTS="DIR …"] [READ_ONLY=1]`: the same, shared on purpose (see README, Sharing).
# `make test`: same set-up, then the whole test suite; `make test-fast`: without the tests marked slow (for development).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONSTRAINTS ?= constraints.txt
PORT ?= 8501
HOST ?= 127.0.0.1
ROOTS ?=
READ_ONLY ?=
space := $(subst ,, )

.PHONY: demo serve test test-fast setup clean assets results results-biased-digits results-hard-digits

setup: $(STAMP)

$(STAMP): requirements.txt $(CONSTRAINTS) pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(if $(strip $(ROOTS)),CFDEBUG_ROOTS="$(subst $(space),:,$(strip $(ROOTS)))") $(VENV)/bin/streamlit run app.py --server.address 127.0.0.1 --server.port $(PORT) --server.headless true --browser.gatherUsageStats false

serve: $(STAMP)
	$(PY) -m cfdebug serve --host $(HOST) --port $(PORT) $(foreach root,$(ROOTS),--root $(root)) $(if $(filter-out 0 no false off,$(READ_ONLY)),--read-only)

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) .cfdebug .pytest_cache

# `make assets`: retrain the shipped demo models (assets/models/demo-cnn_<bed>.pt + .json) from scratch.
assets: $(STAMP)
	$(PY) -c "from cfdebug.workspace import write_demo_assets; write_demo_assets()"

# `make results`: the verdict tables of docs/RESULTS.md and the README, regenerated from `report` runs
# (3 seeds each; XCR's corruptions at severity 3; every revise method). On Hard Digits the treatment pair is chosen on
# validation accuracy from a small grid (the study); the demo uses the paper-faithful default pair.
RESULTS_XCR := --severities 3
# Revise: every method, with the demo's corner square as the region and the 8 most class-specific
# filters (on Hard Digits the same square and filters, where a fix must do no harm).
RESULTS_REVISE := --method all --region 1,1,7,7 --filters top:8
results: results-biased-digits results-hard-digits
results-biased-digits: $(STAMP)
	$(PY) -m cfdebug report --data biased-digits $(RESULTS_XCR) --markdown docs/RESULTS.md --markdown-verdicts README.md
	$(PY) -m cfdebug report --data biased-digits --claims revise $(RESULTS_REVISE) --section biased-digits-revise --markdown docs/RESULTS.md --markdown-verdicts README.md
results-hard-digits: $(STAMP)
	$(PY) -m cfdebug report --data hard-digits $(RESULTS_XCR) --lambda1 1e-4,1e-2,1e-1 --lambda2 1e-5,1e-3 --markdown docs/RESULTS.md --markdown-verdicts README.md
	$(PY) -m cfdebug report --data hard-digits --claims revise $(RESULTS_REVISE) --section hard-digits-revise --markdown docs/RESULTS.md --markdown-verdicts README.md
