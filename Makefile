# The two commands: `make run` (set up if needed, then serve the app) and `make test`.
# `make compare` (PRESET=small|full) benchmarks pdserve against its baselines (benchmarks/compare.py).
.PHONY: setup run test lint compare notebooks

setup:
	@bash scripts/setup.sh

# `pdserve serve-env`: Serve's settings for pdserve (HAProxy ingress, ...; app/serve_env.py says why), the
# environment's values winning.
run: setup
	env $$(.venv/bin/pdserve serve-env) .venv/bin/serve run serve_config.yaml

test: setup
	.venv/bin/python -m pytest $(PYTEST_ARGS)

# Jupyter on notebooks/, with this repo's .venv as the kernel (the `notebooks` extra, installed by setup).
notebooks: setup
	.venv/bin/jupyter lab notebooks/

lint: setup
	.venv/bin/ruff check .

PRESET ?= small
compare: setup
	.venv/bin/python -m pip install -q -e ".[raysllm]"
	.venv/bin/python benchmarks/compare.py --preset $(PRESET)
