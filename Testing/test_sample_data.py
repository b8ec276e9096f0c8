"""Sample CT download cache: extraction, checksums, archive safety and reuse, all offline."""

from __future__ import annotations

import hashlib
import io
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest

from LungUDRNetLib import sample_data
from LungUDRNetLib.errors import LungUDRNetError
from LungUDRNetLib.sample_data import SampleDataError

TOP = "pyradiomics-3.0.1"
FAKE = {"lung1_image.nrrd": b"fake lung one " * 1000, "lung2_image.nrrd": b"fake lung two " * 2000}
FAKE_SUMS = {name: hashlib.sha256(data).hexdigest() for name, data in FAKE.items()}


def add_file(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def make_sdist(directory: Path, extra: list[tarfile.TarInfo | tuple[str, bytes]] = ()) -> Path:
    """A small stand-in for pyradiomics-3.0.1.tar.gz with fake data files."""
    path = directory / f"{TOP}.tar.gz"
    with tarfile.open(path, "w:gz") as archive:
        add_file(archive, f"{TOP}/setup.py", b"print('not run')\n")
        for name, data in FAKE.items():
            add_file(archive, f"{TOP}/data/{name}", data)
        add_file(archive, f"{TOP}/data/lung1_label.nrrd", b"label")
        for item in extra:
            if isinstance(item, tarfile.TarInfo):
                archive.addfile(item)
            else:
                add_file(archive, *item)
    return path


@pytest.fixture
def fake_download(tmp_path, monkeypatch):
    """Replace pip with a fake archive and the real checksums with the fake ones; count downloads."""
    calls = []

    def download(directory: Path) -> Path:
        calls.append(directory)
        return make_sdist(directory)

    monkeypatch.setattr(sample_data, "download_sdist", download)
    monkeypatch.setattr(sample_data, "CHECKSUMS", FAKE_SUMS)
    return calls


def test_extract_writes_only_the_verified_files(tmp_path):
    sdist = make_sdist(tmp_path)
    dest = tmp_path / "cache"
    paths = sample_data.extract_sample_files(sdist, dest, FAKE_SUMS)
    assert paths == {name: dest / name for name in FAKE}
    for name, data in FAKE.items():
        assert (dest / name).read_bytes() == data
    assert sorted(p.name for p in dest.iterdir()) == sorted(FAKE)  # no label, no .part files


def test_wrong_checksum_raises_and_leaves_nothing(tmp_path):
    sdist = make_sdist(tmp_path)
    dest = tmp_path / "cache"
    wrong = {**FAKE_SUMS, "lung2_image.nrrd": "0" * 64}
    with pytest.raises(SampleDataError, match="lung2_image.nrrd.*SHA-256"):
        sample_data.extract_sample_files(sdist, dest, wrong)
    assert not (dest / "lung2_image.nrrd").exists()
    assert not list(dest.glob("*.part"))


@pytest.mark.parametrize("name", [f"{TOP}/data/../../lung1_image.nrrd", "../lung1_image.nrrd",
                                  "/tmp/lung1_image.nrrd"])
def test_path_traversal_member_is_refused(tmp_path, name):
    sdist = make_sdist(tmp_path, [(name, b"evil")])
    dest = tmp_path / "deep" / "cache"
    with pytest.raises(SampleDataError, match="unsafe"):
        sample_data.extract_sample_files(sdist, dest, FAKE_SUMS)
    assert not (tmp_path / "lung1_image.nrrd").exists()
    assert not (tmp_path / "deep" / "lung1_image.nrrd").exists()


def test_link_member_is_refused(tmp_path):
    link = tarfile.TarInfo(f"{TOP}/data/lung1_image.nrrd")
    link.type = tarfile.SYMTYPE
    link.linkname = "/etc/passwd"
    path = tmp_path / "links.tar.gz"
    with tarfile.open(path, "w:gz") as archive:
        archive.addfile(link)
    with pytest.raises(SampleDataError, match="unsafe"):
        sample_data.extract_sample_files(path, tmp_path / "cache", {"lung1_image.nrrd": FAKE_SUMS["lung1_image.nrrd"]})


def test_missing_member_is_reported(tmp_path):
    path = tmp_path / "empty.tar.gz"
    with tarfile.open(path, "w:gz") as archive:
        add_file(archive, f"{TOP}/README.md", b"x")
    with pytest.raises(SampleDataError, match="no data/lung1_image.nrrd"):
        sample_data.extract_sample_files(path, tmp_path / "cache", FAKE_SUMS)


def test_download_once_then_reuse_the_cache(tmp_path, fake_download):
    cache = tmp_path / "cache"
    paths = sample_data.sample_ct_paths(cache)
    assert paths == {"lung1": cache / "lung1_image.nrrd", "lung2": cache / "lung2_image.nrrd"}
    assert paths["lung2"].read_bytes() == FAKE["lung2_image.nrrd"]
    assert len(fake_download) == 1
    assert sample_data.sample_ct_paths(cache) == paths
    assert len(fake_download) == 1  # no second download


def test_existing_cache_is_used_without_download(tmp_path, monkeypatch):
    for name, data in FAKE.items():
        (tmp_path / name).write_bytes(data)
    monkeypatch.setattr(sample_data, "CHECKSUMS", FAKE_SUMS)

    def no_download(directory):
        raise AssertionError("must not download")

    monkeypatch.setattr(sample_data, "download_sdist", no_download)
    assert sample_data.sample_ct_paths(tmp_path)["lung1"] == tmp_path / "lung1_image.nrrd"


def test_corrupt_cached_file_is_fetched_again(tmp_path, fake_download):
    (tmp_path / "lung1_image.nrrd").write_bytes(b"truncated")
    (tmp_path / "lung2_image.nrrd").write_bytes(FAKE["lung2_image.nrrd"])
    sample_data.sample_ct_paths(tmp_path)
    assert len(fake_download) == 1
    assert (tmp_path / "lung1_image.nrrd").read_bytes() == FAKE["lung1_image.nrrd"]


def test_failed_download_says_how_to_fix(tmp_path, monkeypatch):
    def offline(directory):
        raise SampleDataError("pip could not download the pyradiomics 3.0.1 source archive (offline)")

    monkeypatch.setattr(sample_data, "download_sdist", offline)
    with pytest.raises(SampleDataError) as raised:
        sample_data.sample_ct_paths(tmp_path / "cache")
    message = str(raised.value)
    assert "offline" in message and "by hand" in message and str(tmp_path / "cache") in message
    assert isinstance(raised.value, LungUDRNetError)


def test_pip_failure_becomes_a_sample_data_error(tmp_path, monkeypatch):
    def failing_pip(command, **kwargs):
        assert command[1:4] == ["-m", "pip", "download"] and "pyradiomics==3.0.1" in command
        return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution found\n")

    monkeypatch.setattr(sample_data.subprocess, "run", failing_pip)
    with pytest.raises(SampleDataError, match="No matching distribution"):
        sample_data.download_sdist(tmp_path)


def test_cache_directory_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(sample_data.CACHE_ENV, str(tmp_path))
    assert sample_data.default_cache_dir() == tmp_path / "sample_data"
    monkeypatch.delenv(sample_data.CACHE_ENV)
    assert sample_data.default_cache_dir() == Path.home() / ".cache" / "lungudrnet" / "sample_data"


def test_unknown_name_and_command_line(tmp_path, fake_download, capsys):
    with pytest.raises(SampleDataError, match="unknown sample CT"):
        sample_data.load_sample_ct("lung3", tmp_path)
    assert sample_data.main(["--cache-dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"lung1\t{tmp_path / 'lung1_image.nrrd'}", f"lung2\t{tmp_path / 'lung2_image.nrrd'}"]


@pytest.mark.parametrize("name, size, spacing", [("lung1", (512, 512, 48), (0.5703125, 0.5703125, 5.0)),
                                                 ("lung2", (512, 512, 61), (0.6269531, 0.6269531, 5.0))])
def test_real_cached_ct(name, size, spacing):
    path = sample_data.default_cache_dir() / sample_data.SAMPLE_FILES[name]
    if not path.is_file() or sample_data.sha256(path) != sample_data.CHECKSUMS[path.name]:
        pytest.skip(f"sample CT {name} not in the cache; fetch it with: python -m LungUDRNetLib.sample_data")
    image = sample_data.load_sample_ct(name)
    assert image.GetSize() == size
    np.testing.assert_allclose(image.GetSpacing(), spacing, rtol=1e-6)
    assert image.GetNumberOfComponentsPerPixel() == 1
