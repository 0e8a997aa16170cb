"""HuggingFace weights per pipeline stage: read one layer's tensors, write a rank's shard.

Reading: :class:`Checkpoint` is the ``materialize`` hook of a model that :func:`from_hf` built on
the meta device from a local directory. A rank calls it for the layers it holds; it opens the
safetensors files lazily and reads only those layers' tensors (``safe_open(...).get_tensor``),
so no rank reads, or allocates, the whole model.

Writing: :func:`save_hf` writes HF format (safetensors + ``config.json``) under the model's own
tensor names. In a pipeline every rank writes its own layers to its own shard file and one rank
writes the config and the index, which it can do without the other ranks' tensors because every
rank knows every layer's names and shapes (meta tensors have both).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..runtime.errors import ConfigError
from ..runtime.split import LayeredModel, stage_bounds

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class Checkpoint:
    """Lazy reader of a local HF checkpoint; call it as ``materialize(i, layer)``.

    ``read`` lists every tensor name read, in order (what a rank loaded, for tests and logs).
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        index = self.directory / INDEX_FILE
        single = self.directory / SINGLE_FILE
        if index.is_file():
            with open(index) as f:
                self.weight_map: dict[str, str] = dict(json.load(f)["weight_map"])
        elif single.is_file():
            from safetensors import safe_open

            with safe_open(single, framework="pt") as f:
                self.weight_map = {k: SINGLE_FILE for k in f.keys()}
        else:
            raise ConfigError(
                f"{self.directory} has no {SINGLE_FILE} or {INDEX_FILE}: layerwise reads weights "
                "from safetensors only (save with model.save_pretrained(dir), which writes them)"
            )
        self.read: list[str] = []
        self._files: dict[str, Any] = {}
        self._tied: dict[str, torch.Tensor] = {}  # tensors stored once for several uses, by key
        self._layers: list[nn.Module] = []

    def bind(self, layers: list[nn.Module]) -> None:
        """The model's own layers (from_hf calls it), to tell them from copies (see __call__)."""
        self._layers = list(layers)

    def __call__(self, index: int, layer: nn.Module) -> None:
        """Fill layer ``index``'s meta tensors in place from the checkpoint. Tensors already
        allocated are left alone, so calling it twice, or for a weight tied to a layer already
        loaded, reads nothing.

        Parameters keep their identity (``torch.utils.swap_tensors``): a weight tied across two
        layers stays one parameter however the ranks materialize, as the Pipeline's tie
        detection needs.

        A copy of layer ``index`` rather than the model's own layer gets only its tied tensors:
        ``layerwise.parallel.meta`` materializes a copy of a tie's first layer (the embedding) on
        the rank that holds the tie's other use (the head) and takes only the tie from it, so
        reading the rest (GPT-2's position embeddings) would read another rank's tensors.
        """
        names: dict[str, tuple[str, ...]] = getattr(layer, "hf_names", {})
        copy = bool(self._layers) and (index >= len(self._layers) or self._layers[index] is not layer)
        for local, t in [*layer.named_parameters(), *layer.named_buffers()]:
            if not t.is_meta:
                continue  # loaded already, or computed by the adapter (rotary inv_freq)
            if copy and len(names.get(local, ())) < 2:
                continue  # not tied: this copy's owner rank loads it
            if local not in names:
                raise ConfigError(
                    f"layer {index}: tensor {local!r} is not in the checkpoint and is not computed by "
                    "the adapter; build the model in memory and pass it to from_hf instead"
                )
            value = self._get(names[local], index, t.dtype)
            if tuple(value.shape) != tuple(t.shape):
                raise ConfigError(
                    f"layer {index}: {names[local][0]} has shape {tuple(value.shape)} in {self.directory} "
                    f"but the config gives {tuple(t.shape)}"
                )
            if isinstance(t, nn.Parameter):
                torch.utils.swap_tensors(t, nn.Parameter(value, requires_grad=t.requires_grad))
            else:
                torch.utils.swap_tensors(t, value)

    def _get(self, names: tuple[str, ...], index: int, dtype: torch.dtype) -> torch.Tensor:
        for name in names:  # a tied head is stored under the embedding's name only
            key = self._key(name)
            if key is not None:
                if key in self._tied:  # a tied weight asked for again (layerwise.parallel.meta
                    return self._tied[key]  # fills a tie from a copy of its first layer): no re-read
                file = self.weight_map[key]
                if file not in self._files:
                    from safetensors import safe_open

                    self._files[file] = safe_open(self.directory / file, framework="pt", device="cpu")
                self.read.append(key)
                value = self._files[file].get_tensor(key).to(dtype)
                if len(names) > 1:
                    self._tied[key] = value  # shares storage with the parameter: no extra memory
                return value
        raise ConfigError(f"layer {index}: none of {list(names)} is in {self.directory}'s safetensors")

    def _key(self, name: str) -> str | None:
        if name in self.weight_map:
            return name
        # older checkpoints (GPT-2's own) store the base model's tensors without its prefix
        head, _, rest = name.partition(".")
        return rest if rest and rest in self.weight_map and head in ("model", "transformer") else None


def save_hf(
    model: LayeredModel,
    directory: str | os.PathLike[str],
    *,
    shards: Sequence[Sequence[int]] | None = None,
    shard: int | None = None,
    pipeline: Any = None,
    write: bool = True,
) -> list[Path]:
    """Write ``model`` in HF format, loadable by ``AutoModelForCausalLM.from_pretrained``.

    ``shards`` groups layer indices into files (default: one file, ``model.safetensors``);
    ``shard`` is the group this call writes (default: all). In a pipeline, call
    ``save_hf(model, dir, pipeline=pipe)`` on every rank: each rank writes a shard with its own
    layers, rank 0 also writes ``config.json`` and the index, and the directory is complete once
    every rank has returned (barrier before reading it). A tensor shared by several layers (tied
    embeddings) is written once, by the first shard that holds it, under its first name, as
    ``save_pretrained`` does. Returns the files this call wrote; each is written to a temporary
    name first and renamed, so a crash never leaves a half-written file under the final name.

    Sharded parameters (DTensors of tensor parallelism or FSDP2) are gathered whole with
    ``full_tensor()``, a collective: every replica of the stage (each data- and tensor-parallel
    rank holding it) must call ``save_hf`` too, with ``write=False`` on all but one.
    """
    if pipeline is not None:
        if shards is not None or shard is not None:
            raise ConfigError("save_hf: pass either pipeline= or shards= and shard=, not both")
        shards, shard = pipeline_shards(pipeline)
    layers = model.layers()
    config = getattr(layers[0], "hf_config", None)
    if config is None:
        raise ConfigError("save_hf needs a model made by layerwise.from_hf")
    groups = [list(g) for g in (shards if shards is not None else [range(len(layers))])]
    if sorted(i for g in groups for i in g) != list(range(len(layers))):
        raise ConfigError(f"save_hf: the shards {groups} must hold every layer index 0..{len(layers) - 1} once")
    if shard is not None and not 0 <= shard < len(groups):
        raise ConfigError(f"save_hf: shard {shard} is not one of the {len(groups)} shards")
    files = [SINGLE_FILE] if len(groups) == 1 else [f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors" for k in range(len(groups))]
    # name -> (shard, tensor): the first shard holding a name writes it. Decided by names, which
    # every rank sees alike, not by tensor identity, which materialization and retying change.
    owner: dict[str, tuple[int, torch.Tensor]] = {}
    for k, group in enumerate(groups):
        for i in group:
            names = getattr(layers[i], "hf_names", {})
            for local, t in [*layers[i].named_parameters(), *layers[i].named_buffers()]:
                if local in names and names[local][0] not in owner:
                    owner[names[local][0]] = (k, t)
    out = Path(directory)
    written = []
    for k in range(len(groups)) if shard is None else [shard]:
        mine = {n: t for n, (s, t) in owner.items() if s == k}
        if any(t.is_meta for t in mine.values()):
            raise ConfigError(
                f"save_hf: shard {k} holds layers that are not materialized on this rank; each rank "
                "writes only its own shard (pass shard=)"
            )
        tensors = {n: _whole(t.detach()).to("cpu").contiguous() for n, t in mine.items()}  # same order on every replica
        if write:
            out.mkdir(parents=True, exist_ok=True)
            written.append(_save_file(tensors, out / files[k]))
    if write and shard in (None, 0):
        out.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(out)  # writes config.json itself
        written.append(out / "config.json")
        if len(groups) > 1:
            index = {
                "metadata": {"total_size": sum(t.numel() * t.element_size() for _, t in owner.values())},
                "weight_map": {n: files[s] for n, (s, _) in sorted(owner.items())},
            }
            written.append(_atomic_text(out / INDEX_FILE, json.dumps(index, indent=2)))
    return written


def pipeline_shards(pipe: Any) -> tuple[list[list[int]], int]:
    """``(shards, shard)`` for :func:`save_hf` in a Pipeline: a shard per rank holding the
    layers of every stage on that rank, and this rank's shard."""
    ranks = max(pipe.stage_to_rank) + 1
    groups: list[list[int]] = [[] for _ in range(ranks)]
    for s, (a, b) in enumerate(stage_bounds(pipe.partition)):
        groups[pipe.stage_to_rank[s]].extend(range(a, b))
    return groups, int(pipe.rank)


def _whole(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor shard (a collective over its mesh), else the tensor itself."""
    full = getattr(t, "full_tensor", None)
    return full() if callable(full) else t


def _save_file(tensors: dict[str, torch.Tensor], path: Path) -> Path:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)
    return path


def _atomic_text(path: Path, text: str) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path
