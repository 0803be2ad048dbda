# The project's own set-up. README shows two commands: `make demo` and `make test`.
# On a fresh Debian 12 machine as root these install mlserve and everything it needs.

PYTHON ?= python3
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c

.PHONY: install setup demo test lint bench kube

install:
	$(PYTHON) -m pip install -e '.[test]'

setup: install
	$(PYTHON) -m mlserve setup

demo: setup
	@echo '+ cd examples/hello && mlserve run --mode serve'
	@log=$$(mktemp); trap 'rm -f "$$log"' EXIT; \
	  (cd examples/hello && $(PYTHON) -m mlserve run --mode serve) | tee "$$log"; \
	  url=$$(sed -n 's/^URL to project endpoint: //p' "$$log"); \
	  echo; echo "Try it:  curl -F file=@README.md $$url"

# The browser test drives Debian's chromium through chromium-driver (Selenium); certutil (libnss3-tools)
# makes it trust the gateway's self-signed CA.
BROWSER := /usr/bin/chromium /usr/bin/chromedriver /usr/bin/certutil

test: setup lint $(BROWSER) kube
	$(PYTHON) -m pytest -ra tests

# Lint and types. mypy sees the installed package names (mlserve = cli/, mlserve_runtime = runtime/)
# through the links in .mypy/.
lint: install
	$(PYTHON) -m ruff check cli runtime tests bench
	$(PYTHON) -m mypy -p mlserve -p mlserve_runtime

# The cluster tests (tests/cluster) run a real Kubernetes 1.20 control plane: the script builds it from Debian's
# source package once per machine (~10 min) and caches it under /var/cache/mlserve; later runs take seconds.
kube:
	tests/cluster/build-kubernetes

$(BROWSER) &:
	DEBIAN_FRONTEND=noninteractive apt-get update -q -o DPkg::Lock::Timeout=300
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends -o DPkg::Lock::Timeout=300 \
	  chromium chromium-driver libnss3-tools

bench: setup
	$(PYTHON) bench/run.py
