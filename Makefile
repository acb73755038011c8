# The two commands a newcomer needs: `make demo` and `make test`.
# Both create .venv/ at the repo root when missing and install the pinned set
# (requirements.lock) first; re-running installs nothing unless the pins change.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
ARGS   ?=
PYTEST_ARGS ?=
# Integration tests mostly wait on brokers and workers: two processes, each file whole
# (module fixtures run once), keep the suite well inside CI's budget on 2 cores.
XDIST ?= -n 2 --dist loadfile

.PHONY: demo test install lock bench clean

$(STAMP): pyproject.toml requirements.lock
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -c requirements.lock -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/riskgate demo $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(XDIST) $(PYTEST_ARGS)

bench: $(STAMP)
	$(VENV)/bin/riskgate bench calibrate

# Re-pin after changing dependencies in pyproject.toml.
lock:
	rm -rf .lockenv && $(PYTHON) -m venv .lockenv
	.lockenv/bin/python -m pip install --quiet --upgrade pip
	.lockenv/bin/python -m pip install --quiet '.[dev]'
	.lockenv/bin/python -m pip freeze --exclude riskgate | grep -v '^-e' > requirements.lock
	rm -rf .lockenv

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
