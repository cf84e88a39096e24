"""Chat templates: the built-ins render as FastChat 0.2.36's conversation templates of the
same names (expected strings derived by hand from fastchat/conversation.py), the tokenizer's
own template wins, and a model without one fails on render, not on load."""

from __future__ import annotations

import pytest

from pagedserve.deploy.make_model import train_tokenizer
from pagedserve.engine.chat_templates import (
    BUILTIN_TEMPLATES,
    BuiltinChatTemplate,
    JinjaChatTemplate,
    MissingChatTemplate,
    resolve_chat_template,
    template_for_model_name,
)

TWO_TURNS = [
    {"role": "user", "content": "Hello!"},
    {"role": "assistant", "content": "Hi there."},
    {"role": "user", "content": "How are you?"},
]
SYSTEM = {"role": "system", "content": "You are terse."}

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
DOLLY_SYSTEM = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
)
STABLELM_SYSTEM = (
    "# StableLM Tuned (Alpha version)\n"
    "- StableLM is a helpful and harmless open-source AI language model developed by "
    "StabilityAI.\n"
    "- StableLM is excited to be able to help the user, but will refuse to do anything that "
    "could be considered harmful to the user.\n"
    "- StableLM is more than just an information source, StableLM is also able to write "
    "poetry, short stories, and make jokes.\n"
    "- StableLM will refuse to participate in anything that could harm a human.\n"
)

# name -> (prompt for TWO_TURNS, prompt for [SYSTEM] + TWO_TURNS)
EXPECTED = {
    "vicuna_v1.1": (
        f"{VICUNA_SYSTEM} USER: Hello! ASSISTANT: Hi there.</s>USER: How are you? ASSISTANT:",
        "You are terse. USER: Hello! ASSISTANT: Hi there.</s>USER: How are you? ASSISTANT:",
    ),
    "koala_v1": (
        "BEGINNING OF CONVERSATION: USER: Hello! GPT: Hi there.</s>USER: How are you? GPT:",
        "You are terse. USER: Hello! GPT: Hi there.</s>USER: How are you? GPT:",
    ),
    "llama-2": (
        "[INST] Hello! [/INST] Hi there. </s><s>[INST] How are you? [/INST]",
        "[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\n"
        "Hello! [/INST] Hi there. </s><s>[INST] How are you? [/INST]",
    ),
    "mistral": (
        "[INST] Hello! [/INST] Hi there.</s>[INST] How are you? [/INST]",
        "[INST] You are terse.\nHello! [/INST] Hi there.</s>[INST] How are you? [/INST]",
    ),
    "dolly_v2": (
        f"{DOLLY_SYSTEM}### Instruction:\nHello!\n\n### Response:\nHi there.### End\n\n"
        "### Instruction:\nHow are you?\n\n### Response:\n",
        "You are terse.### Instruction:\nHello!\n\n### Response:\nHi there.### End\n\n"
        "### Instruction:\nHow are you?\n\n### Response:\n",
    ),
    "oasst_pythia": (
        "<|prompter|>Hello!<|endoftext|><|assistant|>Hi there.<|endoftext|>"
        "<|prompter|>How are you?<|endoftext|><|assistant|>",
        "You are terse.<|prompter|>Hello!<|endoftext|><|assistant|>Hi there.<|endoftext|>"
        "<|prompter|>How are you?<|endoftext|><|assistant|>",
    ),
    "stablelm": (
        f"<|SYSTEM|>{STABLELM_SYSTEM}<|USER|>Hello!<|ASSISTANT|>Hi there.<|USER|>How are you?"
        "<|ASSISTANT|>",
        "<|SYSTEM|>You are terse.<|USER|>Hello!<|ASSISTANT|>Hi there.<|USER|>How are you?"
        "<|ASSISTANT|>",
    ),
    "chatml": (
        "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\nHi there.<|im_end|>\n"
        "<|im_start|>user\nHow are you?<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\nHi there.<|im_end|>\n"
        "<|im_start|>user\nHow are you?<|im_end|>\n<|im_start|>assistant\n",
    ),
    "qwen-7b-chat": (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\nHi there.<|im_end|>\n"
        "<|im_start|>user\nHow are you?<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\nHi there.<|im_end|>\n"
        "<|im_start|>user\nHow are you?<|im_end|>\n<|im_start|>assistant\n",
    ),
    "alpaca": (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction: Hello!\n\n### Response: Hi there.</s>"
        "### Instruction: How are you?\n\n### Response:",
        "You are terse.\n\n### Instruction: Hello!\n\n### Response: Hi there.</s>"
        "### Instruction: How are you?\n\n### Response:",
    ),
}


@pytest.fixture(scope="module")
def tokenizer():
    """The offline tokenizer of the tiny models: it has a ChatML Jinja template."""
    return train_tokenizer()


@pytest.fixture
def plain_tokenizer(tokenizer):
    """The same tokenizer without a chat template of its own."""
    saved = tokenizer.chat_template
    tokenizer.chat_template = None
    yield tokenizer
    tokenizer.chat_template = saved


def test_every_builtin_template_has_an_expected_rendering():
    assert set(EXPECTED) == set(BUILTIN_TEMPLATES)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_builtin_renders_a_two_turn_conversation_as_fastchat(name):
    template = BuiltinChatTemplate(BUILTIN_TEMPLATES[name])
    default_system, own_system = EXPECTED[name]
    assert template.render(TWO_TURNS) == default_system
    assert template.render([SYSTEM, *TWO_TURNS]) == own_system


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_builtin_without_generation_prompt_ends_after_the_last_message(name):
    template = BuiltinChatTemplate(BUILTIN_TEMPLATES[name])
    whole = [*TWO_TURNS, {"role": "assistant", "content": "Fine."}]
    text = template.render(whole, add_generation_prompt=False)
    assert text.startswith(template.render(TWO_TURNS))
    assert "Fine." in text and text.index("Fine.") > text.index("How are you?")


def test_chatml_builtin_renders_as_the_tokenizers_own_chatml_template(tokenizer):
    ours = BuiltinChatTemplate(BUILTIN_TEMPLATES["chatml"], tokenizer)
    theirs = tokenizer.apply_chat_template(TWO_TURNS, tokenize=False, add_generation_prompt=True)
    assert ours.render(TWO_TURNS) == theirs


@pytest.mark.parametrize(
    ("name", "stop", "stop_tokens"),
    [
        ("vicuna_v1.1", [], []),
        ("dolly_v2", ["### End"], []),
        ("chatml", ["<|im_end|>"], ["<|im_end|>", "<|im_start|>"]),
        ("stablelm", [], []),  # its stop tokens are not in this tokenizer's vocabulary
    ],
)
def test_stop_strings_and_the_stop_tokens_the_tokenizer_has(tokenizer, name, stop, stop_tokens):
    template = BuiltinChatTemplate(BUILTIN_TEMPLATES[name], tokenizer)
    assert template.stop == stop
    assert template.stop_token_ids == tokenizer.convert_tokens_to_ids(stop_tokens)


def test_stablelm_stops_at_its_role_tokens_when_the_tokenizer_has_them(tokenizer):
    tokenizer = train_tokenizer()
    tokenizer.add_special_tokens(
        {"additional_special_tokens": ["<|USER|>", "<|ASSISTANT|>", "<|SYSTEM|>"]}
    )
    template = BuiltinChatTemplate(BUILTIN_TEMPLATES["stablelm"], tokenizer)
    assert template.stop_token_ids == tokenizer.convert_tokens_to_ids(
        ["<|USER|>", "<|ASSISTANT|>", "<|SYSTEM|>"]
    )


@pytest.mark.parametrize(
    ("messages", "error"),
    [
        ([{"role": "assistant", "content": "hi"}], "expected a user message"),
        ([TWO_TURNS[0], TWO_TURNS[0]], "expected a assistant message"),
        ([TWO_TURNS[0], SYSTEM], "a system message may only come first"),
        ([SYSTEM], "no user message"),
        ([{"role": "tool", "content": "x"}], "expected a user message, got 'tool'"),
        (TWO_TURNS[:2], "the last message must be the user's"),
    ],
)
def test_builtin_refuses_conversations_it_cannot_render(messages, error):
    with pytest.raises(ValueError, match=error):
        BuiltinChatTemplate(BUILTIN_TEMPLATES["vicuna_v1.1"]).render(messages)


# --- choosing a template --------------------------------------------------------------------


def test_the_tokenizers_own_template_wins_over_the_model_name(tokenizer):
    template = resolve_chat_template(tokenizer, "lmsys/vicuna-7b-v1.5")
    assert isinstance(template, JinjaChatTemplate)
    assert template.render(TWO_TURNS) == tokenizer.apply_chat_template(
        TWO_TURNS, tokenize=False, add_generation_prompt=True
    )
    assert template.stop_token_ids == [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    assert template.add_special_tokens is False


@pytest.mark.parametrize(
    ("model_name", "expected"),
    [
        ("lmsys/vicuna-7b-v1.5", "vicuna_v1.1"),
        ("/models/Vicuna-13B", "vicuna_v1.1"),
        ("meta-llama/Llama-2-7b-chat-hf", "llama-2"),
        ("databricks/dolly-v2-12b", "dolly_v2"),
        ("OpenAssistant/oasst-sft-4-pythia-12b-epoch-3.5", "oasst_pythia"),
        ("stabilityai/stablelm-tuned-alpha-7b", "stablelm"),
        ("mistralai/Mistral-7B-Instruct-v0.2", "mistral"),
        ("Qwen/Qwen-7B-Chat", "qwen-7b-chat"),
        ("young-geng/koala", "koala_v1"),
        ("/models/vicuna/some-finetune", "vicuna_v1.1"),  # the basename fails, the path matches
        ("EleutherAI/pythia-1b", None),  # pythia without oasst is a base model
        ("gpt2", None),
    ],
)
def test_model_name_picks_the_builtin_fastchat_would(model_name, expected):
    assert template_for_model_name(model_name) == expected


def test_without_a_tokenizer_template_the_model_name_picks_a_builtin(plain_tokenizer):
    template = resolve_chat_template(plain_tokenizer, "lmsys/vicuna-7b-v1.5")
    assert isinstance(template, BuiltinChatTemplate) and template.name == "vicuna_v1.1"
    assert template.render(TWO_TURNS) == EXPECTED["vicuna_v1.1"][0]
    assert template.add_special_tokens is True


def test_an_explicit_name_beats_the_tokenizers_template(tokenizer):
    template = resolve_chat_template(tokenizer, "lmsys/vicuna-7b-v1.5", explicit="llama-2")
    assert template.render(TWO_TURNS) == EXPECTED["llama-2"][0]


def test_an_explicit_file_is_rendered_as_jinja(plain_tokenizer, tmp_path):
    file = tmp_path / "template.jinja"
    file.write_text(
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    template = resolve_chat_template(plain_tokenizer, "whatever", explicit=file)
    assert template.render(TWO_TURNS) == (
        "<user>Hello!\n<assistant>Hi there.\n<user>How are you?\n<assistant>"
    )


def test_an_unknown_explicit_template_is_refused_at_once(tokenizer):
    with pytest.raises(ValueError, match="'vicuna-v9' is neither a built-in template"):
        resolve_chat_template(tokenizer, "m", explicit="vicuna-v9")


def test_no_template_and_no_match_fails_on_render_not_on_load(plain_tokenizer):
    template = resolve_chat_template(plain_tokenizer, "/models/gpt2")  # resolving succeeds
    assert isinstance(template, MissingChatTemplate)
    with pytest.raises(ValueError, match="'/models/gpt2' has no chat template.*--chat-template"):
        template.render(TWO_TURNS)
