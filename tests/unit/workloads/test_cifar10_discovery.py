"""Where the CIFAR-10 archive is looked for, in which order, and what the user is told when it
is nowhere. No network: the download is replaced by a recorder."""

from __future__ import annotations

from pathlib import Path

import pytest

from batchscope.errors import DataNotFoundError, UsageError
from batchscope.workloads import cifar10_data
from batchscope.workloads.cifar10_data import ARCHIVE_NAME, find_archive
from batchscope.workloads.download import OFFICIAL_NAME, OFFICIAL_URL


@pytest.fixture
def layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """An isolated world: a fake checkout, a current directory, a cache; nothing exists yet."""
    checkout = tmp_path / "checkout" / "repo"
    working = tmp_path / "elsewhere" / "cwd"
    cache = tmp_path / "cache"
    for directory in (checkout, working, cache):
        directory.mkdir(parents=True)
    monkeypatch.setattr(cifar10_data, "source_checkout_root", lambda: checkout)
    monkeypatch.chdir(working)
    monkeypatch.setenv("BATCHSCOPE_CACHE_DIR", str(cache))
    monkeypatch.delenv("BATCHSCOPE_CIFAR10", raising=False)
    monkeypatch.delenv("BATCHSCOPE_DOWNLOAD", raising=False)
    downloads: list[Path] = []

    def fake_download(directory: Path) -> Path:
        downloads.append(directory)
        return directory / OFFICIAL_NAME

    monkeypatch.setattr(cifar10_data, "download_official_archive", fake_download)
    return {
        "explicit": _touch(tmp_path / "explicit" / "mine.tar.xz"),
        "env": tmp_path / "env" / "from-env.tar.xz",
        "checkout": checkout.parent / "shared" / "data" / ARCHIVE_NAME,
        "cwd": working.parent / "shared" / "data" / ARCHIVE_NAME,
        "cache_jpg": cache / ARCHIVE_NAME,
        "cache_bin": cache / OFFICIAL_NAME,
        "cache": cache,
        "downloads": downloads,  # type: ignore[dict-item]
    }


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"archive")
    return path


def test_each_place_wins_over_the_ones_after_it(layout, monkeypatch):
    for name in ("cache_bin", "cache_jpg", "cwd", "checkout"):
        _touch(layout[name])
        assert find_archive() == layout[name]
    _touch(layout["env"])
    monkeypatch.setenv("BATCHSCOPE_CIFAR10", str(layout["env"]))
    assert find_archive() == layout["env"]
    assert find_archive(data_path=layout["explicit"]) == layout["explicit"]
    assert layout["downloads"] == []


def test_nothing_found_names_every_place_and_the_fixes(layout):
    with pytest.raises(DataNotFoundError) as caught:
        find_archive()
    message = str(caught.value)
    assert "\n" not in message
    for name in ("checkout", "cwd", "cache_jpg", "cache_bin"):
        assert str(layout[name]) in message
    for fix in (
        "data_path",
        "BATCHSCOPE_CIFAR10",
        "BATCHSCOPE_DOWNLOAD=1",
        "download=True",
        OFFICIAL_URL,
    ):
        assert fix in message
    assert layout["downloads"] == []
    assert isinstance(caught.value, UsageError)


def test_download_only_when_allowed(layout, monkeypatch):
    assert find_archive(download=True) == layout["cache_bin"]
    assert layout["downloads"] == [layout["cache"]]
    monkeypatch.setenv("BATCHSCOPE_DOWNLOAD", "1")
    find_archive()
    assert len(layout["downloads"]) == 2
    # An explicit download=False beats the environment.
    with pytest.raises(DataNotFoundError):
        find_archive(download=False)
    assert len(layout["downloads"]) == 2


def test_download_is_not_needed_when_an_archive_exists(layout):
    _touch(layout["cwd"])
    assert find_archive(download=True) == layout["cwd"]
    assert layout["downloads"] == []


def test_explicit_places_do_not_fall_back(layout, monkeypatch):
    _touch(layout["cache_jpg"])  # would be found implicitly
    missing = layout["explicit"].parent / "missing.tar.xz"
    with pytest.raises(DataNotFoundError, match="data_path option .*missing.tar.xz does not exist"):
        find_archive(data_path=missing)
    monkeypatch.setenv("BATCHSCOPE_CIFAR10", str(missing))
    with pytest.raises(DataNotFoundError, match="BATCHSCOPE_CIFAR10"):
        find_archive()


def test_a_directory_is_searched_for_either_archive_name(layout, tmp_path):
    directory = tmp_path / "data-dir"
    directory.mkdir()
    with pytest.raises(DataNotFoundError, match="directory without"):
        find_archive(data_path=directory)
    _touch(directory / OFFICIAL_NAME)
    assert find_archive(data_path=directory) == directory / OFFICIAL_NAME
    _touch(directory / ARCHIVE_NAME)
    assert find_archive(data_path=directory) == directory / ARCHIVE_NAME


def test_cache_dir_defaults_to_home(monkeypatch, tmp_path):
    monkeypatch.delenv("BATCHSCOPE_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cifar10_data.cache_dir() == tmp_path / ".cache" / "batchscope"


def test_checkout_root_is_the_repository_holding_this_package():
    root = cifar10_data.source_checkout_root()
    # Tests run from a source checkout (editable install): the root has src/batchscope.
    assert root is not None and (root / "src" / "batchscope" / "workloads").is_dir()
