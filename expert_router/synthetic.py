"""SYNTHETIC routing logs with planted structure (random-weight gates have none).

Used by tests and benchmarks, always labelled synthetic. The structure planted:

- groups: the experts of each layer are split into ``num_groups`` hidden groups of equal size
  (a seeded permutation, so expert ids of one group are scattered, not contiguous); a token
  picks its top-k inside its group with probability ``p_in_group`` per choice, else anywhere;
- Zipf popularity: inside a group, expert j is picked with weight 1 / (rank_j + 1) ** zipf_s
  (rank_j: its seeded popularity order); groups too are Zipf-popular;
- cross-layer affinity: a token's group at layer l + 1 is a fixed map of its group at layer l
  with probability ``layer_affinity`` (a routing path), else drawn afresh;
- temporal locality: a token's group at layer 0 repeats the previous token's with probability
  ``stickiness`` (consecutive tokens of a sequence share a topic).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

from expert_router.routing_log import RoutingLog


@dataclass(frozen=True)
class PlantedStructure:
    num_experts: int = 16
    top_k: int = 2
    num_layers: int = 4
    num_groups: int = 4
    p_in_group: float = 0.9
    zipf_s: float = 1.0
    layer_affinity: float = 0.8
    stickiness: float = 0.7


def _zipf(n: int, s: float) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1) ** s
    return w / w.sum()


def planted_groups(structure: PlantedStructure, seed: int) -> list[list[np.ndarray]]:
    """Per layer, the expert ids of each planted group (what s-EG should recover)."""
    rng = np.random.default_rng(seed)
    e, g = structure.num_experts, structure.num_groups
    if e % g:
        raise ValueError(f"{e} experts do not split into {g} equal groups")
    return [np.split(rng.permutation(e), g) for _ in range(structure.num_layers)]


def planted_log(
    structure: PlantedStructure, num_sequences: int, seq_len: int, seed: int = 0, sample_seed: int | None = None
) -> tuple[RoutingLog, list[list[np.ndarray]]]:
    """A SYNTHETIC routing log with ``structure`` planted -> (log, the planted groups).
    ``seed`` fixes the planted model (groups, routing paths); ``sample_seed`` (default: seed)
    the tokens drawn from it, so a calibration log and a held-out log share the model only."""
    st = structure
    groups = planted_groups(st, seed)
    g, e, k, nl = st.num_groups, st.num_experts, st.top_k, st.num_layers
    path_rng = np.random.default_rng([seed, 1])
    path = [path_rng.permutation(g) for _ in range(nl)]  # group at l -> likely group at l + 1
    rng = np.random.default_rng([seed if sample_seed is None else sample_seed, 2])
    group_pop = _zipf(g, st.zipf_s)
    in_group_pop = _zipf(e // g, st.zipf_s)
    n = num_sequences * seq_len
    ids = np.zeros((n, nl, k), dtype=np.int16)
    t = 0
    for _ in range(num_sequences):
        prev = int(rng.choice(g, p=group_pop))
        for _ in range(seq_len):
            grp = prev if rng.random() < st.stickiness else int(rng.choice(g, p=group_pop))
            prev = grp
            for layer in range(nl):
                if layer > 0:
                    grp = int(path[layer][grp]) if rng.random() < st.layer_affinity else int(rng.choice(g, p=group_pop))
                members = groups[layer][grp]
                chosen: list[int] = []
                while len(chosen) < k:
                    if rng.random() < st.p_in_group:
                        x = int(members[rng.choice(len(members), p=in_group_pop)])
                    else:
                        x = int(rng.integers(e))
                    if x not in chosen:
                        chosen.append(x)
                ids[t, layer] = chosen
            t += 1
    offsets = np.arange(0, n + 1, seq_len, dtype=np.int64)
    log = RoutingLog(f"synthetic:{st}", e, k, tuple(range(nl)), ids, offsets)
    return log, groups


def build_planted_moe_checkpoint(
    out_dir: str, num_experts: int = 16, num_topics: int = 4, num_layers: int = 4, seed: int = 0, **overrides
) -> tuple[str, list[list[int]]]:
    """A SYNTHETIC random-weight tiny Mixtral whose gates have planted structure.

    The vocabulary (ids >= 3) is split into ``num_topics`` topics; topic t's embedding rows
    lean along a direction u_t, and at layer l the gate rows of expert group pi_l(t) (a
    scattered group of num_experts / num_topics experts, a per-layer permutation pi_l of the
    topics) lean along u_t too. A token of topic t then routes mostly inside group pi_l(t)
    at every layer (co-activation and a cross-layer path), and a prompt drawn from one topic
    keeps its experts (temporal locality). -> (checkpoint path, token ids of each topic).
    """
    import torch
    from safetensors.torch import load_file, save_file

    from engine.models.tiny import build_tiny_checkpoint

    path = build_tiny_checkpoint(
        out_dir, family="mixtral", seed=seed, num_local_experts=num_experts, num_hidden_layers=num_layers, **overrides
    )
    marker = os.path.join(path, "planted.json")
    params = {"num_experts": num_experts, "num_topics": num_topics, "seed": seed}
    g = torch.Generator().manual_seed(seed + 1000)
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    vocab, hidden = tensors["model.embed_tokens.weight"].shape
    topics = [list(range(3 + t, vocab, num_topics)) for t in range(num_topics)]
    if os.path.exists(marker):
        with open(marker) as f:
            if json.load(f) == params:
                return path, topics
    u = torch.nn.functional.normalize(torch.randn(num_topics, hidden, generator=g), dim=1)
    emb = tensors["model.embed_tokens.weight"]
    for t, ids in enumerate(topics):
        emb[ids] = 0.3 * emb[ids] + 1.0 * u[t]
    per = num_experts // num_topics
    for layer in range(num_layers):
        experts = torch.randperm(num_experts, generator=g).view(num_topics, per)  # scattered groups
        topic_of_group = torch.randperm(num_topics, generator=g)
        gate = tensors[f"model.layers.{layer}.block_sparse_moe.gate.weight"]  # [E, H]
        for grp in range(num_topics):
            for e in experts[grp].tolist():
                gate[e] = 0.2 * gate[e] + 4.0 * u[topic_of_group[grp]]
    save_file(tensors, file, metadata={"format": "pt"})
    with open(marker, "w") as f:
        json.dump(params, f)
    return path, topics
