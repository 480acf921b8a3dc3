"""libvirt's real AppArmor profile of a domain's QEMU, compiled offline with the rule the
.deb ships (packaging/apparmor/virt-vmstate): each QEMU may reach its own domain's proxy
bus socket and no other domain's.

This machine's kernel runs no AppArmor, so nothing is enforced here: the profile is
compiled with ``apparmor_parser -Q -K --dump=rule-exprs`` (no kernel, no cache) from
libvirt's ``TEMPLATE.qemu`` and ``abstractions/libvirt-qemu`` and AppArmor's own
abstractions, unpacked from Debian 13's packages (libvirt 11.3, which includes
``abstractions/libvirt-qemu.d/``) and Debian 12's (libvirt 9.0, which does not), and the
rules it dumps are matched against the paths.  ``make deps`` unpacks them into
``build/apparmor`` (tests/lsm/fetch-apparmor).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from virt_vmstate.core.layout import RUNTIME_DIR, proxy_socket

ROOT = Path(__file__).resolve().parents[2]
UNPACKED = ROOT / "build" / "apparmor"
PARSER = UNPACKED / "bookworm" / "sbin" / "apparmor_parser"  # runs on this machine's libraries
RULE = (ROOT / "packaging" / "apparmor" / "virt-vmstate").read_text()
X, Y = str(uuid.UUID(int=0xA)), str(uuid.UUID(int=0xB))


def socket_of(domain_uuid: str) -> str:
    return f"{RUNTIME_DIR}/{domain_uuid}/{proxy_socket(domain_uuid)}"


@pytest.fixture(scope="module", autouse=True)
def unpacked() -> None:
    if not PARSER.exists() or not (UNPACKED / "trixie" / "etc" / "apparmor.d").exists():
        why = f"libvirt's and AppArmor's files are not unpacked in {UNPACKED} (run 'make deps')"
        if os.environ.get("VIRT_VMSTATE_REQUIRE_E2E"):
            pytest.fail(why)
        pytest.skip(why)


def profile_rules(tmp_path: Path, release: str, domain_uuid: str, drop_in: str | None = None,
                  local: str | None = None) -> list[str]:
    """The file rules of libvirt's profile for ``domain_uuid``, as AppArmor compiles them,
    with ``drop_in`` as the package's file in abstractions/libvirt-qemu.d/ and ``local``
    as the administrator's local/abstractions/libvirt-qemu."""
    base = tmp_path / release / "apparmor.d"
    shutil.copytree(UNPACKED / release / "etc" / "apparmor.d", base)
    if drop_in is not None:
        (base / "abstractions" / "libvirt-qemu.d").mkdir(exist_ok=True)
        (base / "abstractions" / "libvirt-qemu.d" / "virt-vmstate").write_text(drop_in)
    (base / "local" / "abstractions").mkdir(parents=True, exist_ok=True)
    (base / "local" / "abstractions" / "libvirt-qemu").write_text(local or "")
    template = (base / "libvirt" / "TEMPLATE.qemu").read_text()
    profile = base / "libvirt" / f"libvirt-{domain_uuid}"
    profile.write_text(template.replace("LIBVIRT_TEMPLATE", f"libvirt-{domain_uuid}"))
    done = subprocess.run([str(PARSER), "--config-file=/dev/null", "-Q", "-K", "-b", str(base), "-I", str(base),
                           "--dump=rule-exprs", str(profile)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return re.findall(r"(?m)^rule: (\S+)\s+->", done.stdout + done.stderr)  # the dump goes to stderr


def grants(rules: list[str], path: str) -> bool:
    """Whether any rule's expression matches ``path`` (AppArmor dumps them as regexes)."""
    for rule in rules:
        try:
            if re.fullmatch(rule, path):
                return True
        except re.error:
            continue  # not a path rule Python's regexes read; none names virt-vmstate's paths
    return False


def test_debian_13_each_qemu_reaches_its_own_proxy_socket_and_no_other(tmp_path):
    rules = profile_rules(tmp_path, "trixie", X, drop_in=RULE)
    assert grants(rules, socket_of(X))
    assert grants(rules, "/var" + socket_of(X))
    assert not grants(rules, socket_of(Y))
    assert not grants(rules, f"{RUNTIME_DIR}/{X}/bus.sock")  # the helpers' bus is not QEMU's
    # Domain Y's own profile: the mirror image.
    rules_y = profile_rules(tmp_path / "y", "trixie", Y, drop_in=RULE)
    assert grants(rules_y, socket_of(Y)) and not grants(rules_y, socket_of(X))


def test_debian_13_without_the_rule_grants_no_proxy_socket(tmp_path):
    rules = profile_rules(tmp_path, "trixie", X)
    assert rules, "the profile compiled to no rules at all"
    assert grants(rules, "/proc/self/status") or grants(rules, "/etc/ld.so.cache")  # the reading works
    assert not grants(rules, socket_of(X))


def test_debian_12_includes_no_drop_in_but_the_administrators_local_rule_works(tmp_path):
    assert not grants(profile_rules(tmp_path / "a", "bookworm", X, drop_in=RULE), socket_of(X))
    rules = profile_rules(tmp_path / "b", "bookworm", X, local=RULE)
    assert grants(rules, socket_of(X)) and not grants(rules, socket_of(Y))
