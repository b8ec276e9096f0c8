# The two commands of the README: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build by default; set TORCH_SPEC=torch (or a CUDA wheel) on a GPU machine.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test install bench clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/activate pyproject.toml
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/lungudrnet demo --out demo_output

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) demo_output .pytest_cache
