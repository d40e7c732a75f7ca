"""The DALI bundle for the device check (``bench.dali_bundle``): fat-binary pruning, parts, install."""

import hashlib
import io
import json
import lzma
import struct
import tarfile

import pytest

from bench import dali_bundle as db


def _entry(kind: int, arch: int, payload: bytes) -> bytes:
    """One fat-binary entry: a 64-byte header (kind, version, header size, payload size, ..., arch at 28)."""
    head = bytearray(64)
    struct.pack_into("<HHIQ", head, 0, kind, 0x101, 64, len(payload))
    struct.pack_into("<I", head, 28, arch)
    return bytes(head) + payload


def _container(*entries: bytes) -> bytes:
    body = b"".join(entries)
    return struct.pack("<IHHQ", db.FATBIN_MAGIC, 1, 16, len(body)) + body


def test_prune_keeps_the_cards_code_and_zeroes_the_rest_in_place():
    sm80, sm90, ptx120, ptx80 = b"\x80" * 40, b"\x90" * 24, b"\x12" * 32, b"\x08" * 16
    blob = _container(_entry(2, 80, sm80), _entry(2, 90, sm90), _entry(1, 120, ptx120)) + bytes(8) + _container(
        _entry(1, 80, ptx80))
    buf = bytearray(b"HEAD" * 4 + blob + b"TAIL")
    before = bytes(buf)
    kept, zeroed = db.prune_fatbin(buf, 16, len(blob), 90)
    assert (kept, zeroed) == (len(sm90) + len(ptx80), len(sm80) + len(ptx120))
    assert len(buf) == len(before) and buf[:16] == before[:16] and buf[-4:] == b"TAIL"  # nothing moves
    assert sm90 in buf and ptx80 in buf and sm80 not in buf and ptx120 not in buf
    # every header is untouched: the same containers parse again, nothing left to zero
    assert db.prune_fatbin(buf, 16, len(blob), 90) == (kept, zeroed)
    assert sum(a != b for a, b in zip(buf, before)) <= zeroed


def _bundle(tmp_path, part_bytes=300):
    """A fake site packed as the build packs it: tar | xz, split into parts, with a manifest."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, data in {"dalisite/nvidia/__init__.py": b"", "dalisite/nvidia/dali/__init__.py": b"x = 1\n",
                           "dalisite/nvidia/cu13/lib/libfake.so": bytes(range(256)) * 8}.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    xz = lzma.compress(raw.getvalue())
    out = tmp_path / "bundle"
    out.mkdir()
    parts = {}
    for i in range(0, len(xz), part_bytes):
        name = f"part.a{chr(ord('a') + i // part_bytes)}"
        (out / name).write_bytes(xz[i:i + part_bytes])
        parts[name] = {"bytes": len(xz[i:i + part_bytes]), "sha256": hashlib.sha256(xz[i:i + part_bytes]).hexdigest()}
    (out / "manifest.json").write_text(json.dumps({"parts": parts}))
    return out, parts


def test_install_joins_the_parts_and_sets_the_paths(tmp_path):
    out, parts = _bundle(tmp_path)
    assert len(parts) >= 2
    env = db.install([out], tmp_path / "dest")
    site = tmp_path / "dest" / "dalisite"
    assert (site / "nvidia" / "dali" / "__init__.py").read_text() == "x = 1\n"
    assert not (site / "nvidia" / "__init__.py").exists()  # nvidia/ stays a namespace shared with torch's CUDA libraries
    assert env["PYTHONPATH"] == str(site) and str(site / "nvidia" / "cu13" / "lib") in env["LD_LIBRARY_PATH"]
    merged = db.merged_env({"PYTHONPATH": "/repo", "LD_LIBRARY_PATH": ""}, env)
    assert merged["PYTHONPATH"] == f"{site}:/repo" and merged["LD_LIBRARY_PATH"] == env["LD_LIBRARY_PATH"]


def test_a_missing_or_damaged_part_is_named(tmp_path):
    out, parts = _bundle(tmp_path)
    last = sorted(parts)[-1]
    (out / last).unlink()
    with pytest.raises(db.BundleError, match=f"{last} of {len(parts)} parts missing or damaged"):
        db.install([out], tmp_path / "dest")
    first = sorted(parts)[0]
    (out / first).write_bytes(b"not it")
    with pytest.raises(db.BundleError, match=first):
        db.find_parts([out])
    with pytest.raises(db.BundleError, match="no DALI bundle manifest"):
        db.find_parts([tmp_path / "nothing"])
    assert not (tmp_path / "dest" / "dalisite").exists()  # nothing half-installed under the final name
