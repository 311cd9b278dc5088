# The two commands of the README: `make demo` and `make test`. Each creates .venv when missing and installs
# medkd (editable) with its dependencies; torch is pinned first so that the CPU wheel is used where available.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.medkd-installed
# MONAI Label (docs/monai_label.md) lives in its own environment: it needs torchvision, numpy<2 and old pydicom pins.
LABEL_VENV ?= .venv-label
LABEL_STAMP := $(LABEL_VENV)/.medkd-label-installed

.PHONY: demo test test-slow install clean label-env test-label

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m medkd demo --out demo_results

test: $(STAMP)
	$(PY) -m pytest -m "not slow" -q

test-slow: $(STAMP)
	$(PY) -m pytest -m slow -q || test $$? -eq 5  # 5: no slow tests collected

label-env: $(LABEL_STAMP)

$(LABEL_STAMP): tools/monai_label/install_env.sh
	PYTHON=$(PYTHON) bash tools/monai_label/install_env.sh $(LABEL_VENV)
	touch $(LABEL_STAMP)

# The MONAI Label tests with a real server; `make test` skips them (they need MEDKD_LABEL_VENV).
test-label: $(STAMP) $(LABEL_STAMP)
	MEDKD_LABEL_VENV=$(abspath $(LABEL_VENV)) $(PY) -m pytest -q tests/test_monai_label.py

clean:
	rm -rf $(VENV) $(LABEL_VENV) demo_results .pytest_cache
