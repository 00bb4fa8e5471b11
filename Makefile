# segflow developer targets. Everything goes through ./run, which bootstraps .venv first.
.DEFAULT_GOAL := help
.PHONY: help demo test unit integration lint format typecheck bench bench-e2e broker-start broker-stop broker-status schemas

help: ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-15s %s\n", $$1, $$2}'

demo: ## run the demo on the local broker (the README's first command)
	./run demo

test: ## the whole test suite, real-broker tests included (the README's second command)
	./run test

unit: ## tests that need no broker
	./run test -m "not broker"

integration: ## real-broker tests only
	./run test -m broker

lint: ## ruff lint and format check
	./run --version >/dev/null && .venv/bin/ruff check . && .venv/bin/ruff format --check .

format: ## ruff format
	./run --version >/dev/null && .venv/bin/ruff format . && .venv/bin/ruff check --fix .

typecheck: ## mypy (strict on the cores and the shared runtime)
	./run --version >/dev/null && .venv/bin/mypy segflow services

bench: ## benchmarks that print numbers (each starts its own broker where it needs one)
	./run --version >/dev/null && for b in loop simulator identity scorer segmenter dispatcher; do \
	  echo "== bench_$$b"; .venv/bin/python bench/bench_$$b.py || exit 1; done

bench-e2e: ## the four services end to end: sustainable events/s, latency, memory, state (~5 min)
	./run --version >/dev/null && .venv/bin/python bench/bench_e2e.py

broker-start: ## start the local Kafka broker and create the topics
	./run broker start

broker-stop: ## stop the local Kafka broker
	./run broker stop

broker-status: ## is the local broker running?
	./run broker status

schemas: ## check the Avro contract
	./run schemas
