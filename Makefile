# virt-vmstate: set-up, tests and the demo.  Run as root on Debian 12.
#   make check   install what the tests need, then run every test
#   make demo    a real live migration between two libvirt hosts on this machine

SYSTEM_PYTHON := /usr/bin/python3
VENV          := .venv
PY            := $(VENV)/bin/python
PY39          := $(firstword $(wildcard /root/.pyenv/versions/3.9*/bin/python3.9))
DEB_PACKAGES  := dbus-daemon libslirp-helper python3-venv python3-pip python3-jeepney \
                 python3-libvirt python3-pytest python3-hypothesis libvirt-daemon \
                 libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86 tini iproute2 \
                 util-linux procps \
                 debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools \
                 rpm man-db lintian rpmlint debootstrap \
                 libapparmor1 libaudit1 libcap-ng0 libexpat1 libselinux1 libsystemd0
DBUS_BROKER   := build/dbus-broker/usr/bin/dbus-broker
VERSION       := $(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' plugin/virt_vmstate/__init__.py)
SRC_TREE      = tar --exclude-vcs --exclude=./.venv --exclude=./.venv39 --exclude=./build \
                    --exclude=./dist --exclude=__pycache__ --exclude=.hypothesis \
                    --exclude=.pytest_cache --exclude='*.egg-info' -cf - .
PYTEST_ARGS   ?= -q
DEBIAN13_ROOT ?= /var/tmp/virt-vmstate-debian13

.PHONY: check deps venv test test-distro test-py39 test-debian13 demo bench faults deb rpm clean

check: deps venv
	$(PY) -m pytest $(PYTEST_ARGS) tests
	$(MAKE) --no-print-directory test-distro
	$(MAKE) --no-print-directory test-py39
	$(MAKE) --no-print-directory test-debian13

deps:
	@missing=$$(for p in $(DEB_PACKAGES); do \
	    dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	    echo "installing: $$missing"; \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi
	@# dbus-broker, beside dbus-daemon in tests and benchmarks: unpacked into build/, not
	@# installed, since its package would become the system bus (the libraries above are its).
	@if [ ! -x /usr/bin/dbus-broker ] && [ ! -x $(DBUS_BROKER) ]; then \
	    rm -rf build/dbus-broker-deb && mkdir -p build/dbus-broker-deb && cd build/dbus-broker-deb && \
	    { apt-get download -q dbus-broker 2>/dev/null || \
	      { apt-get update -q && apt-get download -q dbus-broker; }; } && cd ../.. && \
	    dpkg-deb -x build/dbus-broker-deb/dbus-broker_*.deb build/dbus-broker && \
	    rm -rf build/dbus-broker-deb && echo "unpacked $(DBUS_BROKER)"; fi
	@# libvirt's and AppArmor's profiles of Debian 12 and 13, for the offline AppArmor test.
	@tests/lsm/fetch-apparmor build/apparmor
	@getent passwd libvirt-qemu >/dev/null || useradd --system --no-create-home libvirt-qemu
	@getent group kvm >/dev/null || groupadd --system kvm
	@# Unprivileged users for the bus-security tests: two helper users, a qemu user, an outsider.
	@for u in vmst-helper1 vmst-helper2 vmst-qemu vmst-intruder; do \
	    getent passwd $$u >/dev/null || useradd --system --user-group --no-create-home $$u; done

venv: $(VENV)/.installed

# --system-site-packages: libvirt-python comes from Debian's python3-libvirt.
$(VENV)/.installed: pyproject.toml
	$(SYSTEM_PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]' 'jeepney>=0.9'
	touch $@

# Debian's own Python 3.11 with Debian's jeepney 0.8, pytest and hypothesis.
test-distro:
	cd tests && PYTHONPATH=../plugin $(SYSTEM_PYTHON) -m pytest $(PYTEST_ARGS) -p no:cacheprovider \
	    --rootdir=.. unit integration

# Python 3.9 (RHEL 9's) with tomli and jeepney 0.8, when this machine has it.
test-py39:
	@if [ -z "$(PY39)" ]; then echo "test-py39: skipped, no Python 3.9 on this machine"; exit 0; fi; \
	[ -x .venv39/bin/python ] || { $(PY39) -m venv .venv39 && \
	    .venv39/bin/pip install -q pytest hypothesis 'jeepney==0.8.0' 'tomli>=1.1'; }; \
	cd tests && PYTHONPATH=../plugin ../.venv39/bin/python -m pytest $(PYTEST_ARGS) -p no:cacheprovider \
	    --rootdir=.. unit integration

# Debian 13's stack (libvirt 11.3, QEMU 10.0, Python 3.13, jeepney 0.9, dbus-daemon 1.16):
# a chroot of Debian's packages only, built once with debootstrap, kept in DEBIAN13_ROOT.
test-debian13:
	tests/stacks/debian13 $(DEBIAN13_ROOT) $(PYTEST_ARGS) unit integration e2e

demo: deps venv
	$(PY) tests/e2e/demo.py

# The packages ship compiled bytecode: measure with it.
bench: deps venv
	$(PY) -m compileall -q plugin/virt_vmstate
	$(PY) benchmarks/saveload.py
	$(PY) benchmarks/hook_overhead.py
	$(PY) benchmarks/imports.py
	$(PY) benchmarks/codecs.py
	$(PY) benchmarks/spool.py
	$(PY) benchmarks/migration.py
	$(PY) benchmarks/downtime.py
	$(PY) benchmarks/timeline.py

# Every fault of the fault matrix (and the concurrent migrations), then their table.
faults: deps venv
	mkdir -p build && rm -f build/faults.jsonl
	VIRT_VMSTATE_FAULTS_REPORT=$(CURDIR)/build/faults.jsonl $(PY) -m pytest $(PYTEST_ARGS) \
	    tests/faults tests/e2e/test_migration.py::test_three_guests_migrating_at_once_keep_their_own_state
	$(PY) tests/faults/table.py build/faults.jsonl

# The .deb and the RPM, into dist/.  The version is __version__, and only there.
deb:
	rm -rf build/deb && mkdir -p build/deb/virt-vmstate-$(VERSION) dist
	$(SRC_TREE) | tar -xf - -C build/deb/virt-vmstate-$(VERSION)
	cp -r packaging/debian build/deb/virt-vmstate-$(VERSION)/debian
	sed -e 's/@VERSION@/$(VERSION)/' -e "s/@DATE@/$$(date -R)/" packaging/debian/changelog.in \
	    > build/deb/virt-vmstate-$(VERSION)/debian/changelog
	rm build/deb/virt-vmstate-$(VERSION)/debian/changelog.in
	# Debian's own Python builds it, whatever else is first on PATH.
	cd build/deb/virt-vmstate-$(VERSION) && PATH=/usr/sbin:/usr/bin:/sbin:/bin dpkg-buildpackage -us -uc -b
	mv build/deb/virt-vmstate_$(VERSION)_all.deb dist/

rpm:
	rm -rf build/rpm && mkdir -p build/rpm/SOURCES build/rpm/src/virt-vmstate-$(VERSION) dist
	$(SRC_TREE) | tar -xf - -C build/rpm/src/virt-vmstate-$(VERSION)
	tar -czf build/rpm/SOURCES/virt-vmstate-$(VERSION).tar.gz -C build/rpm/src virt-vmstate-$(VERSION)
	sed -e 's/@VERSION@/$(VERSION)/g' -e "s/@DATE@/$$(LC_ALL=C date +'%a %b %d %Y')/" \
	    packaging/rpm/virt-vmstate.spec > build/rpm/virt-vmstate.spec
	rpmbuild -bb --nodeps --define "_topdir $(CURDIR)/build/rpm" build/rpm/virt-vmstate.spec
	mv build/rpm/RPMS/noarch/virt-vmstate-$(VERSION)-1*.noarch.rpm dist/

clean:
	rm -rf $(VENV) .venv39 build dist *.egg-info
