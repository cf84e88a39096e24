"""Chat templates: a list of messages -> the model's prompt text, plus what ends a reply.

`resolve_chat_template(tokenizer, model_name, explicit=None)` picks, in this order:
1. `explicit` (`--chat-template`): a built-in template's name, or a file holding a Jinja
   template (rendered as `transformers` renders a tokenizer's own);
2. the tokenizer's own `chat_template`;
3. a built-in template chosen by the model's name, with the rules of FastChat's model
   adapters (basename first, then the whole path);
4. none: the returned template raises a ValueError when asked to render, so a model without a
   template still serves completions and a chat request gets a clear error.

The built-in templates render exactly as FastChat 0.2.36's conversation templates of the same
names (fastchat/conversation.py), with their stop strings and stop tokens.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any


class Style(Enum):
    """FastChat's separator styles, those the built-in templates use."""

    ADD_COLON_SINGLE = "add_colon_single"  # "ROLE: text" + sep after every message
    ADD_COLON_TWO = "add_colon_two"  # "ROLE: text" + sep after user, sep2 after assistant
    NO_COLON_SINGLE = "no_colon_single"  # "ROLEtext" + sep
    LLAMA2 = "llama2"  # [INST] ... [/INST]
    DOLLY = "dolly"  # "ROLE:\ntext" + sep / sep2, a blank line after each answer
    CHATML = "chatml"  # "ROLE\ntext" + sep + "\n"


@dataclass(frozen=True)
class ConversationFormat:
    """One FastChat conversation template (its fields keep FastChat's names)."""

    name: str
    style: Style
    roles: tuple[str, str] = ("USER", "ASSISTANT")
    system_template: str = "{system_message}"
    system_message: str = ""
    sep: str = "\n"
    sep2: str | None = None
    stop_str: tuple[str, ...] = ()
    # Tokens that end a reply, by their text (FastChat lists their ids for one tokenizer).
    stop_tokens: tuple[str, ...] = ()
    # No system block at all for an empty system message (ChatML as tokenizers write it).
    omit_empty_system: bool = False

    def get_prompt(self, system_message: str | None, messages: list[str | None]) -> str:
        """FastChat's `Conversation.get_prompt`: `messages` alternate user, assistant; a
        None (or empty) message leaves its role open for the model to fill."""
        system = self.system_message if system_message is None else system_message
        system_prompt = self.system_template.format(system_message=system)
        if self.omit_empty_system and not system:
            system_prompt = ""
        prefix = {
            Style.ADD_COLON_SINGLE: system_prompt + self.sep,
            Style.ADD_COLON_TWO: system_prompt + self.sep,
            Style.NO_COLON_SINGLE: system_prompt,
            Style.LLAMA2: system_prompt if system else "[INST] ",
            Style.DOLLY: system_prompt,
            Style.CHATML: system_prompt + self.sep + "\n" if system_prompt else "",
        }[self.style]
        return prefix + "".join(self._turn(i, m) for i, m in enumerate(messages))

    def _turn(self, i: int, message: str | None) -> str:
        role, sep = self.roles[i % 2], (self.sep, self.sep2)[i % 2]
        style = self.style
        if not message:  # the open slot: the role for the model to continue
            if style in (Style.ADD_COLON_SINGLE, Style.ADD_COLON_TWO):
                return f"{role}:"
            return {Style.DOLLY: f"{role}:\n", Style.CHATML: f"{role}\n"}.get(style, role)
        if style is Style.ADD_COLON_SINGLE:
            return f"{role}: {message}{self.sep}"
        if style is Style.ADD_COLON_TWO:
            return f"{role}: {message}{sep}"
        if style is Style.NO_COLON_SINGLE:
            return f"{role}{message}{self.sep}"
        if style is Style.LLAMA2:  # the first message follows "[INST] " and the system block
            return f"{message} " if i == 0 else f"{role} {message}{sep}"
        if style is Style.DOLLY:
            return f"{role}:\n{message}{sep}" + ("\n\n" if i % 2 else "")
        return f"{role}\n{message}{self.sep}\n"  # CHATML


_HELPFUL = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
_STABLELM_SYSTEM = """# StableLM Tuned (Alpha version)
- StableLM is a helpful and harmless open-source AI language model developed by StabilityAI.
- StableLM is excited to be able to help the user, but will refuse to do anything that could be considered harmful to the user.
- StableLM is more than just an information source, StableLM is also able to write poetry, short stories, and make jokes.
- StableLM will refuse to participate in anything that could harm a human.
"""  # noqa: E501 - FastChat's text, verbatim

BUILTIN_TEMPLATES: dict[str, ConversationFormat] = {
    f.name: f
    for f in (
        ConversationFormat(
            "vicuna_v1.1", Style.ADD_COLON_TWO, system_message=_HELPFUL, sep=" ", sep2="</s>"
        ),
        ConversationFormat(
            "koala_v1",
            Style.ADD_COLON_TWO,
            roles=("USER", "GPT"),
            system_message="BEGINNING OF CONVERSATION:",
            sep=" ",
            sep2="</s>",
        ),
        ConversationFormat(
            "alpaca",
            Style.ADD_COLON_TWO,
            roles=("### Instruction", "### Response"),
            system_message="Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request.",
            sep="\n\n",
            sep2="</s>",
        ),
        ConversationFormat(
            "llama-2",
            Style.LLAMA2,
            roles=("[INST]", "[/INST]"),
            system_template="[INST] <<SYS>>\n{system_message}\n<</SYS>>\n\n",
            sep=" ",
            sep2=" </s><s>",
        ),
        ConversationFormat(
            "mistral",
            Style.LLAMA2,
            roles=("[INST]", "[/INST]"),
            system_template="[INST] {system_message}\n",
            sep=" ",
            sep2="</s>",
        ),
        ConversationFormat(
            "dolly_v2",
            Style.DOLLY,
            roles=("### Instruction", "### Response"),
            system_message="Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request.\n\n",
            sep="\n\n",
            sep2="### End",
            # FastChat makes "### End" Dolly's EOS token.
            stop_str=("### End",),
            stop_tokens=("### End",),
        ),
        ConversationFormat(
            "oasst_pythia",
            Style.NO_COLON_SINGLE,
            roles=("<|prompter|>", "<|assistant|>"),
            sep="<|endoftext|>",
        ),
        ConversationFormat(
            "stablelm",
            Style.NO_COLON_SINGLE,
            roles=("<|USER|>", "<|ASSISTANT|>"),
            system_template="<|SYSTEM|>{system_message}",
            system_message=_STABLELM_SYSTEM,
            sep="",
            stop_tokens=("<|USER|>", "<|ASSISTANT|>", "<|SYSTEM|>", "<|padding|>", "<|endoftext|>"),
        ),
        ConversationFormat(
            "chatml",
            Style.CHATML,
            roles=("<|im_start|>user", "<|im_start|>assistant"),
            system_template="<|im_start|>system\n{system_message}",
            omit_empty_system=True,
            sep="<|im_end|>",
            stop_str=("<|im_end|>",),
            stop_tokens=("<|im_end|>", "<|im_start|>", "<|endoftext|>"),
        ),
        ConversationFormat(
            "qwen-7b-chat",
            Style.CHATML,
            roles=("<|im_start|>user", "<|im_start|>assistant"),
            system_template="<|im_start|>system\n{system_message}",
            system_message="You are a helpful assistant.",
            sep="<|im_end|>",
            stop_str=("<|endoftext|>",),
            stop_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        ),
    )
}

# FastChat's model adapters, in their order: every listed word in the name -> template.
NAME_RULES: tuple[tuple[tuple[str, ...], str], ...] = (
    (("vicuna",), "vicuna_v1.1"),
    (("koala",), "koala_v1"),
    (("alpaca",), "alpaca"),
    (("dolly-v2",), "dolly_v2"),
    (("oasst", "pythia"), "oasst_pythia"),
    (("stablelm",), "stablelm"),
    (("llama-2",), "llama-2"),
    (("mistral",), "mistral"),
    (("mixtral",), "mistral"),
    (("qwen",), "qwen-7b-chat"),
)

# End-of-turn tokens of common Jinja templates: a reply stops at one when the template uses it.
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


class ChatTemplate:
    """Renders OpenAI-style messages ({"role", "content"}) to prompt text; `variables` are
    extra Jinja variables (a request's chat_template_kwargs), which built-in templates ignore.

    `stop` are strings that end a reply, `stop_token_ids` tokens that do (beyond the model's
    EOS); `add_special_tokens` says whether to let the tokenizer add its BOS when encoding
    the prompt (FastChat's templates expect it; Jinja templates write their own)."""

    name: str
    stop: list[str]
    stop_token_ids: list[int]
    add_special_tokens: bool

    def render(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **variables: Any
    ) -> str:
        raise NotImplementedError


class BuiltinChatTemplate(ChatTemplate):
    add_special_tokens = True

    def __init__(self, fmt: ConversationFormat, tokenizer: Any = None):
        self.format = fmt
        self.name = fmt.name
        self.stop = list(fmt.stop_str)
        self.stop_token_ids = _token_ids(tokenizer, (*fmt.stop_tokens, *fmt.stop_str))

    def render(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **variables: Any
    ) -> str:
        system, turns = _split_messages(messages, self.name)
        if add_generation_prompt:
            if len(turns) % 2 == 0:
                raise ValueError(
                    f"chat template {self.name!r}: the last message must be the user's "
                    "for the model to answer it"
                )
            turns.append(None)
        return self.format.get_prompt(system, turns)


class JinjaChatTemplate(ChatTemplate):
    """The tokenizer's own template, or a Jinja `source` given instead of it."""

    add_special_tokens = False

    def __init__(self, tokenizer: Any, source: str | None = None, name: str = "tokenizer"):
        self.tokenizer, self.source, self.name = tokenizer, source, name
        text = source if source is not None else tokenizer.chat_template
        self.stop = []
        self.stop_token_ids = _token_ids(tokenizer, [t for t in _END_OF_TURN_TOKENS if t in text])

    def render(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **variables: Any
    ) -> str:
        source = {} if self.source is None else {"chat_template": self.source}
        return self.tokenizer.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            **source,
            **variables,
        )


class MissingChatTemplate(ChatTemplate):
    """No template fits the model: rendering refuses with a sentence saying what to do."""

    add_special_tokens = True

    def __init__(self, model_name: str):
        self.name = "none"
        self.model_name = model_name
        self.stop, self.stop_token_ids = [], []

    def render(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **variables: Any
    ) -> str:
        raise ValueError(
            f"model {self.model_name!r} has no chat template: its tokenizer has none and its "
            "name matches no built-in template; start it with --chat-template NAME or FILE "
            f"(built-in: {', '.join(BUILTIN_TEMPLATES)}), or send prompts to /v1/completions"
        )


def resolve_chat_template(
    tokenizer: Any, model_name: str, explicit: str | os.PathLike | None = None
) -> ChatTemplate:
    """The chat template for a model (see the module's docstring for the order)."""
    if explicit is not None:
        explicit = str(explicit)
        if explicit in BUILTIN_TEMPLATES:
            return BuiltinChatTemplate(BUILTIN_TEMPLATES[explicit], tokenizer)
        path = Path(explicit).expanduser()
        if path.is_file():
            return JinjaChatTemplate(tokenizer, path.read_text(encoding="utf-8"), name=str(path))
        raise ValueError(
            f"chat template {explicit!r} is neither a built-in template "
            f"({', '.join(BUILTIN_TEMPLATES)}) nor a file"
        )
    if getattr(tokenizer, "chat_template", None):
        return JinjaChatTemplate(tokenizer)
    name = template_for_model_name(model_name)
    if name is not None:
        return BuiltinChatTemplate(BUILTIN_TEMPLATES[name], tokenizer)
    return MissingChatTemplate(model_name)


def template_for_model_name(model_name: str) -> str | None:
    """The built-in template FastChat's adapters would pick for this name or path, if any."""
    path = str(model_name)
    for candidate in (os.path.basename(os.path.normpath(path)), path):
        lowered = candidate.lower()
        for words, template in NAME_RULES:
            if all(w in lowered for w in words):
                return template
    return None


def _split_messages(
    messages: list[dict[str, Any]], template: str
) -> tuple[str | None, list[str | None]]:
    """(system message or None, the user/assistant texts in order), checking that they
    alternate starting with the user, as FastChat's templates require."""
    system: str | None = None
    turns: list[str | None] = []
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if not isinstance(content, str):
            raise ValueError(f"message {i}: content must be a string for template {template!r}")
        if role == "system":
            if i != 0:
                raise ValueError(f"message {i}: a system message may only come first")
            system = content
            continue
        expected = ("user", "assistant")[len(turns) % 2]
        if role != expected:
            raise ValueError(
                f"message {i}: expected a {expected} message, got {role!r}; template "
                f"{template!r} needs user and assistant messages alternating, user first"
            )
        turns.append(content)
    if not turns:
        raise ValueError("messages hold no user message")
    return system, turns


def _token_ids(tokenizer: Any, tokens) -> list[int]:
    """Ids of those `tokens` that the tokenizer holds as single tokens, in order, no repeats."""
    if tokenizer is None:
        return []
    vocab = tokenizer.get_vocab()
    ids: list[int] = []
    for token in tokens:
        if token in vocab and vocab[token] not in ids:
            ids.append(vocab[token])
    return ids
