# Two commands a new machine needs: `make demo` and `make test`. Both bootstrap themselves.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
PYTEST_ARGS ?=

.PHONY: help venv venv-full sysdeps sysdeps-pg sysdeps-mqtt sysdeps-java kafka-jars registry-jars mes-consumer sysdeps-test sysdeps-browser demo test lint bench clean

help:
	@echo "make demo   - run the line: local stack, cameras (one through the edge gateway and MQTT), workers, PostgreSQL sink (Ctrl-C stops)"
	@echo "make test   - the whole test suite against Apache Kafka, PostgreSQL and S3 (moto), all real"
	@echo "make bench  - sqis bench pipeline --json"

$(VENV)/.base: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[dashboard,edge]'
	@touch $@

# The train extra pins torch==2.14.1/torchvision==0.29.1 (see README: on this machine pip takes both from local disk).
$(VENV)/.full: $(VENV)/.base pyproject.toml
	$(PIP) install -q -e '.[train,sam,test,edge]'  # edge: paho-mqtt; sam: segment-anything for the SAM export tests (#11)
	@touch $@

venv: $(VENV)/.base
venv-full: $(VENV)/.full

# The embedded stack's servers: PostgreSQL (Debian's package), Java 17 and Maven for Apache Kafka,
# each installed only when missing; then the Kafka jars and the schema registry (Apicurio), resolved
# from Maven Central into a cache.
sysdeps: sysdeps-pg sysdeps-mqtt sysdeps-java kafka-jars registry-jars

sysdeps-java:
	@if ! command -v java >/dev/null 2>&1 || ! command -v mvn >/dev/null 2>&1; then \
	  echo "installing Java 17 and Maven (apt)"; \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openjdk-17-jre-headless maven >/dev/null; \
	  else sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openjdk-17-jre-headless maven >/dev/null; fi; \
	fi

# Apache Kafka's jars (infra/broker/pom.xml) into ~/.cache/sqis/kafka-<version>/lib, once per machine.
kafka-jars: venv sysdeps-java
	@$(PY) -c "from infra.kafka_broker import ensure_jars; print('kafka jars:', ensure_jars())"

# Apicurio Registry's distribution (runner jar + lib/) into ~/.cache/sqis/apicurio-registry-<version>, once per machine.
registry-jars: venv sysdeps-java
	@$(PY) -c "from infra.registry_server import ensure_dist; print('registry:', ensure_dist())"

# The stock Java MES consumer (docs/examples/mes-consumer-java) that tests/test_schema_registry.py runs.
# Needs a JDK (javac), which sysdeps-java's JRE lacks: openjdk-17-jdk-headless, only when missing.
mes-consumer: sysdeps-java
	@if ! command -v javac >/dev/null 2>&1; then \
	  echo "installing the JDK for the Java MES consumer (apt)"; \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openjdk-17-jdk-headless >/dev/null; \
	  else sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openjdk-17-jdk-headless >/dev/null; fi; \
	fi
	@test -f docs/examples/mes-consumer-java/target/mes-consumer-1.0.jar || \
	  (cd docs/examples/mes-consumer-java && mvn -q -B package -DskipTests)

sysdeps-pg:
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
	  echo "installing PostgreSQL server binaries (apt)"; \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
	  else sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; fi; \
	fi

# mosquitto (Debian's package) for the stack's MQTT broker (edge devices, PLC verdicts), only when missing.
sysdeps-mqtt:
	@if ! command -v mosquitto >/dev/null 2>&1 && ! test -x /usr/sbin/mosquitto; then \
	  echo "installing mosquitto (apt)"; \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null; \
	  else sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null; fi; \
	fi

# What only the tests need: Prometheus (+ promtool) for tests/test_deploy_prometheus.py and headless
# Chromium for the dashboard's browser tests, each installed only when missing.
sysdeps-test: sysdeps-browser mes-consumer
	@if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then \
	  echo "installing prometheus (apt)"; \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null; \
	  else sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null; fi; \
	fi

# Headless Chromium for the dashboard's browser tests and README screenshot (#10), only when missing.
sysdeps-browser:
	@if ! command -v chromedriver >/dev/null 2>&1 || ! command -v chromium >/dev/null 2>&1; then \
	  echo "installing chromium and chromium-driver (apt)"; \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	  else sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; fi; \
	fi

demo: venv sysdeps
	$(VENV)/bin/sqis demo --edge

lint: venv-full
	$(PY) -m ruff check .

test: venv-full sysdeps sysdeps-test
	$(PY) -m ruff check .
	$(PY) -m sqis schemas check  # BACKWARD_TRANSITIVE over schemas/avro/history, before any broker
	$(PY) -m sqis schemas asyncapi --check
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: venv-full sysdeps
	$(VENV)/bin/sqis bench pipeline --frames 600 --workers 1 --json

clean:
	rm -rf .sqis .pytest_cache .ruff_cache
