"""What one family is, as data: the `Family` page, and its published loader object.

Qwen2.5, Phi-3 and Llama 3 are one architecture with switches. A family says only its
GGUF architecture name, which `ModelType` (model functions) runs it, its rotary style,
which `rope.scaling.type` values its files may carry, how its tensor names differ from
llama.cpp's common ones (`jaxllama.models.params_spec.FIELDS`), and which fields its
files store fused in one tensor. The q/k/v biases and a separate output projection are
the file's to say (their tensors are present or not). A new family is one such page plus
`jaxllama.models.families.register_family`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Any, Mapping

from jaxllama import hub
from jaxllama.errors import InvalidModelType, InvalidRequestError
from jaxllama.models.config import ROPE_HALF, ROPE_INTERLEAVED, ModelConfig, ModelType
from jaxllama.models.params_spec import FIELDS, check_family_names

if TYPE_CHECKING:
    from jaxllama.models.weights import LoadedModel

# The rope scaling types every family accepts (the frequency tensors say the rest).
COMMON_ROPE_SCALING = ("none", "linear", "longrope")


@dataclasses.dataclass(frozen=True, eq=False)
class Family:
    """One family's switches and GGUF names (see the module doc).

    `fused` maps a tensor name (`{i}` the layer) to the fields stacked in it by rows, in
    order: Phi-3's `attn_qkv` holds wq, wk, wv; its `ffn_up` holds w_gate then w_up.
    `tensor_names` maps a field to this family's tensor name where it is not llama.cpp's
    usual one. `rope_scaling_types` lists the accepted `{arch}.rope.scaling.type` values
    (None: any; the factor tensors present decide).
    """

    arch: str
    model_type: ModelType
    rope_style: str
    fused: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    tensor_names: Mapping[str, str] = dataclasses.field(default_factory=dict)
    rope_scaling_types: tuple[str, ...] | None = COMMON_ROPE_SCALING

    def __post_init__(self):
        where = f"family {self.arch!r}"
        check_family_names(self.tensor_names, self.fused, where)
        if self.rope_style not in (ROPE_INTERLEAVED, ROPE_HALF):
            raise InvalidRequestError(
                f"{where}: rope_style {self.rope_style!r} is not one of {ROPE_INTERLEAVED}, {ROPE_HALF}"
            )

    def tensor_name(self, field: str) -> str:
        """This family's GGUF name of an unfused field (`{i}`: the layer index)."""
        return self.tensor_names.get(field, FIELDS[field].gguf)


class FamilyLoader:
    """`XWeightLoader.load_to_vram(path, config)` of the published design, for one family.

    The file must be of this loader's family: a Phi-3 file given to the Qwen loader is an
    `InvalidModelType` naming the file's family.
    """

    def __init__(self, model_type: ModelType, name: str):
        self.model_type = model_type
        self.__name__ = self.__qualname__ = name

    def load_to_vram(self, path: str | os.PathLike, config: ModelConfig | None = None, *,
                     dtype: Any = None, weights: str | None = None, progress: bool = False,
                     mesh=None) -> LoadedModel:
        # The loader needs JAX; this module (and the presets beside it) does not.
        from jaxllama.gguf.reader import read_gguf
        from jaxllama.models.weights import load_gguf

        if config is not None and config.model_type != self.model_type:
            raise InvalidModelType(
                config.model_type, f"{self.__name__} loads {self.model_type.name} models"
            )
        gguf_file = read_gguf(hub.resolve(path))  # a packaged name works as a path does
        file_type = ModelType.from_architecture(gguf_file.architecture)
        if file_type != self.model_type:
            raise InvalidModelType(
                file_type, f"{gguf_file.path} holds a {file_type.name} model; "
                f"{self.__name__} loads {self.model_type.name} models"
            )
        return load_gguf(gguf_file, config, dtype=dtype, weights=weights, progress=progress, mesh=mesh)

    def __repr__(self) -> str:
        return self.__name__
