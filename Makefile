# `make demo` and `make test` set up .venv (Python >= 3.12, found explicitly) and run.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench bench-moe bench-mix bench-hf clean

$(STAMP): setup.py
	@bash scripts/make_venv.sh $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m btx_jax.recipe --config configs/btx_demo.py --workdir runs/btx

test: $(STAMP)
	$(PY) -m pytest tests -q -n 2 --dist loadgroup --durations=15

bench: $(STAMP)
	$(PY) bench/train_step.py

bench-moe: $(STAMP)
	$(PY) bench/moe_layer.py

bench-mix: $(STAMP)
	$(PY) bench/mix.py

bench-hf: $(STAMP)
	$(PY) bench/hf.py

clean:
	rm -rf $(VENV) runs data
