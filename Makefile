# xcauth: make demo (run the daemon with a demo backend), make test (the test suite),
# make test-unit, make test-e2e (each half alone), make test-oldest (the unit tests
# on the oldest dependencies setup.cfg admits).
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
DEMO_NEXTCLOUD_PORT ?= 23680
DEMO_LISTEN ?= tcp:23664:interface=127.0.0.1
# make demo BACKEND=nextcloud: a stock Nextcloud (OCS API) instead of the JSXC app.
BACKEND ?= jsxc
PREFIX ?= /usr/local
SYSCONFDIR ?= /etc
SYSTEMD_UNIT_DIR ?= /etc/systemd/system
# make install: xcauth and its dependencies go to a virtualenv of their own
# (Debian's system Python is externally managed, PEP 668); $(PREFIX)/bin/xcauth
# links to its script and xcauth.service runs its twistd.
XCAUTH_LIBDIR ?= $(PREFIX)/lib/xcauth
INSTALL_VENV ?= $(XCAUTH_LIBDIR)/venv
PROSODY_MODULE_DIR ?= $(XCAUTH_LIBDIR)/prosody
# The interpreter of the installed virtualenv: the system's, which the service's
# dynamic user can run (not the first python3 on PATH, a pyenv one perhaps,
# under /root); "make install PYTHON=..." to choose another.
INSTALL_PYTHON = $(if $(filter command line environment,$(origin PYTHON)),$(PYTHON),/usr/bin/python3)

.PHONY: all venv demo docs test test-only test-unit test-e2e test-oldest system-packages lint typecheck bench clean \
	install deb test-deb

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

# Start the fake Nextcloud with demo users beside the daemon (scripts/demo.py):
# if its port is taken, nothing starts; Ctrl-C, or a signal to make, stops both.
# Then: telnet localhost 23664, and type isuser:admin:example.org
# BACKEND=nextcloud: the fake stock Nextcloud and xcauth-nextcloud.conf.
demo: venv
	@$(BIN)/python scripts/demo.py --nextcloud-port $(DEMO_NEXTCLOUD_PORT) \
	    --listen $(DEMO_LISTEN) --backend $(BACKEND)

# Debian packages of the real clients the end-to-end tests drive.
system-packages:
	@if command -v apt-get >/dev/null 2>&1; then scripts/install-system-packages; \
	else echo "no apt-get: end-to-end tests with real clients will be skipped"; fi

test: system-packages venv test-only

# tests/unit: no process spawned; tests/e2e: the real twistd and xcauth programs
# and the real Debian clients (tests/harness.py starts them).
test-only:
	BIN=$(BIN) scripts/run-tests tests.unit tests.e2e

test-unit: venv
	BIN=$(BIN) scripts/run-tests tests.unit

test-e2e: system-packages venv
	BIN=$(BIN) scripts/run-tests tests.e2e

# make test-oldest: the oldest release of each dependency setup.cfg admits
# (constraints/oldest.txt) in a virtualenv of its own, running the unit tests and the
# end-to-end tests that need no real Debian client (the xcauth program, the
# database shared by processes, the systemd units and sockets).  TWISTED=24.11.0 (Debian
# 13's own) swaps the Twisted pin for that release, in another virtualenv.
OLDEST_VENV = .venv-oldest$(if $(TWISTED),-twisted-$(TWISTED))
OLDEST_TESTS ?= tests.unit $(addprefix tests.e2e.,test_admin_cli test_stdio test_processes \
    test_stock_cli test_store_processes test_units test_monitoring test_systemd_e2e)

$(OLDEST_VENV)/.installed: setup.cfg pyproject.toml constraints/oldest.txt
	rm -rf $(OLDEST_VENV)
	$(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/pip install --quiet --upgrade pip
	sed '$(if $(TWISTED),s/^Twisted==.*/Twisted==$(TWISTED)/)' constraints/oldest.txt \
	    > $(OLDEST_VENV)/constraints.txt
	$(OLDEST_VENV)/bin/pip install --quiet --config-settings editable_mode=compat \
	    -c $(OLDEST_VENV)/constraints.txt -e '.[test]'
	$(OLDEST_VENV)/bin/pip check
	$(OLDEST_VENV)/bin/python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"
	touch $@

test-oldest: $(OLDEST_VENV)/.installed
	$(OLDEST_VENV)/bin/pip freeze --exclude-editable | grep -iE '^(twisted|treq|service.identity|attrs|bcrypt|prometheus.client|psycopg)=='
	BIN=$(OLDEST_VENV)/bin scripts/run-tests $(OLDEST_TESTS)

# docs/configuration.md from the settings table of xcauth/daemon/config.py
# (tests.unit.test_docs fails when the checked-in page differs).
docs: venv
	$(BIN)/python scripts/configuration_doc.py docs/configuration.md

lint: venv
	$(BIN)/ruff check xcauth tests twisted bench scripts/demo.py scripts/configuration_doc.py

typecheck: venv
	$(BIN)/mypy

# The load benchmark (not a test: it asserts nothing).  BENCH_ARGS=--quick for a
# short run, --scenario NAME for one, --help for the rest.  Results: a table on
# stdout and results/bench-<timestamp>.json.
$(BIN)/.bench-installed: $(BIN)/.installed setup.cfg
	$(BIN)/pip install --quiet --config-settings editable_mode=compat -e '.[test,dev,bench]'
	touch $@

bench: venv $(BIN)/.bench-installed
	$(BIN)/python -m bench $(BENCH_ARGS)

# The Debian package, from the files of this checkout: build/deb/xcauth_*.deb
# (scripts/build-deb; on Debian 12 with the libraries it lacks, debian/rules).
DEB_DIR ?= build/deb
deb:
	scripts/build-deb $(DEB_DIR)

# Build the package in Debian 13 and Debian 12 build roots, install it in fresh
# root directories of each (debootstrap, cached in $(TEST_DEB_CACHE)), check it
# and run its daemon against the fake Nextcloud (scripts/test-deb).
TEST_DEB_CACHE ?= /var/cache/xcauth-test-deb
TEST_DEB_SUITES ?= trixie bookworm
test-deb: venv
	scripts/install-system-packages debootstrap systemd git
	$(BIN)/python scripts/test-deb --cache $(TEST_DEB_CACHE) $(TEST_DEB_SUITES)

clean:
	rm -rf $(VENV) .venv-oldest* _trial_temp* build *.egg-info results .mypy_cache .ruff_cache
	find . -name __pycache__ -prune -exec rm -rf {} +

# With DESTDIR (staging for a package), the virtualenv is built under DESTDIR and
# its scripts' #! lines and activate files are rewritten to the final path.
# The installed virtualenv gets every dependency of its own: a PYTHONPATH of the
# caller's would make pip skip those it can import from there.
install: export PYTHONPATH :=
install:
	scripts/check-service-python $(INSTALL_PYTHON)
	$(INSTALL_PYTHON) -m venv $(DESTDIR)$(INSTALL_VENV)
	$(DESTDIR)$(INSTALL_VENV)/bin/pip install --quiet --upgrade pip
	$(DESTDIR)$(INSTALL_VENV)/bin/pip install --quiet --upgrade .
	$(DESTDIR)$(INSTALL_VENV)/bin/python -c \
	    "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"
	@if [ -n "$(DESTDIR)" ]; then \
	    grep -rlF '$(DESTDIR)$(INSTALL_VENV)' $(DESTDIR)$(INSTALL_VENV)/bin \
	        $(DESTDIR)$(INSTALL_VENV)/pyvenv.cfg 2>/dev/null | \
	    while read -r f; do \
	        sed -i 's|$(DESTDIR)$(INSTALL_VENV)|$(INSTALL_VENV)|g' "$$f"; done; \
	    $(DESTDIR)$(INSTALL_VENV)/bin/python -m compileall -q -f \
	        -s $(DESTDIR) -p / $(DESTDIR)$(INSTALL_VENV)/lib >/dev/null; \
	fi
	rm -rf build
	install -d $(DESTDIR)$(PREFIX)/bin
	ln -sfn $(INSTALL_VENV)/bin/xcauth $(DESTDIR)$(PREFIX)/bin/xcauth
	ln -sfn $(INSTALL_VENV)/bin/xcauth-daemon $(DESTDIR)$(PREFIX)/bin/xcauth-daemon
	install -d $(DESTDIR)$(SYSTEMD_UNIT_DIR)
	install -m 644 systemd/*.socket $(DESTDIR)$(SYSTEMD_UNIT_DIR)/
	for f in systemd/*.service; do \
	    sed 's|/usr/local/lib/xcauth/venv/|$(INSTALL_VENV)/|g' "$$f" \
	        > $(DESTDIR)$(SYSTEMD_UNIT_DIR)/$${f##*/} && \
	    chmod 644 $(DESTDIR)$(SYSTEMD_UNIT_DIR)/$${f##*/} || exit 1; done
	# The stock backend's sample with its demo Nextcloud commented out: the
	# daemon does not start until url= and the service account are set.
	install -d $(DESTDIR)$(SYSCONFDIR)
	test -e $(DESTDIR)$(SYSCONFDIR)/xcauth.conf || { \
	    umask 027 && scripts/installed-conf xcauth-nextcloud.conf \
	        > $(DESTDIR)$(SYSCONFDIR)/xcauth.conf && \
	    chmod 640 $(DESTDIR)$(SYSCONFDIR)/xcauth.conf; }
	install -d $(DESTDIR)$(PROSODY_MODULE_DIR)
	install -m 644 prosody/mod_auth_xcauth.lua $(DESTDIR)$(PROSODY_MODULE_DIR)/
