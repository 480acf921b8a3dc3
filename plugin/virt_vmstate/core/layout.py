"""Where virt-vmstate keeps things on a host: the config file, the runtime dir and the
names of the files in it.  ``hooks/qemu`` has copies of some (it reads them without
Python); ``tests/unit/test_layout.py`` checks that they match."""

from __future__ import annotations

CONFIG_PATH = "/etc/virt-vmstate/config.toml"
CONFIG_ENV = "VIRT_VMSTATE_CONFIG"     # another config file, for tests and operations
RUNTIME_DIR = "/run/virt-vmstate"      # the default of [paths] runtime_dir
LIBVIRT_QEMU_RUN = "/run/libvirt/qemu"  # libvirt's pidfiles of its QEMUs, NAME.pid
LIBVIRT_DBUS_DIR = "/run/libvirt/qemu/dbus"  # libvirt's own per-domain buses
LIBVIRT_QEMU_LOG = "/var/log/libvirt/qemu"  # libvirt's logs of its QEMUs, NAME.log
# The AppArmor rule the .deb installs, where libvirt's abstraction for QEMU (9.6 and
# later) includes it; and that abstraction.
APPARMOR_RULE = "/etc/apparmor.d/abstractions/libvirt-qemu.d/virt-vmstate"
LIBVIRT_QEMU_ABSTRACTION = "/etc/apparmor.d/abstractions/libvirt-qemu"

# Host-wide entries of the runtime dir, beside the domains' directories (named by UUID).
LOCKS_DIR = ".locks"            # one lock file per domain, outside its directory
USED_DIR = ".used"              # the ledger of helper states already used here
CONFIG_CACHE = ".config-cache"  # the parsed host config
ASIDE_PREFIX = ".stopping-"     # + the PID of the process stopping a domain's processes

# In a domain's directory.
BUS_SOCKET = "bus.sock"                # the helpers' managed bus
INCOMING_RECORD = "incoming.record"    # the incoming migration or restore: TOKEN KIND CARRIER CREATED
INCOMING_BUNDLE = "incoming.vmstate"   # the pre-copy state 'migrate begin' kept
INCOMING_SPOOL = "incoming.spool"      # the spool file to remove once loaded or abandoned
INCOMING_FILES = (INCOMING_RECORD, INCOMING_BUNDLE, INCOMING_SPOOL)
START_WAIT = "start.wait"      # 'start begin' has work: helpers to wait for, a socket to label
STARTED_WAIT = "started.wait"  # 'started begin' has processes to wait for; the proxy removes it
READY_FILE = "proxy.ready"     # the proxy's PID, once it serves
PROXY_STATUS = "proxy-status.json"   # the proxy's last Save or Load
LAST_FAILURE = "last-failure.json"   # the proxy's last failure, for 'virt-vmstate check'


def proxy_socket(domain_uuid: str) -> str:
    """The proxy's socket, which QEMU's dbus-vmstate object connects to (the proxy answers
    there as a bus of its own): ``libvirt-UUID``, the name of libvirt's AppArmor profile for the domain's QEMU,
    so that one shipped rule (packaging/apparmor) lets each QEMU reach its own domain's
    socket and no other."""
    return f"libvirt-{domain_uuid}"


# The kernel's limit on a socket's path (sun_path less its final NUL), and so the longest
# runtime dir a domain's proxy socket fits under.
SOCKET_PATH_MAX = 107
RUNTIME_DIR_MAX = SOCKET_PATH_MAX - len("/00000000-0000-0000-0000-000000000000/") - len(proxy_socket("0" * 36))


def pidfile(role: str) -> str:
    """A managed process's pidfile: ``ROLE.pid``."""
    return f"{role}.pid"


def logfile(role: str) -> str:
    """A managed process's stdout and stderr: ``ROLE.log``."""
    return f"{role}.log"


def bus_config_file(role: str) -> str:
    """A managed dbus-daemon's config: ``ROLE.conf``."""
    return f"{role}.conf"
