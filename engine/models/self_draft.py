"""Self-drafts: a target model's first N decoder layers, its final norm and its head, written
as an ordinary Hugging Face checkpoint directory (what ``splitserve draft`` builds).

The draft computes exactly the target's forward truncated after layer N-1 followed by the
target's final norm and lm_head (early exit), so it shares the target's tokenizer and
vocabulary by construction and can serve as its speculative draft (engine/spec/draft.py).

    <out>/config.json            the target's config with num_hidden_layers = N (per-layer
                                 lists such as layer_types / mlp_only_layers cut to N)
    <out>/model.safetensors      embed_tokens, layers.0..N-1, norm, lm_head (absent when the
                                 target ties it to the embeddings: tie_word_embeddings kept);
                                 shards + model.safetensors.index.json past SHARD_BYTES
    <out>/<every other file>     tokenizer, generation config, chat template: copied
    <out>/splitserve_draft.json  stamp (source, its layer count, N), written last

Tensors keep the checkpoint's names and dtypes (no conversion). A .gguf target is read from
its converted directory (engine/models/gguf.py).

Atomicity: built in a hidden ``.<name>.tmp-*`` directory beside ``out`` and renamed into
place when complete, so a killed run never leaves a half-written directory under the final
name. An existing ``out`` is an error unless ``force`` and it holds a self-draft stamp (then
it is replaced; a directory this module did not write is never deleted).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
from typing import Any

from engine.config import ModelConfig
from engine.models.gguf import resolve_model_path
from engine.models.loader import safetensors_files
from engine.models.model_cache import fsync_dir

STAMP_FILE = "splitserve_draft.json"
FORMAT = 1
SHARD_BYTES = 2 << 30
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_NOT_COPIED = re.compile(r".*\.safetensors$|model\.safetensors\.index\.json$|config\.json$|splitserve_.*\.json$")


def default_draft_layers(num_layers: int) -> int:
    """The default N for a target of ``num_layers``: 80 % of them (24 of 30 for SmolLM2-135M).

    Measured on SmolLM2-135M-Instruct (greedy, chat prompts, first-position acceptance):
    N = 4, 8, 12, 20, 24, 27, 29 accept 2, 6, 8, 25, 45, 46, 55 %. Early exits of a model
    not trained for them predict poorly until late layers, while a draft forward costs at
    least its vocabulary head (21 % of SmolLM2's weights) plus N/30 of the layers, so the
    acceptance per unit of draft cost peaks late: at 24 of 30 (0.45 / 0.84) among the N
    that are not nearly the whole model. No N made SmolLM2 faster on a CPU (acceptance stays
    below the draft's relative cost); SmartSpec then turns speculation off."""
    return max(1, min(num_layers - 1, round(0.8 * num_layers)))


def self_draft_config(config: dict[str, Any], num_layers: int) -> dict[str, Any]:
    """The draft's config.json: the target's with ``num_layers`` layers."""
    total = config.get("num_hidden_layers")
    if not isinstance(total, int) or total < 2:
        raise ValueError(f"the target's num_hidden_layers must be an integer >= 2, got {total!r}")
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or not 1 <= num_layers < total:
        raise ValueError(f"layers must be in [1, {total - 1}] for a target of {total} layers, got {num_layers!r}")
    out = dict(config)
    out["num_hidden_layers"] = num_layers
    if isinstance(out.get("layer_types"), list):
        out["layer_types"] = out["layer_types"][:num_layers]
    if isinstance(out.get("mlp_only_layers"), list):
        out["mlp_only_layers"] = [i for i in out["mlp_only_layers"] if i < num_layers]
    if isinstance(out.get("max_window_layers"), int):
        out["max_window_layers"] = min(out["max_window_layers"], num_layers)
    return out


def build_self_draft(source: str, num_layers: int, out_dir: str, progress: bool = False, force: bool = False) -> str:
    """Write the self-draft of ``source`` (HF directory or .gguf) with its first ``num_layers``
    layers to ``out_dir``; returns ``out_dir``. Errors name the field: ``layers`` out of range
    (ValueError), an unsupported architecture (UnsupportedModelError), ``out`` already there
    (FileExistsError)."""
    src = resolve_model_path(source, progress=progress)
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    ModelConfig.from_hf_dict(config)  # an architecture the engine cannot run fails here
    draft_config = self_draft_config(config, num_layers)
    out = os.path.abspath(out_dir)
    if os.path.exists(out) and not (force and os.path.exists(os.path.join(out, STAMP_FILE))):
        hint = " (pass force to replace a self-draft)" if os.path.exists(os.path.join(out, STAMP_FILE)) else ""
        raise FileExistsError(f"out {out!r} already exists{hint}")
    if os.path.abspath(src) == out:
        raise ValueError(f"out {out!r} is the source directory")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
    try:
        _write_weights(src, num_layers, tmp, progress)
        for name in sorted(os.listdir(src)):
            path = os.path.join(src, name)
            if os.path.isfile(path) and not _NOT_COPIED.fullmatch(name):
                shutil.copyfile(path, os.path.join(tmp, name))
        _write_json(os.path.join(tmp, "config.json"), draft_config)
        stamp = {"format": FORMAT, "source": os.path.abspath(source), "source_layers": config["num_hidden_layers"]}
        _write_json(os.path.join(tmp, STAMP_FILE), {**stamp, "layers": num_layers})
        _seal(tmp)
        if os.path.exists(out):  # force: swap the old self-draft out, then delete it
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=parent)
            os.rename(out, os.path.join(old, "draft"))
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
        fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _keep(name: str, num_layers: int) -> bool:
    m = _LAYER.search(name)
    return m is None or int(m.group(1)) < num_layers


def _write_weights(src: str, num_layers: int, out: str, progress: bool) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file
    from tqdm import tqdm

    files = safetensors_files(src)
    plan: list[tuple[str, str, int]] = []  # (file, name, bytes)
    for file in files:
        with safe_open(file, "pt", device="cpu") as f:
            for name in f.keys():
                if _keep(name, num_layers):
                    sl = f.get_slice(name)
                    nbytes = _numel(sl.get_shape()) * _dtype_bytes(sl.get_dtype())
                    plan.append((file, name, nbytes))
    shards: list[list[tuple[str, str, int]]] = [[]]
    size = 0
    for item in plan:
        if shards[-1] and size + item[2] > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item[2]
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    bar = tqdm(
        total=len(plan), desc=f"self-draft ({num_layers} layers)", unit="tensor", disable=not progress, file=sys.stderr
    )
    weight_map = {}
    for shard, out_name in zip(shards, names, strict=True):
        tensors = {}
        for file, name, _ in shard:
            with safe_open(file, "pt", device="cpu") as f:
                tensors[name] = f.get_tensor(name)
            weight_map[name] = out_name
            bar.update(1)
        save_file(tensors, os.path.join(out, out_name), metadata={"format": "pt"})
    bar.close()
    if len(names) > 1:
        _write_json(
            os.path.join(out, "model.safetensors.index.json"),
            {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))},
        )


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


_DTYPE_BYTES = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _dtype_bytes(dtype: str) -> int:
    # only sizes the output shards: an exotic dtype (fp8 ...) counts as 1 byte per element
    return _DTYPE_BYTES.get(dtype, 1)


def _seal(directory: str) -> None:
    """Flush every file (the rename must not outlive a crash that loses the data); readable by all."""
    for name in os.listdir(directory):
        file = os.path.join(directory, name)
        with open(file, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(file, 0o644)
    os.chmod(directory, 0o755)
    fsync_dir(directory)


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
