# The two commands a newcomer needs: `make up` and `make test`. Both install what is
# missing first (compose/bootstrap.sh: apt packages, Kafka jars via Maven, the venv).

VENV := .venv
BIN := $(VENV)/bin

.PHONY: up test lint lock bench bench-latency bench-fault bench-tail bench-failover chaos bootstrap clean model docs

bootstrap:
	@bash compose/bootstrap.sh

up: bootstrap
	$(BIN)/switchyard up

test: bootstrap lint
	$(BIN)/python -m pytest -q

lint: bootstrap
	$(BIN)/ruff check .
	$(BIN)/mypy .
	$(BIN)/lint-imports

# Move compose/constraints.txt (the versions bootstrap installs) to the newest releases: a
# throwaway venv, unconstrained, frozen. Then `make test`, and commit the file if it passes.
lock: bootstrap
	rm -rf .venv-lock && python3 -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q -e '.[dev]'
	{ sed -n '/^#/p' compose/constraints.txt; .venv-lock/bin/python -m pip freeze --exclude-editable \
	  | grep -v -E '^(pip|setuptools|wheel)=='; } > compose/constraints.txt.new
	mv compose/constraints.txt.new compose/constraints.txt && rm -rf .venv-lock

# Switchyard against LiteLLM proxy, alternately in one run (installs LiteLLM in its own venv).
bench: bootstrap
	$(BIN)/python -m bench.compare

# The latency Switchyard adds over the upstream, streaming and not.
bench-latency: bootstrap
	$(BIN)/python -m bench.latency

# A provider SIGKILLed under load and restarted: failover, circuit breaker, recovery.
bench-fault: bootstrap
	$(BIN)/python -m bench.fault

# The provider fault catalogue (429, 5xx, resets, silence, cut and broken streams, context
# length, content filter), each with and without a fallback chain, and a primary's outage.
bench-failover: bootstrap
	$(BIN)/python -m bench.failover

# Heavy-tailed TTFT: one route vs speculative racing (2, 3 routes) vs hedging at p90.
bench-tail: bootstrap
	$(BIN)/python -m bench.tail

# The fault suite: Redis, Kafka, PostgreSQL killed and paused, a router and the usage worker
# killed, each under load on one stack; no hang, no silent truncation, the ledger exact.
chaos: bootstrap
	$(BIN)/python -m bench.chaos

# Retrain the prompt classifier. The linear model first (seconds; byte-identical for the same
# data and library versions): workers/classifier/model/prompt-classifier-v1.*. Then the
# encoder fine-tuned behind it (about 40 minutes on 2 cores), exported, quantized, its cascade
# threshold and blend chosen on dev: prompt-encoder-v1.*. PyTorch from PyPI is the CUDA build
# (~3 GB of wheels, run on the CPU): it goes into .venv-model, never into the serving venv.
model: bootstrap
	$(BIN)/python -m pip install -q -e '.[train]'
	$(BIN)/python -m workers.classifier.train
	test -x .venv-model/bin/python || python3 -m venv .venv-model
	.venv-model/bin/python -m pip install -q -e '.[train,finetune]'
	.venv-model/bin/python -m workers.classifier.finetune

# Rewrite the generated blocks of docs/ (routes, configuration, error codes) from the code;
# `python -m compose.reference --check` only compares (tests/test_reference_docs.py runs it).
docs: bootstrap
	$(BIN)/python -m compose.reference

clean:
	rm -rf .stack bench/out
