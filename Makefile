# The two commands of the README: `make demo` and `make test` (plus `make bench`).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build by default; set TORCH_SPEC=torch (or a CUDA wheel) on a GPU machine.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test install install-test sample-data bench clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Stamps: .installed = the runtime dependencies (all that `make demo` needs); .installed-test = those plus the
# test extras (slicer-core with VTK, pytest, ...), for `make test`. Both follow pyproject.toml.
$(VENV)/.installed: $(BIN)/activate pyproject.toml
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

# The real chest CTs (pyradiomics 3.0.1 sample data, BSD-3), cached and checksum-verified.
sample-data: install
	$(BIN)/python -m LungUDRNetLib.sample_data

demo: sample-data
	$(BIN)/lungudrnet demo --out demo_output

# Tests that need the real CTs skip with a reason when the download is not possible.
test: install-test
	-$(BIN)/python -m LungUDRNetLib.sample_data
	$(BIN)/python -m pytest -q

# UDRNet against elastix, ANTs, SimpleITK and VoxelMorph on the same pairs: bench_results/results.md, .csv, .png.
bench: sample-data
	$(BIN)/python -m pip install --quiet -e ".[test,bench]"
	$(BIN)/python -m pip install --quiet --no-deps antspyx==0.6.3
	$(BIN)/lungudrnet bench --out bench_results

clean:
	rm -rf $(VENV) demo_output .pytest_cache
