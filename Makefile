# xcauth: make demo (run the daemon with a demo backend), make test (the test suite).
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
DEMO_NEXTCLOUD_PORT ?= 23680
PREFIX ?= /usr/local
SYSCONFDIR ?= /etc
SYSTEMD_UNIT_DIR ?= /etc/systemd/system
PROSODY_MODULE_DIR ?= /usr/local/lib/xcauth/prosody

.PHONY: all venv demo test test-only system-packages lint typecheck bench clean install

all: venv

# The virtualenv with xcauth installed in place (its twistd plugin included) and
# Twisted's plugin cache rebuilt.
$(BIN)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --config-settings editable_mode=compat -e '.[test,dev]'
	$(BIN)/python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"
	touch $@

venv: $(BIN)/.installed

# Start the fake Nextcloud with demo users beside the daemon; Ctrl-C stops both.
# Then: telnet localhost 23664, and type isuser:admin:example.org
demo: venv
	@$(BIN)/python -m xcauth.testing.fakenextcloud --port $(DEMO_NEXTCLOUD_PORT) \
	    --secret demo-secret-change-me & nc=$$!; \
	trap "kill $$nc 2>/dev/null" EXIT INT TERM; \
	sleep 1; \
	$(BIN)/twistd -n --pidfile= xcauth --config-file xcauth.conf \
	    --listen tcp:23664:interface=127.0.0.1

# Debian packages of the real clients the end-to-end tests drive.
system-packages:
	@if command -v apt-get >/dev/null 2>&1; then scripts/install-system-packages; \
	else echo "no apt-get: end-to-end tests with real clients will be skipped"; fi

test: system-packages venv test-only

test-only:
	BIN=$(BIN) scripts/run-tests tests

lint: venv
	$(BIN)/ruff check xcauth tests twisted

typecheck: venv
	$(BIN)/mypy

bench: venv
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) _trial_temp* build *.egg-info results .mypy_cache .ruff_cache
	find . -name __pycache__ -prune -exec rm -rf {} +

install:
	$(PYTHON) -m pip install .
	install -d $(DESTDIR)$(SYSTEMD_UNIT_DIR)
	install -m 644 systemd/*.service systemd/*.socket $(DESTDIR)$(SYSTEMD_UNIT_DIR)/
	test -e $(DESTDIR)$(SYSCONFDIR)/xcauth.conf || \
	    install -m 640 -D xcauth.conf $(DESTDIR)$(SYSCONFDIR)/xcauth.conf
	install -d $(DESTDIR)$(PROSODY_MODULE_DIR)
	install -m 644 prosody/mod_auth_xcauth.lua $(DESTDIR)$(PROSODY_MODULE_DIR)/
