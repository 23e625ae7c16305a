"""ServingBackend validates every request once, against the limits the workers reported."""

from __future__ import annotations

import pytest

from cluster.config import RouterConfig
from cluster.control.router import Router
from cluster.control.routing import RoutingPolicy
from cluster.frontends.service import InvalidRequest, ServingBackend
from engine.config import ModelConfig
from engine.tokenizer import Tokenizer
from tests.fakes import worker_limits


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return tiny_checkpoint("llama", max_position_embeddings=512)


def backend(model: str, **limits) -> ServingBackend:
    router = Router(RoutingPolicy(RouterConfig()))
    router.limits = worker_limits(**{"max_model_len": 256, "vocab_size": 512, **limits})
    return ServingBackend(router, Tokenizer(model), ModelConfig.from_hf_dir(model), "m")


def test_limits_come_from_the_workers_not_the_model_config(model):
    b = backend(model)  # the checkpoint says 512 positions; the workers serve 256
    assert b.max_model_len == 256 and b.model_info().max_model_len == 256
    with pytest.raises(InvalidRequest, match="fewer than 256") as e:
        b.tokenize([5] * 256)
    assert e.value.field == "prompt"
    with pytest.raises(InvalidRequest, match="outside the vocabulary") as e:
        b.tokenize([511, 512])
    assert b.tokenize([511] * 255) == [511] * 255


def test_a_prompt_beyond_the_kv_capacity_is_refused_up_front(model):
    b = backend(model, block_size=16, num_kv_blocks=4)  # 64 tokens per request at most
    assert b.tokenize([5] * 63) == [5] * 63
    with pytest.raises(InvalidRequest, match="KV caches hold at most 64") as e:
        b.tokenize([5] * 64)
    assert e.value.field == "prompt"


def test_without_chunked_prefill_a_prompt_must_fit_one_step(model):
    b = backend(model, chunked_prefill=False, max_num_batched_tokens=32)
    b.tokenize([5] * 32)
    with pytest.raises(InvalidRequest, match="without chunked prefill"):
        b.tokenize([5] * 33)


def test_explicit_max_tokens_beyond_the_context_is_refused_naming_the_field(model):
    b = backend(model)
    assert b.sampling_params(200, max_tokens=56).max_tokens == 56  # exactly fills 256
    with pytest.raises(InvalidRequest, match="57 tokens requested but the prompt") as e:
        b.sampling_params(200, max_tokens=57)
    assert e.value.field == "max_tokens"


def test_omitted_max_tokens_takes_the_endpoint_default_clamped_to_the_context(model):
    b = backend(model)
    assert b.sampling_params(10).max_tokens == 246  # gRPC and chat: the rest of the context
    assert b.sampling_params(10, default_max_tokens=16).max_tokens == 16  # /v1/completions
    assert b.sampling_params(250, default_max_tokens=16).max_tokens == 6  # a default is not a request


def test_serving_before_the_workers_reported_is_a_clear_error(model):
    b = backend(model)
    b.router.limits = None
    with pytest.raises(RuntimeError, match="have not reported their limits"):
        b.tokenize([1, 2])
