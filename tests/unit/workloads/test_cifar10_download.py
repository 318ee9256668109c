"""The official-archive download, exercised through file:// URLs (no network)."""

from __future__ import annotations

import hashlib

import pytest

from batchscope.errors import DataNotFoundError
from batchscope.workloads import download
from batchscope.workloads.download import download_file, download_official_archive


def _source(tmp_path, content: bytes = b"archive bytes" * 1000):
    path = tmp_path / "remote" / "cifar-10-binary.tar.gz"
    path.parent.mkdir()
    path.write_bytes(content)
    return path.as_uri(), hashlib.md5(content).hexdigest(), content


def test_download_with_matching_md5(tmp_path):
    url, md5, content = _source(tmp_path)
    target = tmp_path / "cache" / "cifar-10-binary.tar.gz"
    assert download_file(url, target, md5) == target
    assert target.read_bytes() == content
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]


def test_md5_mismatch_discards_the_file(tmp_path):
    url, _, _ = _source(tmp_path)
    target = tmp_path / "cache" / "cifar-10-binary.tar.gz"
    with pytest.raises(DataNotFoundError, match="MD5"):
        download_file(url, target, "0" * 32)
    assert list(target.parent.iterdir()) == []


def test_unreachable_url_says_how_to_fix(tmp_path):
    target = tmp_path / "cache" / "x.tar.gz"
    with pytest.raises(DataNotFoundError, match="download it by hand"):
        download_file((tmp_path / "absent").as_uri(), target, None)
    assert not target.exists()


def test_official_archive_is_fetched_once(tmp_path, monkeypatch):
    url, md5, content = _source(tmp_path)
    monkeypatch.setattr(download, "OFFICIAL_URL", url)
    monkeypatch.setattr(download, "OFFICIAL_MD5", md5)
    cache = tmp_path / "cache"
    path = download_official_archive(cache)
    assert path == cache / "cifar-10-binary.tar.gz" and path.read_bytes() == content
    monkeypatch.setattr(download, "OFFICIAL_URL", (tmp_path / "gone").as_uri())
    assert download_official_archive(cache) == path  # present: not fetched again


def test_official_source_is_the_binary_not_the_pickled_version():
    assert download.OFFICIAL_URL.endswith("cifar-10-binary.tar.gz")
    assert download.OFFICIAL_MD5 == "c32a1d4ab5d03f1284b67883e8d87530"
