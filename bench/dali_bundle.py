"""DALI for a bare device machine (Python 3.12, no package index): build a small bundle here, install it there.

    python -m bench.dali_bundle build .dali            # here (PyPI reachable): .dali/part.aa, ... + manifest.json
    python -m bench.dali_bundle install DIR [DIR ...]  # there: the parts found in DIRs -> /tmp/dalisite, checked

The bundle is DALI (CUDA 13) and its libraries for one card architecture, as xz parts small enough
to carry (the device tool carries 64 MiB per call, the working tree included). What makes it small:

- every CUDA fat binary keeps only the code that card runs: its own cubins (``--arch``, default
  sm_90: H100/H200) and PTX it can JIT; the other architectures' payloads (sm_75 ... sm_120, already
  compressed inside the fat binary, so xz cannot shrink them) are zeroed in place, headers and
  offsets untouched, so nothing is relinked;
- symbol tables are stripped (``strip --strip-unneeded``; the dynamic symbols stay);
- what the JPEG path never loads is left out: the headers, nvCOMP (dlopened only by DALI's
  inflate operator), nvImageCodec's TIFF / JPEG 2000 / OpenCV / BMP / PNM extensions;
- ``xz -9e``.

Measured here (2026-12-01, DALI 2.4.0): 527 MB unpacked as the shared tool installs it, three xz
parts of up to 62 MiB; pruned 372 MB unpacked, 113 MB of other architectures' fat-binary payloads
zeroed, one part of 49 MiB at xz -9e (53 MiB at -6). So the device check carries it in one call.

``install`` checks every part against the manifest's sha256 (a missing or damaged part is named),
unpacks with the standard library only, and prints the two environment lines a process needs
(``gpu_check`` sets them for its later stages); ``--check`` then decodes a JPEG with DALI on the
GPU (``mixed``) in a child process. Import torch before nvidia.dali.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGES = ["nvidia-dali-cuda130", "nvidia-nvimgcodec-cu13<0.10,>=0.9", "nvidia-nvjpeg>=13,<14",
            "astunparse<=1.6.3,>=1.6.0", "gast<=0.7.0,>=0.3.3", "optree", "makefun"]
PLATFORM = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp"] + [
    a for p in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
                "manylinux_2_34_x86_64") for a in ("--platform", p)]
# paths under the site folder the JPEG path never loads
LEFT_OUT = ["nvidia/dali/include", "nvidia/nvimgcodec/include", "nvidia/libnvcomp",
            "nvidia/nvimgcodec/extensions/libopencv_ext.so.*", "nvidia/nvimgcodec/extensions/libnvtiff_ext.so.*",
            "nvidia/nvimgcodec/extensions/libtiff_ext.so.*", "nvidia/nvimgcodec/extensions/libnvjpeg2k_ext.so.*",
            "nvidia/nvimgcodec/extensions/libnvbmp_ext.so.*", "nvidia/nvimgcodec/extensions/libnvpnm_ext.so.*"]
SITE = "dalisite"
FATBIN_MAGIC = 0xBA55ED50
PART_MIB = 60


# ----------------------------------------------------------------------------- fat binaries
def _sections(data: bytes) -> dict[str, tuple[int, int]]:
    """ELF64 little-endian section name -> (file offset, size)."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return {}
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    heads = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    str_off, str_size = heads[shstrndx][4], heads[shstrndx][5]
    names = data[str_off:str_off + str_size]
    out = {}
    for name, typ, _flags, _addr, off, size in heads:
        end = names.index(b"\0", name)
        if typ != 8:  # SHT_NOBITS has no bytes in the file
            out[names[name:end].decode()] = (off, size)
    return out


def prune_fatbin(buf: bytearray, start: int, size: int, arch: int) -> tuple[int, int]:
    """Zero, in place, every entry of the fat binaries in ``buf[start:start+size]`` that a card of
    ``arch`` (90 = sm_90) cannot run: cubins of another architecture and PTX of a newer one.
    Returns (bytes kept, bytes zeroed) of entry payloads. Headers and sizes are untouched."""
    kept = zeroed = 0
    off, end = start, start + size
    while off + 16 <= end:
        magic, _ver, hsz, fsz = struct.unpack_from("<IHHQ", buf, off)
        if magic != FATBIN_MAGIC:
            off += 8  # containers are 8-byte aligned
            continue
        e, stop = off + hsz, off + hsz + fsz
        while e + 32 <= stop:
            kind, _ever, ehsz, psz = struct.unpack_from("<HHIQ", buf, e)
            if ehsz == 0:
                break
            entry_arch, = struct.unpack_from("<I", buf, e + 28)
            keep = (kind == 2 and entry_arch == arch) or (kind == 1 and entry_arch <= arch)
            p0 = e + ehsz
            if keep:
                kept += psz
            else:
                buf[p0:p0 + psz] = bytes(psz)
                zeroed += psz
            e = p0 + psz
        off = stop
    return kept, zeroed


def prune_file(path: Path, arch: int) -> tuple[int, int]:
    data = bytearray(path.read_bytes())
    secs = _sections(bytes(data))
    kept = zeroed = 0
    for name in (".nv_fatbin", "__nv_relfatbin"):
        if name in secs:
            k, z = prune_fatbin(data, *secs[name], arch)
            kept, zeroed = kept + k, zeroed + z
    if zeroed:
        path.write_bytes(bytes(data))
    return kept, zeroed


# ----------------------------------------------------------------------------- build (here)
def build(out: Path, arch: int = 90, part_mib: int = PART_MIB, level: str = "-9e", keep_work: str | None = None) -> dict:
    work = Path(keep_work or tempfile.mkdtemp(prefix="dali_bundle_"))
    site = work / SITE
    try:
        if not site.exists():
            pip = [sys.executable, "-m", "pip"]
            subprocess.run(pip + ["download", "-q", "--no-deps", *PLATFORM, "-d", str(work / "whl"), *PACKAGES], check=True)
            subprocess.run(pip + ["install", "-q", "--no-deps", "--target", str(site), *PLATFORM,
                                  *map(str, sorted((work / "whl").glob("*.whl")))], check=True)
        for p in list(site.rglob("*cpython-3*")):
            if "cpython-312" not in p.name:
                p.unlink()
        for p in list(site.rglob("__pycache__")):
            shutil.rmtree(p, ignore_errors=True)
        removed = []
        for pat in LEFT_OUT:
            for p in site.glob(pat):
                removed.append(str(p.relative_to(site)))
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        kept = zeroed = 0
        for p in sorted(site.rglob("*.so*")):
            if p.is_file() and not p.is_symlink():
                subprocess.run(["strip", "--strip-unneeded", str(p)], check=False, capture_output=True)
                k, z = prune_file(p, arch)
                kept, zeroed = kept + k, zeroed + z
        raw = sum(p.stat().st_size for p in site.rglob("*") if p.is_file() and not p.is_symlink())
        out.mkdir(parents=True, exist_ok=True)
        for p in out.glob("part.*"):
            p.unlink()
        tar = subprocess.Popen(["tar", "-cf", "-", "-C", str(work), SITE], stdout=subprocess.PIPE)
        xz = subprocess.Popen(["xz", "-T0", level], stdin=tar.stdout, stdout=subprocess.PIPE)
        subprocess.run(["split", "-b", f"{part_mib}m", "-", str(out / "part.")], stdin=xz.stdout, check=True)
        if tar.wait() or xz.wait():
            raise RuntimeError("dali_bundle: tar | xz failed")
        parts = {p.name: {"bytes": p.stat().st_size, "sha256": _sha(p)} for p in sorted(out.glob("part.*"))}
        manifest = {"arch": f"sm_{arch}", "packages": PACKAGES, "xz": level, "unpacked_bytes": raw,
                    "fatbin_payload_kept": kept, "fatbin_payload_zeroed": zeroed, "left_out": removed, "parts": parts,
                    "total_bytes": sum(v["bytes"] for v in parts.values())}
        (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        return manifest
    finally:
        if keep_work is None:
            shutil.rmtree(work, ignore_errors=True)


def _sha(p: Path) -> str:
    h = hashlib.sha256()
    with p.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- install (there)
class BundleError(RuntimeError):
    pass


def find_parts(dirs: list[Path]) -> tuple[dict, dict[str, Path]]:
    """(manifest, part name -> path) from the first manifest found and every part in ``dirs``."""
    manifest = None
    for d in dirs:
        if (d / "manifest.json").exists():
            manifest = json.loads((d / "manifest.json").read_text())
            break
    if manifest is None:
        raise BundleError(f"no DALI bundle manifest.json in {', '.join(map(str, dirs))} (build one with "
                          "`python -m bench.dali_bundle build DIR` and carry DIR)")
    found = {}
    for d in dirs:
        for p in d.glob("part.*"):
            if p.name in manifest["parts"] and p.name not in found and _sha(p) == manifest["parts"][p.name]["sha256"]:
                found[p.name] = p
    missing = [n for n in manifest["parts"] if n not in found]
    if missing:
        raise BundleError(f"DALI bundle incomplete: {', '.join(missing)} of {len(manifest['parts'])} parts missing or "
                          f"damaged in {', '.join(map(str, dirs))} (carry the whole folder built by "
                          "`python -m bench.dali_bundle build`)")
    return manifest, found


def install(dirs: list[Path], dest: Path = Path("/tmp")) -> dict:
    """Unpack the bundle under ``dest/dalisite``; returns the environment additions."""
    site = dest / SITE
    if (site / "nvidia" / "dali" / "__init__.py").exists():
        return env_for(site)
    manifest, found = find_parts(dirs)
    tmp = dest / (SITE + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with _Joined([found[n] for n in sorted(manifest["parts"])]) as raw, lzma.open(raw) as xz, \
            tarfile.open(fileobj=xz, mode="r|") as tar:
        if hasattr(tarfile, "tar_filter"):
            tar.extractall(tmp, filter="tar")
        else:
            tar.extractall(tmp)
    (tmp / SITE / "nvidia" / "__init__.py").unlink(missing_ok=True)  # nvidia/ is a namespace shared with torch's libs
    shutil.rmtree(site, ignore_errors=True)
    (tmp / SITE).rename(site)
    shutil.rmtree(tmp, ignore_errors=True)
    return env_for(site)


CHECK = """
import io, sys
import numpy as np
import torch
from PIL import Image
from nvidia.dali import fn, pipeline_def, types
buf = io.BytesIO()
Image.fromarray(np.full((48, 64, 3), 120, np.uint8)).save(buf, "JPEG")
data = np.frombuffer(buf.getvalue(), np.uint8)
@pipeline_def(batch_size=2, num_threads=2, device_id=0 if torch.cuda.is_available() else None)
def pipe():
    j = fn.external_source(source=lambda: [data, data], batch=True)
    return fn.decoders.image(j, device="mixed" if torch.cuda.is_available() else "cpu", output_type=types.RGB)
p = pipe()
p.build()
(out,) = p.run()
img = np.asarray(out.as_cpu()[0]) if torch.cuda.is_available() else np.asarray(out[0])
assert img.shape == (48, 64, 3) and abs(int(img.mean()) - 120) <= 3, (img.shape, img.mean())
import nvidia.dali as d
print("DALI", d.__version__, "decoded on", "GPU (mixed)" if torch.cuda.is_available() else "CPU")
"""


def check(env: dict) -> str:
    """Import torch then DALI and decode a JPEG on the GPU (the CPU without CUDA) in a child process."""
    p = subprocess.run([sys.executable, "-c", CHECK], env=merged_env(dict(os.environ), env), capture_output=True, text=True,
                       timeout=300)
    if p.returncode != 0:
        raise BundleError(f"DALI bundle installed but its check failed: {(p.stderr.strip().splitlines() or ['?'])[-1]}")
    return p.stdout.strip()


def env_for(site: Path) -> dict:
    libs = [site / "nvidia" / "cu13" / "lib", site / "nvidia" / "nvimgcodec"]
    return {"PYTHONPATH": str(site), "LD_LIBRARY_PATH": os.pathsep.join(str(p) for p in libs)}


def merged_env(base: dict, add: dict) -> dict:
    """``base`` with ``add``'s paths put in front of the existing ones."""
    out = dict(base)
    for k, v in add.items():
        out[k] = v + (os.pathsep + base[k] if base.get(k) else "")
    return out


class _Joined:
    """The parts read as one stream, in order."""

    def __init__(self, paths):
        self.files = [open(p, "rb") for p in paths]
        self.i = 0

    def read(self, n=-1):
        out = b""
        while self.i < len(self.files) and (n < 0 or len(out) < n):
            chunk = self.files[self.i].read(-1 if n < 0 else n - len(out))
            if not chunk:
                self.i += 1
                continue
            out += chunk
        return out

    def readable(self):
        return True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for f in self.files:
            f.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="download, prune, compress into OUT (git-ignored)")
    b.add_argument("out")
    b.add_argument("--arch", type=int, default=90, help="the card's compute capability x10 (90: H100/H200)")
    b.add_argument("--part-mib", type=int, default=PART_MIB)
    b.add_argument("--xz", default="-9e", help="xz preset")
    b.add_argument("--work", default=None, help="keep the unpacked site here (reused by the next build)")
    i = sub.add_parser("install", help="assemble the parts found in DIRs and unpack them")
    i.add_argument("dirs", nargs="+")
    i.add_argument("--dest", default="/tmp")
    i.add_argument("--check", action="store_true", help="then import it and decode a JPEG on the GPU")
    a = ap.parse_args(argv)
    if a.cmd == "build":
        m = build(Path(a.out), a.arch, a.part_mib, a.xz, a.work)
        print(json.dumps({k: v for k, v in m.items() if k != "packages"}, indent=1))
        return 0
    try:
        env = install([Path(d) for d in a.dirs], Path(a.dest))
        if a.check:
            print(check(env))
    except BundleError as e:
        print(f"dali_bundle: {e}", file=sys.stderr)
        return 2
    for k, v in env.items():
        print(f"export {k}={v}:${k}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
