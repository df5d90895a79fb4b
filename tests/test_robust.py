"""Robustness of the parsing boundary and of the cluster view's cache
(issue #6, findings 1, 10 and 11). Pure: no etcd, no libvirt."""
from __future__ import annotations

import dataclasses
import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import metastack as ms
from metastack import ActualVM, DesiredVM, Entry, Flavour, HostState, Image, SpecError

# -- every parse function, fed anything -------------------------------------------

JSON_SCALARS = (st.none() | st.booleans() | st.integers() | st.integers(min_value=2 ** 53 - 2)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20)
                | st.sampled_from(["small", "running", "stopped", "n1", "", "..", "../..", "-x", "a/b", "a\nb"]))
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20)
FIELDS = ("flavour", "state", "host", "image", "vcpus", "ram_mb", "pool", "snapshot", "size", "kernel",
          "initrd", "cmdline", "reason", "updated", "disk", "generation", "vcpus_used", "ram_mb_used", "vms")
RECORDS = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), JSON_VALUES, max_size=12)


def _deep(n: int) -> bytes:
    return b'{"flavour": "small", "x": ' + b"[" * n + b"]" * n + b"}"


RAW = st.one_of(
    st.binary(max_size=300),
    JSON_VALUES.map(lambda v: json.dumps(v).encode()),
    RECORDS.map(lambda v: json.dumps(v).encode()),
    st.builds(lambda ch, n: ch * n, st.sampled_from([b"[", b'{"a":', b"[1,", b'{"flavour": ']),
              st.integers(1, 120_000)),
    st.integers(1, 3000).map(_deep),
    st.sampled_from([
        b'{"vcpus": ' + b"9" * 5000 + b"}",  # more digits than int() accepts
        b'{"flavour": "small", "x": NaN}',
        b'{"vcpus": 1, "ram_mb": Infinity}',
        b'"\\ud800"',
        b'{"host": "\\udcff", "state": "running"}',
        b"\xff\xfe{}",
        b'{"flavour": "small", "x": "' + b"y" * 300_000 + b'"}',  # huge
        b'{"pool": "p", "image": "i", "snapshot": "s", "size": 1, "kernel": {}, "initrd": []}',
        b'{"host": ["n1"], "state": {"a": 1}, "vcpus": "2", "ram_mb": -5, "generation": true}',
        b'{"vcpus": "8", "ram_mb": null, "vms": [], "state": 3}',
    ]),
)
NAMES = st.text(max_size=70) | st.from_regex(ms.NAME_RE, fullmatch=True)


@settings(max_examples=400, deadline=None)
@given(name=NAMES, raw=RAW)
def test_parse_functions_raise_only_spec_error(name: str, raw: bytes) -> None:
    for parse in (lambda: DesiredVM.parse(name, raw), lambda: Flavour.parse(name, raw),
                  lambda: Image.parse(name, raw), lambda: HostState.parse(raw)):
        try:
            parsed = parse()
        except SpecError as exc:
            assert 0 < len(str(exc)) <= 1000  # a reason an operator can read, never the whole value
            continue
        for f in dataclasses.fields(parsed):  # what is accepted has the declared types
            v = getattr(parsed, f.name)
            if f.type == "int":
                assert isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2 ** 53, (f.name, v)
            elif f.type == "str":
                assert isinstance(v, str), (f.name, v)
    claim = ActualVM.parse(raw)  # never raises: a mangled claim is an error record
    for f in dataclasses.fields(claim):
        v = getattr(claim, f.name)
        if f.type == "int":
            assert isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2 ** 53, (f.name, v)
        else:
            assert isinstance(v, str), (f.name, v)


@pytest.mark.parametrize("raw,reason", [
    (b"[" * 100_000, "nested too deeply"),
    (_deep(200), "nested too deeply"),
    (b'{"flavour": "small", "x": "' + b"y" * 300_000 + b'"}', "bytes, more than"),
    (b'{"flavour": "small", "n": ' + b"9" * 5000 + b"}", "not valid JSON"),
    (b'{"flavour": "small", "n": NaN}', "not valid JSON"),
    (b"\xff", "not valid JSON"),
    (b'{"flavour": ["' + b"x" * 10_000 + b'"]}', "'flavour' must be a flavour name"),
])
def test_desired_rejects_hostile_values_with_a_short_reason(raw: bytes, reason: str) -> None:
    with pytest.raises(SpecError, match=reason) as info:
        DesiredVM.parse("web1", raw)
    assert len(str(info.value)) < 300


@pytest.mark.parametrize("raw,reason", [
    (b"[" * 100_000, "nested too deeply"),
    (b'{"vcpus": "8", "ram_mb": 1024}', "'vcpus' must be"),
    (b'{"vcpus": 8}', "'ram_mb' is missing"),
    (b'{"vcpus": -8, "ram_mb": 1024}', "'vcpus' must be"),
    (b'{"vcpus": 8, "ram_mb": 1024, "state": ["ready"]}', "'state' must be"),
])
def test_host_record_rejects(raw: bytes, reason: str) -> None:
    with pytest.raises(SpecError, match=reason):
        HostState.parse(raw)


def test_host_record_roundtrip() -> None:
    h = HostState(8, 16384, 0, 0, 0, "ready")
    assert HostState.parse(h.encode()) == h


@pytest.mark.parametrize("raw,expected", [
    (b"[" * 100_000, ("", "error")),
    (b'{"host": ["n1"], "state": "running", "vcpus": 1}', ("", "running")),
    (b'{"host": 7, "state": 3}', ("", "error")),
    (b'{"host": "n1", "state": "running"}', ("n1", "running")),
])
def test_actual_record_owner_is_a_string_or_nobody(raw: bytes, expected: tuple[str, str]) -> None:
    a = ActualVM.parse(raw)
    assert (a.host, a.state) == expected


# -- image records: nothing from etcd reaches a file path unchecked ---------------

GOOD_IMAGE = {"pool": "metastack", "image": "base-tiny-0a1b2c3d", "snapshot": "base", "size": 4096,
              "kernel": "base-tiny-0a1b2c3d.kernel", "initrd": "base-tiny-0a1b2c3d.initrd",
              "cmdline": "console=ttyS0 root=/dev/vda quiet"}


def test_image_record_accepts_what_the_cli_writes() -> None:
    i = Image.parse("tiny", json.dumps(GOOD_IMAGE).encode())
    assert i.to_json() == GOOD_IMAGE
    assert Image.parse("t", b'{"pool": "p", "image": "i", "snapshot": "s", "size": 1}').direct_boot is False


@pytest.mark.parametrize("field,value,reason", [
    ("snapshot", "../..", "'snapshot' must be"),
    ("snapshot", "..", "'snapshot' must be"),
    ("image", "a/b", "'image' must be"),
    ("image", "a..b", "'image' must be"),
    ("image", "a@b", "'image' must be"),
    ("pool", ".hidden", "'pool' must be"),
    ("pool", "-rf", "'pool' must be"),
    ("pool", "", "'pool' must be"),
    ("pool", "x" * 129, "'pool' must be"),
    ("pool", 5, "'pool' must be"),
    ("kernel", "../../etc/shadow", "'kernel' must be"),
    ("kernel", "/boot/vmlinuz", "'kernel' must be"),
    ("initrd", "a\nb", "'initrd' must be"),
    ("initrd", "a\x00b", "'initrd' must be"),
    ("initrd", ["x"], "'initrd' must be"),
    ("cmdline", "console=ttyS0\ninit=/bin/sh", "'cmdline' must be"),
    ("cmdline", "a\x1b[2J", "'cmdline' must be"),
    ("cmdline", "x" * 2049, "'cmdline' must be"),
    ("cmdline", 1, "'cmdline' must be"),
    ("size", 2 ** 60, "'size' must be"),
])
def test_image_record_rejects_unsafe_fields(field: str, value: object, reason: str) -> None:
    rec = dict(GOOD_IMAGE, **{field: value})
    with pytest.raises(SpecError, match=reason):
        Image.parse("tiny", json.dumps(rec).encode())


@settings(max_examples=300, deadline=None)
@given(fields=st.dictionaries(st.sampled_from(["pool", "image", "snapshot", "kernel", "initrd"]),
                              st.text(max_size=12) | st.sampled_from(["..", ".", "a/../..", "x@y", "-", "_ok"])))
def test_boot_cache_paths_stay_below_the_cache_dir(fields: dict[str, str]) -> None:
    rec = dict(GOOD_IMAGE, **fields)
    try:
        image = Image.parse("tiny", json.dumps(rec).encode())
    except SpecError:
        return
    root = "/var/lib/metastack/cache"
    paths = image.boot_cache_paths(root)
    for p in paths:
        assert os.path.dirname(os.path.dirname(p)) == os.path.join(root, image.pool)
        assert os.path.normpath(p) == p and p.startswith(root + "/")
    assert [os.path.basename(p) for p in paths] == [image.kernel, image.initrd]


def test_boot_cache_paths_of_different_images_differ() -> None:
    a = Image("p", "a", "b", 1, "k", "i")
    b = Image("p", "a@b", "c", 1, "k", "i")  # would collide in "image@snapshot" if '@' were allowed
    with pytest.raises(SpecError):
        Image.parse("x", json.dumps(b.to_json()).encode())
    assert a.boot_cache_paths("/c")[0] == "/c/p/a@b/k"


# -- the cluster view: one bad key is one VM's problem ---------------------------

def test_view_survives_hostile_values() -> None:
    keys = ms.Keys("/ms")
    bad = b"[" * 100_000
    view = ms.ClusterView(keys)
    view.load(10, {keys.desired("bad"): Entry(bad, 2, 0, 2), keys.flavour("badf"): Entry(bad, 3, 0, 3),
                   keys.image("badi"): Entry(bad, 4, 0, 4), keys.actual("bada"): Entry(bad, 5, 7, 5),
                   keys.host("badh"): Entry(bad, 6, 7, 6),
                   keys.host("typed"): Entry(b'{"vcpus": "8", "ram_mb": {}}', 7, 7, 7),
                   keys.desired("good"): Entry(b'{"flavour": "small"}', 8, 0, 8),
                   keys.flavour("small"): Entry(b'{"vcpus": 1, "ram_mb": 512}', 9, 0, 9)})
    snap = view.snapshot()
    assert isinstance(snap.desired["bad"], SpecError) and "nested too deeply" in str(snap.desired["bad"])
    assert isinstance(snap.flavours["badf"], SpecError) and isinstance(snap.images["badi"], SpecError)
    assert snap.untrusted["bada"].host == "" and snap.untrusted["bada"].state == "error"  # on no live lease
    assert snap.hosts == {}
    acts = ms.plan("n1", ms.Capacity(4, 4096), snap, {})
    assert ms.Action("claim", "good", state="running", vcpus=1, ram_mb=512) in acts
