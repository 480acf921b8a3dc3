"""What the confinement of a domain's QEMU means for its proxy bus (core/confinement.py)."""

from __future__ import annotations

import pytest

from virt_vmstate.core.confinement import confining_models, stream_verdict
from virt_vmstate.core.domxml import parse_domain


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


def test_apparmor_of_a_libvirt_before_9_6_and_selinux_are_warnings_that_say_what_to_do():
    old = stream_verdict(["apparmor"], apparmor_rule=True, includes_drop_ins=False)
    assert old.ok is None and "local/abstractions/libvirt-qemu" in old.detail
    selinux = stream_verdict(["selinux"], apparmor_rule=True, includes_drop_ins=True)
    assert selinux.ok is None and "pre-copy" in selinux.detail
