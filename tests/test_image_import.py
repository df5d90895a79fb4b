"""``metastackctl image import`` refuses untrusted image files before it
touches Ceph or etcd (issue #6, finding 11). No Ceph needed: every refusal
here happens first; the config has no [ceph] section at all."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

import metastack as ms
from harness import EtcdServer
from metastackctl import _convert_to_raw, _image_format, cli


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


@pytest.fixture
def import_ctl(etcd: EtcdServer, prefix: str, tmp_path: Path):
    conf = tmp_path / "ctl.ini"
    conf.write_text(f"[etcd]\nendpoints = {etcd.endpoint}\nprefix = {prefix}\n")

    def run(*args: str):
        return CliRunner().invoke(cli, ["-c", str(conf), "image", "import", *args])
    return run


def make_backed(tmp_path: Path) -> Path:
    p = tmp_path / "x.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", "/etc/hostname", "-F", "raw", str(p))
    return p


def make_data_file(tmp_path: Path) -> Path:
    p = tmp_path / "d.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", f"data_file={tmp_path / 'outside.raw'},data_file_raw=on", str(p), "1M")
    return p


def make_vdi(tmp_path: Path) -> Path:
    p = tmp_path / "v.vdi"
    qemu_img("create", "-f", "vdi", str(p), "1M")
    return p


def make_vmdk(tmp_path: Path) -> Path:
    """A vmdk descriptor whose extent is a host file."""
    p = tmp_path / "e.vmdk"
    p.write_text('# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType="monolithicFlat"\n'
                 'RW 1 FLAT "/etc/hostname" 0\n')
    return p


@pytest.mark.parametrize("make,message", [
    (make_backed, "has a backing file (/etc/hostname)"),
    (make_data_file, "keeps its data in an external file"),
    (make_vdi, "is in vdi format: only raw and qcow2"),
    (make_vmdk, "is in vmdk format: only raw and qcow2"),
])
def test_import_refuses_images_that_refer_to_other_files(import_ctl, store: ms.Store, tmp_path: Path,
                                                         make, message: str) -> None:
    image = make(tmp_path)
    r = import_ctl("x", str(image))
    assert r.exit_code == 2, r.output
    assert message in r.output and "Error: Invalid value for FILE" in r.output
    _, entries = store.list_prefix(store.keys.all)
    assert entries == {}


def test_import_refuses_unsafe_record_fields_before_ceph(import_ctl, store: ms.Store, tmp_path: Path) -> None:
    good = tmp_path / "good.img"
    good.write_bytes(b"\0" * 4096)
    r = import_ctl("x", str(good), "--kernel", str(good), "--initrd", str(good), "--cmdline", "quiet\ninit=/bin/sh",
                   "--pool", "metastack")
    assert r.exit_code == 2 and "'cmdline' must be one line of printable ASCII" in r.output, r.output
    r = import_ctl("x", str(good), "--pool", "../etc")
    assert r.exit_code == 2 and "'pool' must be a Ceph name" in r.output, r.output
    _, entries = store.list_prefix(store.keys.all)
    assert entries == {}


def test_format_of_acceptable_images(tmp_path: Path) -> None:
    raw = tmp_path / "a.img"
    raw.write_bytes(b"\0" * 8192)
    assert _image_format(str(raw)) == ("raw", 8192)
    q = tmp_path / "a.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raw), str(q))
    assert _image_format(str(q)) == ("qcow2", 8192)


def test_conversion_reads_the_file_as_the_format_given(tmp_path: Path) -> None:
    """A raw disk whose first sector looks like a qcow2 header with a backing
    file (a guest can write that) stays those bytes: with -f raw qemu-img
    does not probe it and reads no backing file."""
    disguised = tmp_path / "disguised.img"
    disguised.write_bytes(make_backed(tmp_path).read_bytes())
    out = tmp_path / "out.raw"
    _convert_to_raw(str(disguised), "raw", str(out))
    data = disguised.read_bytes()
    assert out.read_bytes()[:len(data)] == data
