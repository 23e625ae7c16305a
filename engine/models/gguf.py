"""Llama-family GGUF files, converted once into a Hugging Face model directory.

``resolve_model_path(path)`` is the one door a model path takes into the engine
(``build_engine_config``, ``Tokenizer``, ``load_model`` all call it): a directory passes
through unchanged; a GGUF file becomes the directory of its conversion, which is built on
first use and reused afterwards. Everything downstream reads a normal HF directory:

    <models cache>/<stem>-<sha256[:16]>-v<FORMAT>/
        config.json, generation_config.json   LlamaForCausalLM config from the GGUF metadata
        model.safetensors                     dequantized fp32 weights, HF names and layout
                                              (shards + model.safetensors.index.json past 2 GiB)
        tokenizer.json, tokenizer_config.json rebuilt from tokenizer.* metadata (gguf_tokenizer.py)
        chat_template.jinja                   tokenizer.chat_template, when the file has one
        splitserve_gguf.json                  stamp: source sha256 and format (written last)

Cache key: the SHA-256 of the file's bytes (plus FORMAT, bumped when the output of a given
file changes). Size+mtime+name would skip the hash (0.1 s per 100 MB here, a few seconds for
a multi-GB file) but can alias two different files (a re-export of the same size with a copied
mtime) and would serve stale weights silently; a content key also lets a copied or renamed file
reuse its conversion. The hash is paid once per process start, small next to loading weights.

Atomicity: a conversion is built in a hidden ``.<name>.tmp-*`` directory beside its final
place and renamed into place only when complete, so a killed run never leaves a directory
under the final name. Concurrent resolvers of one file (a prefill and a decode worker starting
together) serialise on ``.<name>.lock`` (fcntl), so the file is converted once; stale temp
directories of that name, left by killed runs, are removed under the lock.

Supported: ``general.architecture == "llama"`` with tensor types in ``SUPPORTED_TENSOR_TYPES``
(dequantized by the ``gguf`` library) and a byte-level BPE tokenizer (gguf_tokenizer.py).
SmolLM2 is tested against transformers; Llama-3.0-style files take the same paths. Not
supported, each one UnsupportedGGUFError (a ValueError) naming it before anything is written:
other architectures, sentencepiece vocabularies (Llama 2, Mistral, TinyLlama), Llama 3.1+
rope scaling (``rope_freqs``), experts, other tensor types.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from typing import Any

from engine.models.gguf_tokenizer import (
    TOKEN_NORMAL,
    GGUFTokenizerSpec,
    UnsupportedGGUFError,
    build_tokenizer,
    tokenizer_config,
)
from engine.models.model_cache import exclusive_lock, file_sha256, fsync_dir, models_cache_dir

FORMAT = 1  # bump when the conversion of a given file changes
STAMP_FILE = "splitserve_gguf.json"
GGUF_MAGIC = b"GGUF"
SHARD_BYTES = 2 << 30  # fp32 bytes per safetensors shard

# general.architecture -> the transformers architecture its conversion declares
SUPPORTED_ARCHITECTURES: dict[str, str] = {"llama": "LlamaForCausalLM"}
SUPPORTED_TENSOR_TYPES = frozenset(
    {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}
)

# GGUF tensor name -> (HF name, llama.cpp permuted it for its rotary layout: undo with n heads of)
_LLAMA_TENSORS: list[tuple[re.Pattern[str], str, str | None]] = [
    (re.compile(p), hf, heads)
    for p, hf, heads in [
        (r"token_embd\.weight", "model.embed_tokens.weight", None),
        (r"output_norm\.weight", "model.norm.weight", None),
        (r"output\.weight", "lm_head.weight", None),
        (r"blk\.(\d+)\.attn_norm\.weight", "model.layers.{0}.input_layernorm.weight", None),
        (r"blk\.(\d+)\.ffn_norm\.weight", "model.layers.{0}.post_attention_layernorm.weight", None),
        (r"blk\.(\d+)\.attn_q\.(weight|bias)", "model.layers.{0}.self_attn.q_proj.{1}", "q"),
        (r"blk\.(\d+)\.attn_k\.(weight|bias)", "model.layers.{0}.self_attn.k_proj.{1}", "kv"),
        (r"blk\.(\d+)\.attn_v\.(weight|bias)", "model.layers.{0}.self_attn.v_proj.{1}", None),
        (r"blk\.(\d+)\.attn_output\.(weight|bias)", "model.layers.{0}.self_attn.o_proj.{1}", None),
        (r"blk\.(\d+)\.ffn_gate\.weight", "model.layers.{0}.mlp.gate_proj.weight", None),
        (r"blk\.(\d+)\.ffn_up\.weight", "model.layers.{0}.mlp.up_proj.weight", None),
        (r"blk\.(\d+)\.ffn_down\.weight", "model.layers.{0}.mlp.down_proj.weight", None),
    ]
]


def is_gguf_file(path: str) -> bool:
    """A regular file that starts with the GGUF magic."""
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


# ------------------------------------------------------------------------------ resolver


def resolve_model_path(path: str, cache_dir: str | None = None, progress: bool = True) -> str:
    """A model directory for ``path``: a directory as is, a GGUF file as its (cached) conversion.

    ``cache_dir`` defaults to ``models_cache_dir()``. Raises FileNotFoundError for a missing
    path, ValueError for a file that is not GGUF, UnsupportedGGUFError for a GGUF this module
    cannot convert.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        return path
    if not os.path.exists(path):
        raise FileNotFoundError(f"model path {path!r} does not exist (expected a model directory or a .gguf file)")
    if not is_gguf_file(path):
        raise ValueError(f"model path {path!r} is a file but not a GGUF file (expected a directory or a .gguf file)")
    digest = file_sha256(path)
    root = os.path.abspath(cache_dir or models_cache_dir())
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", os.path.basename(path).removesuffix(".gguf"))
    name = f"{stem}-{digest[:16]}-v{FORMAT}"
    out = os.path.join(root, name)
    if _is_complete(out, digest):
        return out
    os.makedirs(root, exist_ok=True)
    with exclusive_lock(os.path.join(root, f".{name}.lock")):
        if _is_complete(out, digest):  # another process converted it while we waited
            return out
        if os.path.exists(out):
            raise RuntimeError(f"{out!r} exists but is not a complete conversion of {path!r}; delete it")
        for stale in glob.glob(os.path.join(root, f".{name}.tmp-*")):  # left by killed runs
            shutil.rmtree(stale, ignore_errors=True)
        tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root)
        try:
            if progress:
                print(f"converting {path} to a Hugging Face directory (once): {out}", file=sys.stderr)
            convert_gguf(path, tmp, progress=progress)
            _write_json(os.path.join(tmp, STAMP_FILE), {"format": FORMAT, "sha256": digest, "source": path})
            _seal(tmp)
            os.rename(tmp, out)
            fsync_dir(root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out


def _seal(directory: str) -> None:
    """Flush every file to disk (the rename must not outlive a crash that loses the data) and
    make the cache readable by other users (mkdtemp makes 0700, safetensors writes 0600)."""
    for name in os.listdir(directory):
        file = os.path.join(directory, name)
        with open(file, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(file, 0o644)
    os.chmod(directory, 0o755)
    fsync_dir(directory)


def _is_complete(out: str, digest: str) -> bool:
    try:
        with open(os.path.join(out, STAMP_FILE)) as f:
            stamp = json.load(f)
    except (FileNotFoundError, NotADirectoryError):
        return False
    return stamp.get("format") == FORMAT and stamp.get("sha256") == digest


# ---------------------------------------------------------------------------- conversion


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    type_name: str  # GGMLQuantizationType name: "Q4_1", "F32", ...
    shape: tuple[int, ...]  # torch order (GGUF lists dimensions innermost first)


class GGUFFile:
    """Metadata, tensor list and tokenizer spec of one GGUF file (tensor data stays mapped)."""

    def __init__(self, path: str):
        import gguf

        self.path = path
        self.reader = gguf.GGUFReader(path)
        self.metadata: dict[str, Any] = {k: f.contents() for k, f in self.reader.fields.items()}
        self.tensors = [
            GGUFTensor(t.name, t.tensor_type.name, tuple(int(d) for d in reversed(t.shape.tolist())))
            for t in self.reader.tensors
        ]
        self.architecture = str(self.metadata.get("general.architecture"))

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def require(self, key: str) -> Any:
        if key not in self.metadata:
            raise UnsupportedGGUFError(f"{self.path}: GGUF metadata {key!r} is missing")
        return self.metadata[key]

    def tokenizer_spec(self) -> GGUFTokenizerSpec:
        tokens = list(self.require("tokenizer.ggml.tokens"))
        return GGUFTokenizerSpec(
            model=str(self.require("tokenizer.ggml.model")),
            pre=self.get("tokenizer.ggml.pre"),
            tokens=tokens,
            token_types=list(self.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens)),
            merges=list(self.get("tokenizer.ggml.merges") or []),
            bos_id=self.get("tokenizer.ggml.bos_token_id"),
            eos_id=self.get("tokenizer.ggml.eos_token_id"),
            unk_id=self.get("tokenizer.ggml.unknown_token_id"),
            pad_id=self.get("tokenizer.ggml.padding_token_id"),
            eot_id=self.get("tokenizer.ggml.eot_token_id"),
            add_bos=bool(self.get("tokenizer.ggml.add_bos_token", False)),
            add_eos=bool(self.get("tokenizer.ggml.add_eos_token", False)),
            chat_template=self.get("tokenizer.chat_template"),
        )


def convert_gguf(src: str, out_dir: str, progress: bool = False) -> None:
    """Write the HF files of GGUF ``src`` into the existing directory ``out_dir`` (not atomic itself)."""
    g = GGUFFile(src)
    if g.architecture not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedGGUFError(
            f"{src}: GGUF architecture {g.architecture!r} is not supported (supported: {sorted(SUPPORTED_ARCHITECTURES)})"
        )
    bad = sorted({t.type_name for t in g.tensors} - SUPPORTED_TENSOR_TYPES)
    if bad:
        names = [t.name for t in g.tensors if t.type_name in bad]
        raise UnsupportedGGUFError(
            f"{src}: GGUF tensor type {', '.join(bad)} is not supported (tensors {names[:3]}"
            f"{' ...' if len(names) > 3 else ''}; supported: {sorted(SUPPORTED_TENSOR_TYPES)})"
        )
    spec = g.tokenizer_spec()
    spec.check_supported(src)
    config = llama_config(g, spec)
    plan = _tensor_plan(g)  # validates every tensor name before anything is written
    _write_weights(g, plan, config, out_dir, progress)
    _write_json(os.path.join(out_dir, "config.json"), config)
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config.get(k) is not None}
    _write_json(os.path.join(out_dir, "generation_config.json"), generation)
    build_tokenizer(spec).save(os.path.join(out_dir, "tokenizer.json"))
    _write_json(
        os.path.join(out_dir, "tokenizer_config.json"), tokenizer_config(spec, config["max_position_embeddings"])
    )
    if spec.chat_template:
        with open(os.path.join(out_dir, "chat_template.jinja"), "w") as f:
            f.write(spec.chat_template)


def _f32(value: Any) -> float:
    """A GGUF float32 as the shortest decimal that rounds to it (9.9999997e-06 -> 1e-05)."""
    import numpy as np

    return float(str(np.float32(value)))


def llama_config(g: GGUFFile, spec: GGUFTokenizerSpec) -> dict[str, Any]:
    """transformers LlamaConfig fields from ``llama.*`` metadata; unsupported options raise."""
    a = g.architecture
    names = {t.name for t in g.tensors}
    hidden = int(g.require(f"{a}.embedding_length"))
    heads = int(g.require(f"{a}.attention.head_count"))
    kv_heads = g.get(f"{a}.attention.head_count_kv", heads)
    if not isinstance(kv_heads, int):
        raise UnsupportedGGUFError(f"{g.path}: per-layer {a}.attention.head_count_kv {kv_heads!r} is not supported")
    head_dim = int(g.get(f"{a}.attention.key_length", hidden // heads))
    value_dim = g.get(f"{a}.attention.value_length", head_dim)
    if value_dim != head_dim:
        raise UnsupportedGGUFError(f"{g.path}: {a}.attention.value_length {value_dim} != key_length {head_dim}")
    rope_dim = g.get(f"{a}.rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise UnsupportedGGUFError(f"{g.path}: partial rotary ({a}.rope.dimension_count {rope_dim} of {head_dim})")
    if g.get(f"{a}.expert_count", 0):
        raise UnsupportedGGUFError(f"{g.path}: {a} GGUF with {g.get(f'{a}.expert_count')} experts is not supported")
    if "rope_freqs.weight" in names:
        raise UnsupportedGGUFError(f"{g.path}: rope_freqs.weight (Llama 3.1 rope scaling) is not supported")
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": _f32(g.get(f"{a}.rope.freq_base", 10000.0))}
    scaling = g.get(f"{a}.rope.scaling.type", "none")
    if scaling == "linear":
        rope = {**rope, "rope_type": "linear", "factor": _f32(g.require(f"{a}.rope.scaling.factor"))}
    elif scaling != "none":
        raise UnsupportedGGUFError(f"{g.path}: {a}.rope.scaling.type {scaling!r} is not supported (none, linear)")
    embed = next(t for t in g.tensors if t.name == "token_embd.weight")
    vocab = embed.shape[0]
    if len(spec.tokens) > vocab:
        raise UnsupportedGGUFError(f"{g.path}: {len(spec.tokens)} tokenizer tokens > {vocab} embedding rows")
    eos = sorted({i for i in (spec.eos_id, spec.eot_id) if i is not None})
    return {
        "architectures": [SUPPORTED_ARCHITECTURES[a]],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int(g.require(f"{a}.feed_forward_length")),
        "num_hidden_layers": int(g.require(f"{a}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(kv_heads),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _f32(g.require(f"{a}.attention.layer_norm_rms_epsilon")),
        "max_position_embeddings": int(g.get(f"{a}.context_length", 4096)),
        "rope_parameters": rope,
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "mlp_bias": False,
        "bos_token_id": spec.bos_id,
        "eos_token_id": (eos[0] if len(eos) == 1 else eos) if eos else None,
        "pad_token_id": spec.pad_id,
        "dtype": "float32",
    }


@dataclass(frozen=True)
class _Planned:
    index: int  # position in reader.tensors
    hf_name: str
    permuted_heads: str | None  # "q" | "kv" | None


def _tensor_plan(g: GGUFFile) -> list[_Planned]:
    plan = []
    for i, t in enumerate(g.tensors):
        for pattern, hf, heads in _LLAMA_TENSORS:
            m = pattern.fullmatch(t.name)
            if m:
                plan.append(_Planned(i, hf.format(*m.groups()), heads))
                break
        else:
            raise UnsupportedGGUFError(f"{g.path}: unexpected GGUF tensor {t.name!r} for architecture {g.architecture}")
    return plan


def unpermute_rotary(w: Any, n_heads: int) -> Any:
    """Undo llama.cpp's ``permute`` of a Q or K projection (weight ``[n_heads*D, in]`` or bias ``[n_heads*D]``).

    HF Llama rotates each head's dims i and i + D/2 together (``rotate_half``); llama.cpp's
    rope pairs dims 2i and 2i + 1, so convert_hf_to_gguf.py interleaves the two halves:
    ``w.reshape(n_heads, 2, D/2, ...).swapaxes(1, 2)``. This is its inverse.
    """
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_weights(g: GGUFFile, plan: list[_Planned], config: dict[str, Any], out: str, progress: bool) -> None:
    """Dequantize every tensor to fp32 in HF layout; one safetensors file per SHARD_BYTES."""
    import numpy as np
    import torch
    from gguf.quants import dequantize
    from safetensors.torch import save_file
    from tqdm import tqdm

    shards: list[list[_Planned]] = [[]]
    size = 0
    for p in plan:
        nbytes = 4 * int(np.prod(g.tensors[p.index].shape))
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(p)
        size += nbytes
    heads = {"q": config["num_attention_heads"], "kv": config["num_key_value_heads"]}
    files = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    weight_map = {}
    bar = tqdm(total=len(plan), desc=f"dequantizing {os.path.basename(g.path)}", unit="tensor", disable=not progress)
    for shard, file in zip(shards, files, strict=True):
        tensors = {}
        for p in shard:
            raw = g.reader.tensors[p.index]
            w = np.asarray(dequantize(raw.data, raw.tensor_type), dtype=np.float32)
            w = w.reshape(g.tensors[p.index].shape)
            if p.permuted_heads is not None:
                w = unpermute_rotary(w, heads[p.permuted_heads])
            tensors[p.hf_name] = torch.from_numpy(np.require(w, requirements=["C", "W"]))  # copies mapped data
            weight_map[p.hf_name] = file
            bar.update(1)
        save_file(tensors, os.path.join(out, file), metadata={"format": "pt"})
    bar.close()
    if len(files) > 1:
        _write_json(
            os.path.join(out, "model.safetensors.index.json"),
            {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))},
        )


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
