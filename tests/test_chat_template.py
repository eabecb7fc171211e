"""Chat templates render exactly as transformers renders them, compiled once per template."""

import json
import shutil

import pytest

from batchpilot.model.tokenizer import TextTokenizer, compile_chat_template

MESSAGES = [
    {"role": "system", "content": "Réponds en français, s'il te plaît."},
    {"role": "user", "content": "Quelle est la capitale de la France ? 🇫🇷"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "Et celle du Japon ? <b>merci</b>"},
]

TEMPLATES = {
    "loop controls": (
        "{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}"
        "{{ m.role }}: {{ m.content }}\n{% if loop.index > 3 %}{% break %}{% endif %}{% endfor %}"
    ),
    "tojson keeps non-ASCII and HTML": "{% for m in messages %}{{ m | tojson }}\n{% endfor %}"
                                       "{{ messages[0] | tojson(indent=2) }}",
    "strftime_now": "Today is {{ strftime_now('%Y') }}.\n{{ messages[-1].content }}",
    "generation tag": (
        "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}"
        "{% else %}{{ m.content }}{% endif %}\n{% endfor %}"
    ),
    "kwargs and generation prompt": (
        "{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content }}</{{ m.role }}>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% if enable_thinking %}<think>{% endif %}{% endif %}"
    ),
}


@pytest.fixture(scope="module")
def tokenizers(default_model_dir):
    from transformers import AutoTokenizer

    return TextTokenizer.from_folder(default_model_dir), AutoTokenizer.from_pretrained(default_model_dir)


@pytest.mark.parametrize("name", list(TEMPLATES))
@pytest.mark.parametrize("kwargs", [{}, {"enable_thinking": True}])
def test_templates_render_as_transformers(tokenizers, name, kwargs):
    ours, reference = tokenizers
    ours.chat_template = reference.chat_template = TEMPLATES[name]
    got = ours.apply_chat_template(MESSAGES, **kwargs)
    assert got == reference.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True, **kwargs)
    if name == "kwargs and generation prompt":
        assert got.endswith("<think>") == bool(kwargs)


def test_raise_exception_is_a_template_error(tokenizers):
    from jinja2 import TemplateError

    ours, _ = tokenizers
    ours.chat_template = "{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}"
    with pytest.raises(TemplateError, match="first must be user"):
        ours.apply_chat_template(MESSAGES)


def test_a_template_is_compiled_once(tokenizers):
    ours, _ = tokenizers
    ours.chat_template = TEMPLATES["loop controls"] + "{# once #}"
    before = compile_chat_template.cache_info().misses
    for _ in range(5):
        ours.apply_chat_template(MESSAGES)
    assert compile_chat_template.cache_info().misses == before + 1


def test_named_templates_serve_the_default(tmp_path, default_model_dir):
    from transformers import AutoTokenizer

    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_model_dir / name, folder / name)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "TOOLS {{ messages[0].content }}"},
                               {"name": "default", "template": "DEFAULT {{ messages[-1].content }}"}]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    ours = TextTokenizer.from_folder(folder).apply_chat_template(MESSAGES)
    reference = AutoTokenizer.from_pretrained(folder).apply_chat_template(MESSAGES, tokenize=False)
    assert ours == reference == "DEFAULT Et celle du Japon ? <b>merci</b>"


@pytest.mark.slow
def test_chat_template_kwargs_reach_the_template_over_http():
    import httpx

    from tests.server_utils import running_server

    with running_server("--max-model-len", "256") as (url, _):
        question = [{"role": "user", "content": "Hi"}]
        plain = httpx.post(f"{url}/tokenize", json={"messages": question}).json()
        kwargs = {"messages": question, "chat_template_kwargs": {"enable_thinking": True}}
        extra = httpx.post(f"{url}/tokenize", json=kwargs).json()
        bad = httpx.post(f"{url}/v1/chat/completions", json={"messages": question, "chat_template_kwargs": 3})
    assert plain["tokens"] == extra["tokens"]  # the default template has no such variable: same prompt
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "chat_template_kwargs"
