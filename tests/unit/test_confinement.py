"""What the confinement of a domain's QEMU means for its proxy bus (core/confinement.py)."""

from __future__ import annotations

import pytest

from virt_vmstate.core.confinement import confining_models, stream_verdict


@pytest.mark.parametrize("xml,models", [
    (b"<domain><seclabel type='none' model='none'/></domain>", []),
    (b"<domain><seclabel type='dynamic' model='apparmor' relabel='yes'><label>libvirt-x</label>"
     b"</seclabel></domain>", ["apparmor"]),
    (b'<domain><seclabel type="dynamic" model="selinux" relabel="yes"/>'
     b"<seclabel type='dynamic' model='dac' relabel='yes'/></domain>", ["selinux"]),
    (b"<domain><seclabel type='none' model='apparmor'/></domain>", []),
    (b"<domain><devices/></domain>", []),
])
def test_the_confining_drivers_are_read_from_the_seclabels(xml, models):
    assert confining_models(xml) == models


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
