"""What the confinement of a domain's QEMU means for its proxy socket (core/confinement.py)."""

from __future__ import annotations

import pytest

from virt_vmstate.core.confinement import (confining_models, connect_failure, last_start_error,
                                           socket_context, stream_verdict)
from virt_vmstate.core.domxml import parse_domain
from virt_vmstate.errors import DomainXMLError

DOMAIN = b"<domain><name>vm</name><uuid>0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0</uuid>"


@pytest.mark.parametrize("labels,models", [
    (b"<seclabel type='none' model='none'/>", []),
    (b"<seclabel type='dynamic' model='apparmor' relabel='yes'><label>libvirt-x</label></seclabel>",
     ["apparmor"]),
    (b'<seclabel type="dynamic" model="selinux" relabel="yes"/>'
     b"<seclabel type='dynamic' model='dac' relabel='yes'/>", ["selinux"]),
    (b"<seclabel type='none' model='apparmor'/>", []),
    (b"<devices><disk><seclabel model='selinux' relabel='no'/></disk></devices>", []),  # a disk's, not QEMU's
    (b"<devices/>", []),
])
def test_the_confining_drivers_are_read_from_the_domains_seclabels(labels, models):
    xml = (b"<domain><name>vm</name><uuid>0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0</uuid>" + labels
           + b"</domain>")
    assert confining_models(parse_domain(xml).security_models) == models


def test_unconfined_and_apparmor_with_its_rule_are_fine():
    assert stream_verdict([], apparmor_rule=False, includes_drop_ins=False).ok is True
    assert stream_verdict(["apparmor"], apparmor_rule=True, includes_drop_ins=True).ok is True


def test_apparmor_without_the_rule_fails_saying_what_to_install():
    verdict = stream_verdict(["apparmor"], apparmor_rule=False, includes_drop_ins=True)
    assert verdict.ok is False and "abstractions/libvirt-qemu.d/" in verdict.detail


def test_apparmor_of_a_libvirt_before_9_6_is_a_warning_that_says_what_to_do():
    old = stream_verdict(["apparmor"], apparmor_rule=True, includes_drop_ins=False)
    assert old.ok is None and "local/abstractions/libvirt-qemu" in old.detail


def test_selinux_needs_no_module_and_says_it_was_verified_offline_only():
    selinux = stream_verdict(["selinux"], apparmor_rule=False, includes_drop_ins=False)
    assert selinux.ok is True and "<imagelabel>" in selinux.detail and "offline" in selinux.detail


LIVE_SELINUX = (b"<seclabel type='dynamic' model='selinux' relabel='yes'>"
                b"<label>system_u:system_r:svirt_t:s0:c12,c345</label>"
                b"<imagelabel>system_u:object_r:svirt_image_t:s0:c12,c345</imagelabel></seclabel>"
                b"<seclabel type='dynamic' model='dac' relabel='yes'><label>+107:+107</label>"
                b"<imagelabel>+107:+107</imagelabel></seclabel>")


def test_the_socket_gets_the_image_label_of_selinuxs_seclabel_not_dacs():
    dom = parse_domain(DOMAIN + LIVE_SELINUX + b"</domain>")
    assert dom.selinux_image_label == "system_u:object_r:svirt_image_t:s0:c12,c345"
    assert socket_context(dom.selinux_image_label, "vm") == "system_u:object_r:svirt_image_t:s0:c12,c345"
    dac_only = parse_domain(DOMAIN + LIVE_SELINUX.split(b"</seclabel>", 1)[1] + b"</domain>")
    assert dac_only.selinux_image_label is None


@pytest.mark.parametrize("label", [
    "system_u:object_r:svirt_image_t:s0", "system_u:object_r:svirt_image_t:s0-s0:c0.c1023",
    "system_u:object_r:svirt_image_t:s0:c1,c2",
])
def test_contexts_of_every_mls_range_form_are_taken(label):
    assert socket_context(label, "vm") == label


@pytest.mark.parametrize("label, why", [
    (None, "no <imagelabel>"), ("", "no <imagelabel>"),
    ("system_u:object_r:svirt_image_t", "not an SELinux context"),
    ("system_u:object_r:svirt_image_t:s0:c1,c2\nx", "not an SELinux context"),
    ("../../etc:object_r:x:s0", "not an SELinux context"),
    ("+107:+107", "not an SELinux context"),
])
def test_a_missing_or_malformed_image_label_is_refused_naming_the_domain(label, why):
    with pytest.raises(DomainXMLError) as raised:
        socket_context(label, "vm")
    assert why in str(raised.value) and "domain vm" in str(raised.value)


@pytest.mark.parametrize("models, says", [
    (["apparmor"], "AppArmor denied QEMU its proxy socket /run/x/libvirt-u"),
    (["selinux"], "SELinux denied QEMU its proxy socket /run/x/libvirt-u"),
    ([], "security.qemu_user"),
])
def test_qemus_denied_connect_is_told_as_the_confining_drivers_denial(models, says):
    error = "GenericError: failed to connect to DBus: 'Could not connect: Permission denied'"
    cause = connect_failure(error, models, "/run/x/libvirt-u")
    assert cause is not None and says in cause and "\n" not in cause


def test_a_missing_proxy_and_other_errors_are_told_apart():
    gone = connect_failure("failed to connect to DBus: 'Could not connect: No such file or directory'",
                           ["apparmor"], "/p")
    assert gone is not None and "proxy is not running" in gone
    assert connect_failure("There is already an instance of dbus-vmstate", ["selinux"], "/p") is None


LOG = """2026-12-07 10:00:00.000+0000: starting up libvirt version: 11.3.0, qemu version: 10.0.0
qemu-system-x86_64: -object {"qom-type":"dbus-vmstate"}: failed to connect to DBus: 'Could not connect: Permission denied'
2026-12-07 10:00:01.000+0000: shutting down, reason=failed
"""


def test_the_last_starts_connect_error_is_found_in_qemus_log():
    assert "Permission denied" in str(last_start_error(LOG))
    later = LOG + "2026-12-07 11:00:00.000+0000: starting up libvirt version: 11.3.0\n"
    assert last_start_error(later) is None  # a later start did not fail so
    assert last_start_error("") is None
