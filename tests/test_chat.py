"""Chat templates rendered as transformers renders them, and chat sessions that keep their caches across turns."""

import json

import pytest

from chat_fixtures import TEMPLATES, write_chat_checkpoint
from swattn.chat import ChatSession, ChatTemplate, TemplateError, encode_rendered
from swattn.generate import generate
from swattn.models.loading import load

CONVERSATION = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Why is the sky blue?"}]
SYSTEM = {"role": "system", "content": "Be brief."}
GEMMA_TOKENS = {"bos_token": "<bos>", "eos_token": "<eos>"}
MISTRAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>"}
# the expected renderings published with the templates (../shared/reference/chat_templates/README.md)
GEMMA = ("<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
         "<start_of_turn>user\nWhy is the sky blue?<end_of_turn>\n<start_of_turn>model\n")
EXPECTED = {
    "google-gemma-2-2b-it.jinja": (GEMMA_TOKENS, GEMMA, TemplateError("System role not supported")),
    "google-gemma-3-1b-it.jinja": (GEMMA_TOKENS, GEMMA, GEMMA.replace("user\nHi", "user\nBe brief.\n\nHi")),
    "mistralai-Mistral-7B-Instruct-v0.3.jinja": (
        MISTRAL_TOKENS, "<s>[INST] Hi[/INST] Hello!</s>[INST] Why is the sky blue?[/INST]",
        "<s>[INST] Hi[/INST] Hello!</s>[INST] Be brief.\n\nWhy is the sky blue?[/INST]"),
    "mistralai-Mistral-7B-Instruct-v0.2.jinja": (
        MISTRAL_TOKENS, "<s> [INST] Hi [/INST] Hello!</s> [INST] Why is the sky blue? [/INST]",
        "<s> [INST] Be brief.\n\nHi [/INST] Hello!</s> [INST] Why is the sky blue? [/INST]"),
}


@pytest.mark.parametrize("name", EXPECTED)
def test_published_templates_render_exactly(name):
    tokens, plain, with_system = EXPECTED[name]
    template = ChatTemplate((TEMPLATES / name).read_text(), tokens)
    assert template.render(CONVERSATION) == plain
    if isinstance(with_system, Exception):
        with pytest.raises(TemplateError, match=str(with_system)):
            template.render([SYSTEM, *CONVERSATION])
    else:
        assert template.render([SYSTEM, *CONVERSATION]) == with_system


def test_template_is_read_from_each_place_a_checkpoint_keeps_it(tmp_path):
    source = (TEMPLATES / "google-gemma-2-2b-it.jinja").read_text()
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": {"content": "<bos>", "special": True}, "chat_template": source}))
    assert ChatTemplate.from_checkpoint(tmp_path).render(CONVERSATION) == GEMMA
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<bos>", "chat_template": [{"name": "tool_use", "template": "x"},
                                                 {"name": "default", "template": source}]}))
    assert ChatTemplate.from_checkpoint(tmp_path).render(CONVERSATION) == GEMMA
    (tmp_path / "chat_template.jinja").write_text("{{ bos_token }}jinja file")
    assert ChatTemplate.from_checkpoint(tmp_path).render(CONVERSATION) == "<bos>jinja file"
    (tmp_path / "chat_template.jinja").unlink()
    (tmp_path / "tokenizer_config.json").write_text("{}")
    assert ChatTemplate.from_checkpoint(tmp_path) is None


def test_templates_run_in_the_sandbox():
    escape = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(TemplateError):
        ChatTemplate(escape).render(CONVERSATION)
    mutate = "{% set x = [] %}{{ x.append(1) }}"
    with pytest.raises(TemplateError):
        ChatTemplate(mutate).render(CONVERSATION)


def test_template_helpers_match_transformers():
    template = ChatTemplate("{{ messages[0]['content'] | tojson }}|{% for m in messages %}{% if loop.first %}"
                            "{% continue %}{% endif %}{{ m.role }}{% endfor %}|{{ strftime_now('%Y') | length }}")
    assert template.render([{"role": "user", "content": "é€"}, {"role": "assistant", "content": ""}]) == '"é€"|assistant|4'


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    return load(write_chat_checkpoint(tmp_path_factory.mktemp("chat")))


def test_multi_turn_chat_through_the_cache_equals_generating_from_the_whole_conversation(chat_model):
    model = chat_model
    template = ChatTemplate.from_checkpoint(model.path)
    assert model.stop_tokens == (1, 5)  # <eos> and <end_of_turn> from generation_config.json
    session = ChatSession(model, template, max_new_tokens=12)
    replies = []
    for turn, question in enumerate(["Hi", "Why is the sky blue?", "And at night?"]):
        streamed = []
        reply, stats = session.send(question, on_text=streamed.append)
        assert "".join(streamed) == reply
        # the same conversation rendered whole and generated from an empty cache
        whole = encode_rendered(model.tokenizer, template.render(session.messages[:-1]))
        cold = generate(model, [whole], max_new_tokens=12, stop_tokens=model.stop_tokens).tokens[0]
        assert model.tokenizer.decode(cold, skip_special_tokens=True) == reply
        if turn:  # only the new turn went through the model; the history came from the cache
            assert stats.reused > 0 and stats.prefilled == len(whole) - stats.reused
            assert stats.prefilled < 40
        replies.append(reply)
    assert session.messages[-1] == {"role": "assistant", "content": replies[-1]}
    assert [m["role"] for m in session.messages] == ["user", "assistant"] * 3


def test_a_history_that_retokenizes_differently_starts_the_caches_over(chat_model):
    session = ChatSession(chat_model, ChatTemplate.from_checkpoint(chat_model.path), max_new_tokens=4)
    session.send("Hi")
    session.cached[-1] = 3  # as if the reply's text tokenized otherwise than generated
    reply, stats = session.send("again")
    assert stats.reused == 0
    whole = encode_rendered(chat_model.tokenizer, session.template.render(session.messages[:-1]))
    assert stats.prefilled == len(whole)


def test_a_reply_stopped_by_the_user_stays_in_the_conversation(chat_model):
    session = ChatSession(chat_model, ChatTemplate.from_checkpoint(chat_model.path), max_new_tokens=50)
    calls = []
    reply, stats = session.send("Hi", should_stop=lambda: len(calls) > 0 or calls.append(1))
    assert stats.generation.stopped and stats.generation.new_tokens <= 2
    assert session.messages[-1] == {"role": "assistant", "content": reply}
    reply2, stats2 = session.send("go on")  # the conversation continues through the cache
    assert stats2.reused > 0


def test_a_system_message_the_template_refuses_is_a_clear_error(chat_model):
    with pytest.raises(TemplateError, match="System role not supported.*first message"):
        ChatSession(chat_model, ChatTemplate.from_checkpoint(chat_model.path), system="Be brief.")


def test_end_of_turn_ends_the_reply_and_is_not_printed(chat_model, monkeypatch):
    calls = []
    real = type(chat_model).logits

    def favour_end_of_turn_from_the_third_token(self, x):
        logits = real(self, x)
        calls.append(1)
        if len(calls) >= 3:  # prefill, first decode step, then <end_of_turn> (id 5) wins
            logits[..., 5] = 1e4
        return logits

    monkeypatch.setattr(type(chat_model), "logits", favour_end_of_turn_from_the_third_token)
    session = ChatSession(chat_model, ChatTemplate.from_checkpoint(chat_model.path), max_new_tokens=20)
    streamed = []
    reply, stats = session.send("Hi", on_text=streamed.append)
    assert stats.generation.tokens[0][-1] == 5 and len(stats.generation.tokens[0]) == 3
    assert "<end_of_turn>" not in "".join(streamed) and "".join(streamed) == reply and len(reply) == 2
