# Two entry points for a fresh clone: `make demo` and `make test`. Both build .venv first, from the lock file.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.vps-installed
LOCK := requirements.lock
# The lock is resolved for this machine kind (Linux x86_64, CPython 3.11); /opt/wheels holds the CPU build of
# torch, which PyPI does not serve (a bare `torch` from PyPI is a multi-GB CUDA build).
FIND_LINKS ?= /opt/wheels
UV_COMPILE = $(BIN)/uv pip compile pyproject.toml --extra dev --python-version 3.11 \
	--python-platform x86_64-manylinux_2_28 --find-links $(FIND_LINKS) --no-strip-extras --quiet
DEMO_QUESTION ?= Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did Natalia sell altogether in April and May?

.PHONY: install demo test test-latest test-oldest lock lint typecheck bench clean

# Exactly the locked versions (hash-checked), then the package itself without resolving anything again.
$(STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --no-deps --require-hashes -r $(LOCK)
	$(BIN)/pip install --quiet --no-deps -e .
	$(BIN)/pip check
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/vps generate --compare --max-new-tokens 200 "$(DEMO_QUESTION)"

test: install
	$(BIN)/python -m pytest -q

# Re-resolve the lock from pyproject.toml's ranges (after raising a bound that `make test-latest` passed on).
lock: install
	$(UV_COMPILE) --generate-hashes --upgrade -o $(LOCK)

# The suite on the newest versions pyproject.toml allows, in a separate environment; the resolved versions
# are kept in .venv-latest/resolved.txt.
test-latest: install
	rm -rf .venv-latest && $(PYTHON) -m venv .venv-latest
	$(UV_COMPILE) --upgrade -o .venv-latest/resolved.txt
	.venv-latest/bin/pip install --quiet -r .venv-latest/resolved.txt
	.venv-latest/bin/pip install --quiet --no-deps -e .
	.venv-latest/bin/python -m pytest -q -p no:cacheprovider

# The suite on the oldest transformers pyproject.toml allows (everything else as resolved for it).
test-oldest: install
	rm -rf .venv-oldest && $(PYTHON) -m venv .venv-oldest
	floor=$$($(BIN)/python -c "import re,tomllib; d=tomllib.load(open('pyproject.toml','rb'))['project']['dependencies']; print(next(re.search(r'>=([^,]+)', x).group(1) for x in d if x.startswith('transformers')))"); \
	echo "transformers==$$floor" > .venv-oldest/override.txt
	$(UV_COMPILE) --override .venv-oldest/override.txt -o .venv-oldest/resolved.txt
	.venv-oldest/bin/pip install --quiet -r .venv-oldest/resolved.txt
	.venv-oldest/bin/pip install --quiet --no-deps -e .
	.venv-oldest/bin/python -m pytest -q -p no:cacheprovider

lint: install
	$(BIN)/ruff check src tests benchmarks examples

# mypy with the project's interpreter, so torch's, numpy's and transformers' own annotations are checked.
typecheck: install
	$(BIN)/mypy --config-file mypy.ini src/vps

bench: install
	$(BIN)/python benchmarks/bench_overhead.py

clean:
	rm -rf $(VENV) .venv-latest .venv-oldest build *.egg-info src/*.egg-info
