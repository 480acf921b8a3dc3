"""The .deb and the RPM, built by 'make deb' / 'make rpm' and, for the .deb, installed.

Installing changes the machine (it is what CI is for): the package is purged
again at the end, even when a test fails.  The RPM is checked by its metadata
with Debian's rpm; installing it needs an RPM-based host.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
import uuid
from pathlib import Path
from typing import Iterator, List, Set

import pytest

from virt_vmstate import __version__
from virt_vmstate.core import domxml
from virt_vmstate.core.domxml import DomainConfig, HelperSpec, config_element

ROOT = Path(__file__).resolve().parents[2]
DEB = ROOT / "dist" / f"virt-vmstate_{__version__}_all.deb"
RPM = ROOT / "dist" / f"virt-vmstate-{__version__}-1.noarch.rpm"
HOOK = Path("/etc/libvirt/hooks/qemu.d/virt-vmstate")
CONFIG = Path("/etc/virt-vmstate/config.toml")
SYSTEM_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
              "DEBIAN_FRONTEND": "noninteractive"}

pytestmark = pytest.mark.packaging


def missing_prerequisite() -> str:
    if os.geteuid() != 0:
        return "installing a package needs root"
    for tool in ("dpkg-buildpackage", "rpmbuild", "apt-get", "man"):
        if not shutil.which(tool):
            return f"{tool} is not installed (run 'make deps')"
    if subprocess.run(["dpkg-query", "-W", "-f=${Status}", "virt-vmstate"],
                      capture_output=True, text=True).stdout.startswith("install ok"):
        return "virt-vmstate is already installed from a package on this machine"
    return ""


def run(*argv: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, capture_output=True, text=True, env=SYSTEM_ENV, timeout=600, **kw)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def built() -> None:
    why = missing_prerequisite()
    if why:
        if os.environ.get("VIRT_VMSTATE_REQUIRE_E2E"):
            pytest.fail(f"package tests cannot run: {why}")
        pytest.skip(f"package tests: {why}")
    run("make", "-C", str(ROOT), "deb", "rpm")
    assert DEB.exists() and RPM.exists()


@pytest.fixture(scope="module")
def installed(built) -> Iterator[str]:
    result = run("apt-get", "install", "-y", "-q", "--no-install-recommends", str(DEB))
    try:
        yield result.stdout + result.stderr
    finally:
        run("apt-get", "purge", "-y", "-q", "virt-vmstate", check=False)


def test_first_install_says_once_that_libvirt_must_reload(installed):
    assert installed.count("systemctl reload libvirtd") == 1
    again = run("apt-get", "install", "-y", "-q", "--reinstall", str(DEB))
    assert "systemctl reload" not in again.stdout + again.stderr


def test_version_comes_from_one_place(installed):
    assert run("virt-vmstate", "--version").stdout.strip() == f"virt-vmstate {__version__}"
    assert run("dpkg-query", "-W", "-f=${Version}", "virt-vmstate").stdout == __version__


def test_man_page_is_found_and_covers_every_command(installed):
    page = run("man", "-w", "virt-vmstate").stdout.strip()
    assert page.endswith("virt-vmstate.8.gz")
    text = run("sh", "-c", f"zcat {page}").stdout
    for command in ("list", "save", "load", "inspect", "hook", "migrate", "check", "check-host",
                    "enable", "disable", "proxy"):
        assert f".SS {command}" in text
    for option in ("\\-\\-carrier", "\\-\\-consistent", "\\-\\-dest\\-command", "\\-\\-stage"):
        assert option in text


def test_hook_leaves_other_domains_alone(installed):
    assert os.access(HOOK, os.X_OK)
    xml = f"<domain><name>plain</name><uuid>{uuid.uuid4()}</uuid></domain>"
    for op in (("migrate", "begin", "-"), ("started", "begin", "-"), ("stopped", "end", "-")):
        result = run(str(HOOK), "plain", *op, input=xml)
        assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_installed_command_imports_only_what_the_hook_needs(installed, tmp_path):
    dom_config = DomainConfig((HelperSpec("h"),), bus_mode="address", bus_address="unix:path=/nonexistent")
    xml = (f"<domain><name>vm</name><uuid>{uuid.uuid4()}</uuid><metadata>{config_element(dom_config)}"
           "</metadata></domain>")
    config = tmp_path / "config.toml"
    config.write_text(f'[paths]\nruntime_dir = "{tmp_path}/run"\n[logging]\nsyslog = false\n')
    env = dict(SYSTEM_ENV, VIRT_VMSTATE_CONFIG=str(config))
    argv = ["/usr/bin/virt-vmstate", "hook", "vm", "prepare", "begin", "-"]
    for _ in range(2):  # the first makes the runtime dir, the second caches the parsed config
        assert subprocess.run(argv, input=xml, text=True, env=env, timeout=60).returncode == 0
    result = subprocess.run(["python3", "-X", "importtime", *argv], input=xml, capture_output=True, text=True,
                            env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert {"virt_vmstate.hook.events", "virt_vmstate.hook.phases", "virt_vmstate.host.configcache"} <= imported
    # What earns its place on the hook's path (tests/unit/test_import_graph.py, benchmarks/imports.py).
    assert not imported & {"logging", "dataclasses", "typing", "tomllib", "pathlib", "json", "uuid"}


def test_hook_receives_state_at_migrate_begin(installed, tmp_path):
    import hashlib
    import time

    from virt_vmstate.core import bundle as B
    from virt_vmstate.core.domxml import StateElement, insert_state
    dom_uuid = uuid.uuid4()
    sealed = B.new_bundle([B.HelperState("counter", b"\x00" * 8 + b"state")],
                          created_ms=int(time.time() * 1000), migration_id=str(uuid.uuid4()),
                          domain_uuid=str(dom_uuid)).encode()
    element = StateElement("xml", len(sealed), hashlib.sha256(sealed).hexdigest(), sealed)
    dom_config = DomainConfig((HelperSpec('counter'),), bus_mode='address', bus_address='unix:path=/nonexistent')
    xml = (f"<domain><name>vm1</name><uuid>{dom_uuid}</uuid><metadata>{config_element(dom_config)}"
           "</metadata></domain>").encode()
    runtime = tmp_path / "run"
    config = tmp_path / "config.toml"
    config.write_text(f'[paths]\nruntime_dir = "{runtime}"\n[logging]\nsyslog = false\n')
    env = dict(SYSTEM_ENV, VIRT_VMSTATE_CONFIG=str(config))
    result = subprocess.run([str(HOOK), "vm1", "migrate", "begin", "-"],
                            input=insert_state(xml, element), capture_output=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    printed = domxml.parse_domain(result.stdout)
    assert printed.state is None and printed.incoming is not None
    # Every other byte as it came (the bash hook reads stdin as a string: no final newline).
    assert domxml.splice(result.stdout, [(*printed.incoming.span, b"")]).rstrip(b"\n") == xml
    assert (runtime / str(dom_uuid) / "incoming.vmstate").read_bytes() == sealed
    stale = subprocess.run([str(HOOK), "vm1", "migrate", "begin", "-"], capture_output=True, env=env,
                           input=insert_state(xml, StateElement("xml", 3, "0" * 64, b"abc")), timeout=60)
    assert stale.returncode == 1 and b"sha256" in stale.stderr
    gone = subprocess.run([str(HOOK), "vm1", "stopped", "end", "-"], input=xml, capture_output=True,
                          env=env, timeout=60)
    assert gone.returncode == 0 and not (runtime / str(dom_uuid)).exists()


def test_the_apparmor_rule_is_installed_where_libvirts_abstraction_includes_it(installed):
    """Its own file in abstractions/libvirt-qemu.d/, never the administrator's local/ file;
    tests/integration/test_apparmor.py compiles it into libvirt's profile."""
    from virt_vmstate.core.layout import APPARMOR_RULE
    rule = Path(APPARMOR_RULE)
    assert rule.read_text() == (ROOT / "packaging" / "apparmor" / "virt-vmstate").read_text()
    assert str(rule) in run("dpkg-query", "-W", "-f=${Conffiles}", "virt-vmstate").stdout
    assert "/etc/apparmor.d/local" not in run("dpkg-query", "-L", "virt-vmstate").stdout


def test_example_config_is_installed_and_valid(installed):
    from virt_vmstate.core.config import parse_config
    assert CONFIG.exists()
    parse_config(CONFIG.read_text(), str(CONFIG))
    uncommented = re.sub(r'(?m)^# (?=\[|[a-z_]+ = |\s+")', "", CONFIG.read_text())
    assert "[carriers.spool]" in uncommented.splitlines()
    parse_config(uncommented, "uncommented example")


def newer_deb(tmp_path: Path, suffix: str) -> Path:
    """The built .deb as a newer version whose example config changed, as an upgrade ships it."""
    root = tmp_path / f"pkg-{suffix}"
    run("dpkg-deb", "-R", str(DEB), str(root))
    control = root / "DEBIAN" / "control"
    control.write_text(control.read_text().replace(f"Version: {__version__}",
                                                   f"Version: {__version__}+{suffix}"))
    example = root / "etc" / "virt-vmstate" / "config.toml"
    example.write_text(example.read_text() + f"\n# shipped by {suffix}\n")
    out = tmp_path / f"virt-vmstate_{suffix}_all.deb"
    run("dpkg-deb", "--root-owner-group", "-b", str(root), str(out))
    return out


def test_config_is_a_conffile_through_upgrades_and_purge(built, tmp_path):
    run("apt-get", "purge", "-y", "-q", "virt-vmstate", check=False)
    run("apt-get", "install", "-y", "-q", "--no-install-recommends", str(DEB))
    conffiles = run("dpkg-query", "-W", "-f=${Conffiles}", "virt-vmstate").stdout
    assert str(CONFIG) in conffiles and str(HOOK) in conffiles
    # Unchanged by the admin: an upgrade brings the new example.
    run("apt-get", "install", "-y", "-q", str(newer_deb(tmp_path, "up1")))
    assert CONFIG.read_text().endswith("# shipped by up1\n")
    # Changed by the admin: kept, dpkg's question answered as an admin would with --force-confold.
    CONFIG.write_text(CONFIG.read_text() + "\n[timeouts]\ncall = 5.0\n")
    changed = CONFIG.read_text()
    upgrade = run("apt-get", "install", "-y", "-q", "-o", "Dpkg::Options::=--force-confold",
                  str(newer_deb(tmp_path, "up2")))
    assert CONFIG.read_text() == changed
    assert "config.toml" in upgrade.stdout + upgrade.stderr  # dpkg said it kept the admin's file
    assert Path(str(CONFIG) + ".dpkg-dist").exists()
    Path(str(CONFIG) + ".dpkg-dist").unlink()
    files = package_files()
    run("apt-get", "purge", "-y", "-q", "virt-vmstate")
    assert {f for f in files if os.path.lexists(f) and not os.path.isdir(f)} == set()
    assert not CONFIG.parent.exists() and not Path("/var/lib/virt-vmstate").exists()


UNIT = Path("/lib/systemd/system/virt-vmstate.service")
ENABLED = Path("/etc/systemd/system/multi-user.target.wants/virt-vmstate.service")
DSH_STATE = Path("/var/lib/systemd/deb-systemd-helper-enabled")


def old_deb_with_the_server(tmp_path: Path) -> Path:
    """The built .deb as version 0.1.0 was: with virt-vmstate.service, enabled at install as
    dh_installsystemd's scripts enable it (no systemd runs here, so nothing starts)."""
    root = tmp_path / "pkg-old"
    run("dpkg-deb", "-R", str(DEB), str(root))
    control = root / "DEBIAN" / "control"
    control.write_text(control.read_text().replace(f"Version: {__version__}", "Version: 0.1.0"))
    unit = root / UNIT.relative_to("/")
    unit.parent.mkdir(parents=True, exist_ok=True)
    unit.write_text("[Unit]\nDescription=virt-vmstate hook server\n[Service]\n"
                    "ExecStart=/usr/bin/virt-vmstate serve\nKillMode=process\n"
                    "[Install]\nWantedBy=multi-user.target\n")
    postinst = root / "DEBIAN" / "postinst"
    postinst.write_text(postinst.read_text().replace(
        "\nexit 0", "\ndeb-systemd-helper enable virt-vmstate.service >/dev/null || true\nexit 0"))
    for script in ("preinst", "postinst"):  # 0.1.0 had no upgrade branch
        path = root / "DEBIAN" / script
        path.write_text(re.sub(r"(?s)\nif \[ \"\$1\" = \"(upgrade|configure)\" \] && (\[ -n|dpkg).*?\nfi\n", "\n",
                               path.read_text()))
    out = tmp_path / "virt-vmstate_0.1.0_all.deb"
    run("dpkg-deb", "--root-owner-group", "-b", str(root), str(out))
    return out


def dsh(question: str) -> subprocess.CompletedProcess:
    """deb-systemd-helper's answer about the unit, asked as a maintainer script asks it."""
    return subprocess.run(["deb-systemd-helper", question, "virt-vmstate.service"], capture_output=True,
                          env=dict(SYSTEM_ENV, DPKG_MAINTSCRIPT_PACKAGE="virt-vmstate"), timeout=60)


def test_an_upgrade_from_the_version_with_the_hook_server_removes_its_unit(built, tmp_path):
    run("apt-get", "purge", "-y", "-q", "virt-vmstate", check=False)
    try:
        run("apt-get", "install", "-y", "-q", "--no-install-recommends", str(old_deb_with_the_server(tmp_path)))
        assert UNIT.exists() and ENABLED.is_symlink()
        assert dsh("was-enabled").returncode == 0
        run("apt-get", "install", "-y", "-q", "--no-install-recommends", str(DEB))
        assert run("dpkg-query", "-W", "-f=${Version}", "virt-vmstate").stdout == __version__
        assert not UNIT.exists() and not ENABLED.is_symlink()
        assert dsh("debian-installed").returncode != 0
        assert not list(DSH_STATE.rglob("virt-vmstate.service*"))  # nothing left to re-enable it
    finally:
        run("apt-get", "purge", "-y", "-q", "virt-vmstate", check=False)


def test_the_rpm_stops_and_disables_the_hook_server_only_on_upgrade(built, tmp_path):
    """The RPM's %pre, run by sh with a systemctl that records its arguments: this machine
    runs neither rpm's transactions nor systemd."""
    scripts = run("rpm", "-qp", "--scripts", str(RPM)).stdout
    pre = re.search(r"(?s)preinstall scriptlet \(using /bin/sh\):\n(.*?)(?=\n\S+ scriptlet|\Z)", scripts)
    assert pre is not None, scripts
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    (bin_dir / "systemctl").write_text(f'#!/bin/sh\necho "$*" >> {calls}\n')
    (bin_dir / "systemctl").chmod(0o755)
    env = dict(SYSTEM_ENV, PATH=f"{bin_dir}:{SYSTEM_ENV['PATH']}")
    for count in ("1", "2"):  # $1: how many versions are installed once this one is
        done = subprocess.run(["sh", "-c", pre.group(1), "pre", count], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    assert calls.read_text() == "--no-reload disable --now virt-vmstate.service\n"


def package_files() -> Set[str]:
    return set(run("dpkg-query", "-L", "virt-vmstate").stdout.split())


def test_lintian_pedantic_finds_nothing_left_unexplained(built):
    result = run("lintian", "--pedantic", "--fail-on", "error,warning", str(DEB), check=False)
    findings = [line for line in result.stdout.splitlines() if re.match(r"^[EWIP]: ", line)]
    assert result.returncode == 0 and findings == [], result.stdout
    overrides = (ROOT / "packaging" / "debian" / "virt-vmstate.lintian-overrides").read_text().splitlines()
    for index, line in enumerate(overrides):
        if line and not line.startswith("#"):
            assert overrides[index - 1].startswith("#"), f"override without a reason: {line}"


def test_rpmlint_finds_nothing_left_unexplained(built):
    config = ROOT / "packaging" / "rpm" / "rpmlint.toml"
    result = run("rpmlint", "-c", str(config), str(RPM), str(ROOT / "build" / "rpm" / "virt-vmstate.spec"),
                 check=False)
    assert "0 errors, 0 warnings" in result.stdout, result.stdout
    lines = config.read_text().splitlines()
    for index, line in enumerate(lines):
        if line.strip().startswith('"'):
            assert lines[index - 1].strip().startswith("#") or lines[index - 1].strip().startswith('"'), line


def rpm_query(*args: str) -> List[str]:
    return run("rpm", "-qp", *args, str(RPM)).stdout.split("\n")


def test_rpm_holds_the_same_files_as_the_deb(built):
    def normal(paths: List[str]) -> Set[str]:
        out = set()
        for p in paths:
            p = p.strip().lstrip(".")
            p = re.sub(r"^/usr/lib/python3[.\d]*/(site|dist)-packages/", "SITE/", p)
            p = re.sub(r"\.gz$", "", p)
            p = re.sub(r"^/lib/systemd/", "/usr/lib/systemd/", p)  # Debian 12's units are not in /usr yet
            if p.startswith("/etc/apparmor.d/"):
                continue  # AppArmor is Debian's and Ubuntu's; Fedora and RHEL confine QEMU with SELinux
            if p and "dist-info" not in p and not p.startswith("/usr/share/doc") \
                    and not p.startswith("/usr/share/licenses") and not p.startswith("/usr/share/lintian"):
                out.add(p)
        return out
    deb = [line.split()[-1] for line in run("dpkg-deb", "-c", str(DEB)).stdout.splitlines()
           if not line.endswith("/")]
    listed = [p for p in rpm_query("-l") if p]
    rpm = [p for p in listed if not any(other.startswith(p + "/") for other in listed)]  # files, not dirs
    assert normal(rpm) == normal(deb)


def test_rpm_dependencies_and_config(built):
    requires = set(rpm_query("-R"))
    assert {"python3-jeepney", "python3-libvirt", "dbus-daemon"} <= requires
    assert "libvirt-daemon" in rpm_query("--recommends")
    assert "/etc/virt-vmstate/config.toml" in rpm_query("-c")
    assert rpm_query("--queryformat", "%{VERSION}")[0] == __version__
    deb_depends = run("dpkg-deb", "-f", str(DEB), "Depends").stdout
    for dep in ("python3-jeepney", "python3-libvirt", "dbus-daemon"):
        assert dep in deb_depends
    assert "libvirt-daemon" in run("dpkg-deb", "-f", str(DEB), "Recommends").stdout
