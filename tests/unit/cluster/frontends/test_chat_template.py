"""Which chat template a model directory has, and how it renders, checked against transformers.

Every layout transformers knows (``chat_template.jinja``, ``additional_chat_templates/``,
``tokenizer_config.json``, the legacy ``special_tokens_map.json``, a GGUF file's metadata) is
built as a small directory and rendered both by ``ChatTemplate.from_model_dir`` and by
``AutoTokenizer.from_pretrained(dir).apply_chat_template``, the reference we did not write.
``chat_template.json`` is the one file transformers' tokenizer ignores; it is read here only
where transformers finds no template at all.
"""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import pytest

from cluster.frontends.chat_template import ChatTemplate, ChatTemplateError, read_tokenizer_config

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
]
TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]


def _template(tag: str) -> str:
    """A template whose output names its source (``tag``) and uses special tokens and tools."""
    return (
        "{{ bos_token }}[" + tag + "]{% if tools %}tools={{ tools | tojson }}{% endif %}"
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )


@pytest.fixture(scope="module")
def tokenizer_json(tiny_checkpoint) -> Path:
    return Path(tiny_checkpoint("llama")) / "tokenizer.json"


def _model_dir(
    root: Path,
    tokenizer_json: Path,
    *,
    config_template: str | list | None = None,
    jinja: str | None = None,
    named: dict[str, str] | None = None,
    legacy_json: str | None = None,
    special_map: dict | None = None,
    extra_config: dict | None = None,
) -> Path:
    root.mkdir(parents=True)
    shutil.copy(tokenizer_json, root / "tokenizer.json")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>"}
    config.update(extra_config or {})
    if config_template is not None:
        config["chat_template"] = config_template
    (root / "tokenizer_config.json").write_text(json.dumps(config))
    if jinja is not None:
        (root / "chat_template.jinja").write_text(jinja)
    if named:
        (root / "additional_chat_templates").mkdir()
        for name, text in named.items():
            (root / "additional_chat_templates" / f"{name}.jinja").write_text(text)
    if legacy_json is not None:
        (root / "chat_template.json").write_text(json.dumps({"chat_template": legacy_json}))
    if special_map is not None:
        (root / "special_tokens_map.json").write_text(json.dumps(special_map))
    return root


def _transformers_render(directory: Path, tools: list | None = None, **load: object) -> str:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(directory), **load)
    return tok.apply_chat_template(MESSAGES, tools=tools, tokenize=False, add_generation_prompt=True)


def _ours(directory: Path, tools: list | None = None) -> str:
    template = ChatTemplate.from_model_dir(str(directory))
    assert template is not None, f"no chat template found in {directory}"
    return template.render(MESSAGES, add_generation_prompt=True, **({"tools": tools} if tools else {}))


# every combination of the four places a template can be; transformers decides the expected text
LAYOUTS = [
    dict(zip(("config_template", "jinja", "named", "legacy_json"), combo, strict=True))
    for combo in itertools.product(
        (None, _template("config")),
        (None, _template("jinja")),
        (None, {"tool_use": _template("named-tool_use")}),
        (None, _template("legacy-json")),
    )
]


def _layout_id(layout: dict) -> str:
    return "+".join(k for k, v in layout.items() if v is not None) or "none"


@pytest.mark.parametrize("layout", LAYOUTS, ids=_layout_id)
@pytest.mark.parametrize("tools", [None, TOOLS], ids=["no-tools", "tools"])
def test_every_layout_renders_like_transformers(tmp_path, tokenizer_json, layout, tools):
    from transformers import AutoTokenizer

    d = _model_dir(tmp_path / "m", tokenizer_json, **layout)
    hf = AutoTokenizer.from_pretrained(str(d))
    try:
        expected = hf.apply_chat_template(MESSAGES, tools=tools, tokenize=False, add_generation_prompt=True)
    except ValueError as e:  # transformers has no template to use
        expected = None
        reason = str(e)
    ours = ChatTemplate.from_model_dir(str(d))
    if expected is not None:
        assert ours is not None and _ours(d, tools) == expected
        return
    # transformers refuses: the model has no template, or only named ones without a default
    if "no default" in reason or "multiple chat templates" in reason:
        assert ours is not None
        with pytest.raises(ChatTemplateError, match="no default"):
            ours.render(MESSAGES, add_generation_prompt=True, **({"tools": tools} if tools else {}))
    elif layout["legacy_json"] is not None:
        # only chat_template.json: transformers' tokenizer ignores it, we use it (module docstring)
        assert hf.chat_template is None
        assert "[legacy-json]" in _ours(d, tools)
    else:
        assert ours is None


def test_the_expected_precedence_in_words(tmp_path, tokenizer_json):
    """The same facts as the parametrized test, spelled out (and independent of transformers)."""
    cases = [
        ({"config_template": _template("config"), "jinja": _template("jinja")}, "[jinja]"),
        ({"config_template": _template("config"), "legacy_json": _template("legacy-json")}, "[config]"),
        ({"jinja": _template("jinja"), "legacy_json": _template("legacy-json")}, "[jinja]"),
        ({"legacy_json": _template("legacy-json")}, "[legacy-json]"),
        ({"config_template": [{"name": "default", "template": _template("config-list")}]}, "[config-list]"),
    ]
    for i, (layout, tag) in enumerate(cases):
        assert tag in _ours(_model_dir(tmp_path / str(i), tokenizer_json, **layout)), layout


def test_named_templates_choose_tool_use_only_with_tools(tmp_path, tokenizer_json):
    d = _model_dir(
        tmp_path / "m",
        tokenizer_json,
        jinja=_template("default"),
        named={"tool_use": _template("tool_use"), "rag": _template("rag")},
    )
    assert read_tokenizer_config(str(d))["chat_template"].keys() == {"default", "tool_use", "rag"}
    assert "[default]" in _ours(d) and _ours(d) == _transformers_render(d)
    assert "[tool_use]" in _ours(d, TOOLS) and _ours(d, TOOLS) == _transformers_render(d, TOOLS)


@pytest.mark.parametrize(
    "special_map,extra_config",
    [
        ({"bos_token": "<|map-bos|>", "eos_token": "<|map-eos|>"}, {}),  # legacy map overrides the config
        (
            {"bos_token": "<|map-bos|>"},
            {"added_tokens_decoder": {}},  # ... unless the config lists its added tokens
        ),
        (None, {"bos_token": {"content": "<|dict-bos|>", "__type": "AddedToken"}}),
        (None, {"image_token": "<|image|>"}),  # model-specific tokens are template variables too
    ],
    ids=["map-overrides", "map-ignored", "added-token-dict", "model-specific-token"],
)
def test_special_tokens_reach_the_template_like_in_transformers(tmp_path, tokenizer_json, special_map, extra_config):
    template = _template("t") + "{% if image_token is defined %}{{ image_token }}{% endif %}"
    d = _model_dir(tmp_path / "m", tokenizer_json, jinja=template, special_map=special_map, extra_config=extra_config)
    assert _ours(d) == _transformers_render(d)


def test_none_valued_message_fields_are_dropped_as_transformers_does(tmp_path, tokenizer_json):
    template = "{% for m in messages %}{{ m['role'] }}:{{ m.get('name', 'anon') }}|{% endfor %}"
    d = _model_dir(tmp_path / "m", tokenizer_json, jinja=template)
    messages = [{"role": "user", "content": "x", "name": None}]
    from transformers import AutoTokenizer

    expected = AutoTokenizer.from_pretrained(str(d)).apply_chat_template(messages, tokenize=False)
    assert ChatTemplate.from_model_dir(str(d)).render(messages, add_generation_prompt=False) == expected
    assert expected == "user:anon|"


def test_a_gguf_chat_template_reaches_the_converted_directory(tmp_path, tiny_checkpoint):
    """GGUF metadata ``tokenizer.chat_template``: through the converted directory, as
    transformers renders it when it loads the GGUF file itself."""
    from engine.models.gguf import resolve_model_path
    from tests.unit.engine.gguf_export import export_gguf

    src = tmp_path / "src"
    src.mkdir()
    gguf = export_gguf(tiny_checkpoint("llama"), src / "tiny.gguf")
    converted = resolve_model_path(str(gguf), cache_dir=str(tmp_path / "cache"), progress=False)
    assert (Path(converted) / "chat_template.jinja").is_file()
    expected = _transformers_render(src, gguf_file="tiny.gguf")
    assert _ours(Path(converted)) == expected
    assert "<|assistant|>" in expected  # the tiny checkpoint's template, not an empty default


def test_a_directory_without_any_template_has_none(tmp_path, tokenizer_json):
    assert ChatTemplate.from_model_dir(str(_model_dir(tmp_path / "m", tokenizer_json))) is None
    assert ChatTemplate.from_model_dir(str(tmp_path)) is None  # not even a tokenizer_config.json


def test_broken_template_files_are_errors_naming_the_file(tmp_path, tokenizer_json):
    d = _model_dir(tmp_path / "m", tokenizer_json)
    (d / "chat_template.json").write_text('{"template": "x"}')
    with pytest.raises(ValueError, match=r"chat_template\.json: must hold"):
        read_tokenizer_config(str(d))
    (d / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: invalid JSON"):
        read_tokenizer_config(str(d))


def test_the_openai_server_finds_a_jinja_only_template_and_a_gguf_one(
    tmp_path, tokenizer_json, tiny_checkpoint, monkeypatch
):
    """``ServingBackend.from_model_dir`` hands the OpenAI frontend the template files: a model with
    only chat_template.jinja (the real SmolLM2 conversion's layout) no longer answers 400."""
    from cluster.config import RouterConfig
    from cluster.control.router import Router
    from cluster.control.routing import RoutingPolicy
    from cluster.frontends.http_server import OpenAIServer
    from cluster.frontends.service import ServingBackend
    from engine.models.gguf import resolve_model_path
    from tests.unit.engine.gguf_export import export_gguf

    router = Router(RoutingPolicy(RouterConfig()))
    d = _model_dir(tmp_path / "m", tokenizer_json, jinja=_template("jinja"))
    shutil.copy(Path(tiny_checkpoint("llama")) / "config.json", d / "config.json")
    server = OpenAIServer(ServingBackend.from_model_dir(router, str(d)))
    assert server.chat_template is not None
    assert server.chat_template.render(MESSAGES) == _transformers_render(d)

    monkeypatch.setenv("SPLITSERVE_CACHE", str(tmp_path / "cache"))
    gguf = export_gguf(tiny_checkpoint("llama"), tmp_path / "tiny.gguf")
    converted = resolve_model_path(str(gguf), progress=False)
    for model in (converted, str(gguf)):
        backend = ServingBackend.from_model_dir(router, model)
        assert backend.model_name == "tiny"  # the GGUF file's stem, not the cache entry's name
        assert OpenAIServer(backend).chat_template is not None
