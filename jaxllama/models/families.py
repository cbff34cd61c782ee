"""The registry of families: GGUF architecture name -> `Family` page, and the presets.

The built-in pages are `qwen`, `phi3` and `llama`; `register_family` adds another (a
fourth family is one `Family` of data, see `jaxllama.models.family`). Everything that
asks "which family is this file?" (`config_from_gguf`, the loader, `ModelType`) asks
`family_for`. JAX-free.
"""

from __future__ import annotations

from typing import Callable

from jaxllama.errors import InvalidModelType, InvalidRequestError
from jaxllama.models import llama, phi3, qwen
from jaxllama.models.config import ModelConfig
from jaxllama.models.family import Family

FAMILIES: dict[str, Family] = {f.arch: f for f in (qwen.FAMILY, phi3.FAMILY, llama.FAMILY)}

# Published configs by name (`jaxllama bench --preset`): name -> a function making it.
PRESETS: dict[str, Callable[[], ModelConfig]] = {**qwen.PRESETS, **phi3.PRESETS, **llama.PRESETS}
_BUILTIN = frozenset(FAMILIES)
_ADDED_PRESETS: dict[str, tuple[str, ...]] = {}  # arch -> the preset names registered with it


def family_for(arch: str) -> Family:
    """The family of GGUF architecture `arch`; InvalidModelType for one not registered."""
    family = FAMILIES.get(arch)
    if family is None:
        raise InvalidModelType(
            arch, f"GGUF architecture {arch!r} is not supported; supported: " + ", ".join(FAMILIES)
        )
    return family


def register_family(family: Family, presets: dict[str, Callable[[], ModelConfig]] | None = None) -> Family:
    """Add `family` (and its named presets); its architecture name must be new."""
    if family.arch in FAMILIES:
        raise InvalidRequestError(f"a family of architecture {family.arch!r} is already registered")
    for name in presets or {}:
        if name in PRESETS:
            raise InvalidRequestError(f"a preset named {name!r} is already registered")
    FAMILIES[family.arch] = family
    PRESETS.update(presets or {})
    _ADDED_PRESETS[family.arch] = tuple(presets or ())
    return family


def unregister_family(arch: str) -> None:
    """Remove a family added by `register_family`, with its presets (the built-ins stay)."""
    if arch in _BUILTIN:
        raise InvalidRequestError(f"the built-in family {arch!r} cannot be removed")
    FAMILIES.pop(arch, None)
    for name in _ADDED_PRESETS.pop(arch, ()):
        PRESETS.pop(name, None)


def preset(name: str) -> ModelConfig:
    """The published config called `name` (see `PRESETS`)."""
    if name not in PRESETS:
        raise InvalidRequestError(f"preset {name!r} is not known; presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]()
