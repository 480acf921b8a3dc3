"""The spool carrier's files on a real filesystem."""

from __future__ import annotations

import hashlib
import os
import stat

import pytest

from virt_vmstate.core.domxml import StateElement
from virt_vmstate.errors import BundleError, RunDirError
from virt_vmstate.host.spool import Spool

NAME = "5f0e1a3c-8b1e-4c2a-9d55-0a3b9c1e2f40-0000.vmstate"


def element(data: bytes, name: str = NAME) -> StateElement:
    return StateElement("spool", len(data), hashlib.sha256(data).hexdigest(), spool_file=name)


@pytest.fixture
def spool(tmp_path):
    return Spool(str(tmp_path))


def test_round_trip_private_file(spool, tmp_path):
    data = os.urandom(100_000)
    path = spool.write(NAME, data)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert spool.read(element(data), 1 << 20) == data
    assert [p.name for p in tmp_path.iterdir()] == [NAME]
    assert spool.remove(NAME) and not spool.remove(NAME)


def test_missing_file_says_the_directory_may_not_be_shared(spool):
    with pytest.raises(BundleError, match="does not exist on this host.*both hosts mount"):
        spool.read(element(b"abc"), 1 << 20)


def test_truncated_file_is_refused(spool, tmp_path):
    data = os.urandom(4096)
    spool.write(NAME, data)
    (tmp_path / NAME).write_bytes(data[:100])
    with pytest.raises(BundleError, match="cut short or replaced"):
        spool.read(element(data), 1 << 20)


def test_replaced_file_of_the_same_size_is_refused(spool, tmp_path):
    data = os.urandom(4096)
    spool.write(NAME, os.urandom(4096))
    with pytest.raises(BundleError, match="does not match the SHA-256"):
        spool.read(element(data), 1 << 20)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file_is_refused(spool, tmp_path):
    data = b"abc"
    spool.write(NAME, data)
    (tmp_path / NAME).chmod(0)
    with pytest.raises(BundleError, match="cannot read spool file"):
        spool.read(element(data), 1 << 20)


def test_directory_in_place_of_the_file_is_refused(spool, tmp_path):
    (tmp_path / NAME).mkdir()
    with pytest.raises(BundleError):
        spool.read(element(b"abc"), 1 << 20)


def test_symlink_is_not_followed(spool, tmp_path):
    secret = tmp_path / "secret"
    secret.write_bytes(b"abc")
    (tmp_path / NAME).symlink_to(secret)
    with pytest.raises(BundleError, match="cannot read"):
        spool.read(element(b"abc"), 1 << 20)


def test_declared_size_over_the_cap_is_refused_before_reading(spool):
    with pytest.raises(BundleError, match="over the cap"):
        spool.read(element(b"x" * 2000), 1000)


@pytest.mark.parametrize("name", ["../etc/shadow", "a/b", "", ".hidden", "x" * 200])
def test_names_from_another_host_never_become_other_paths(spool, name):
    with pytest.raises(BundleError, match="not a plain file name"):
        spool.path(name)


def test_missing_spool_directory_is_named(tmp_path):
    with pytest.raises(RunDirError, match="spool directory"):
        Spool(str(tmp_path / "nope")).write(NAME, b"abc")
