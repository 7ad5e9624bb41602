# The two commands of the README: `make demo` and `make test`. Both install what is missing first.
SHELL := /bin/bash
TESTS_UNIT := dist/test/unit/*.test.js
TESTS_INTEGRATION := dist/test/integration/*.test.js

.PHONY: setup build demo test test-unit test-faults lint format check bench bench-small clean

setup:
	bash scripts/setup.sh

build:
	npm run --silent build

demo: setup
	node dist/scripts/demo.js

lint:
	npx --no-install eslint src test bench scripts
	npx --no-install prettier --check src test bench scripts

format:
	npx --no-install prettier --write src test bench scripts

# Type-check (the build), lint, formatting, then every test against real qemu, SQLite and FUSE.
test: setup lint
	node --test --test-concurrency=1 $(TESTS_UNIT) $(TESTS_INTEGRATION)

test-unit: setup
	node --test $(TESTS_UNIT)

# Power loss in full: cut the power (powerfs, a FUSE layer that keeps only what was fsynced) at every
# fsync boundary of init+full, inc, forget, gc, rebuild, verify and restore, plus seeded random points.
test-faults: setup
	BKFS_POWERLOSS=full node --test --test-concurrency=1 dist/test/unit/powerfs.test.js dist/test/integration/powerloss.test.js

bench: setup
	bash bench/run

bench-small: setup
	bash bench/run --small

clean:
	rm -rf dist
