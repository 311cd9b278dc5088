# The two commands of the README: `make demo` and `make test`. Each creates .venv when missing and installs
# medkd (editable) with its dependencies; torch is pinned first so that the CPU wheel is used where available.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.medkd-installed

.PHONY: demo test test-slow install clean

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

clean:
	rm -rf $(VENV) demo_results .pytest_cache
