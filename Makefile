# Two entry points (see README.md): `make demo` runs the whole system on an embedded default scene,
# `make test` runs the test suite. Both set themselves up first (idempotent) and run every ROS process inside
# a loopback-only network namespace.
.PHONY: setup demo test test-unit bench clean

setup:
	@scripts/setup.sh

demo: setup
	@scripts/netns.sh .venv/bin/python -m mm_llm_ros.demo

test: setup
	@scripts/netns.sh .venv/bin/python -m pytest $(PYTEST_ARGS)

test-unit: setup
	@.venv/bin/python -m pytest mm_llm_ros/test/unit $(PYTEST_ARGS)

bench: setup
	@scripts/netns.sh .venv/bin/python bench/encoders.py
	@scripts/netns.sh .venv/bin/python bench/llm.py

clean:
	rm -rf build install log
