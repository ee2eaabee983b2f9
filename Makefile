# Two entry points on a fresh machine: `make demo` and `make test`. Both create .venv when missing.
# torch goes in first and alone (the CPU wheel); everything else is held to constraints.txt so no
# package can pull another torch or CUDA wheels; DeepSpeed builds against that torch, ops off.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo demo-quick test bench clean

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	DS_BUILD_OPS=0 $(PY) -m pip install --quiet --no-build-isolation -c constraints.txt deepspeed
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) -m examples.estimate examples/toy.yaml
	$(VENV)/bin/lifecycle run examples/toy.yaml
	$(VENV)/bin/lifecycle status examples/toy.yaml
	$(VENV)/bin/lifecycle report examples/toy.yaml
	@echo "Browse every run, metric and checkpoint: $(VENV)/bin/lifecycle ui  (http://127.0.0.1:5000)"
	@echo "The home's Prefect server stays up for the next commands; $(VENV)/bin/lifecycle stop stops it."

# the same lifecycle on a smaller world and model: every stage in a minute or two
demo-quick: install
	$(VENV)/bin/lifecycle run examples/quick.yaml
	$(VENV)/bin/lifecycle report examples/quick.yaml

test: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest

bench: install
	$(PY) -m pip install --quiet -c constraints.txt -e '.[bench]'
	$(PY) -m bench.startup
	$(PY) -m bench.pipeline
	$(PY) -m bench.alignment
	$(PY) -m bench.generate
	$(PY) -m bench.threads
	$(PY) -m bench.distributed
	$(PY) -m bench.grpo
	$(PY) -m pip install --quiet --no-deps --target $(VENV)/trl-1.12.0 trl==1.12.0  # the last TRL with a PPOTrainer
	$(PY) -m bench.ppo --trl $(VENV)/trl-1.12.0
	$(PY) -m bench.transfer

clean:
	rm -rf .lifecycle
