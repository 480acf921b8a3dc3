"""flatjson against the json module: what it writes, json reads back; what it reads, json reads alike."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from virt_vmstate.core import flatjson

flat_objects = st.dictionaries(st.text(), st.text(), max_size=6)


@given(flat_objects)
def test_what_it_writes_json_reads_back(obj):
    assert json.loads(flatjson.dumps(obj)) == obj


@given(flat_objects)
def test_it_writes_what_json_writes_compactly(obj):
    assert flatjson.dumps(obj) == json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


@given(flat_objects)
def test_it_reads_what_json_writes_unless_it_holds_escapes(obj):
    for text in (json.dumps(obj, ensure_ascii=False), json.dumps(obj, indent=2, ensure_ascii=False)):
        read = flatjson.loads(text)
        if "\\" in text:
            assert read is None or read == obj
        else:
            assert read == obj


@given(st.text(alphabet='{}[]":, \t\n\\ab1.-tnrue', max_size=40))
def test_anything_it_reads_json_reads_the_same(text):
    read = flatjson.loads(text)
    if read is not None:
        assert json.loads(text) == read


def test_a_repeated_key_keeps_the_last_value_as_json_does():
    text = '{"qom-type":"dbus-vmstate","qom-type":"other"}'
    assert flatjson.loads(text) == json.loads(text) == {"qom-type": "other"}


def test_what_it_leaves_to_json():
    for text in ('{"a":1}', '{"a":"b\\"c"}', '{"a":{"b":"c"}}', '["a"]', '{"a":"b"} x', '{"a":"b",}', "",
                 '{"a":"b', '{"a" "b"}', '{"a":"\u0001"}'):
        assert flatjson.loads(text) is None, text
