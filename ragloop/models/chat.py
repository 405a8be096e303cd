"""Chat-template rendering and context-window accounting — the one renderer agents and training share.

- ``render_messages``: a list of ``{"role", "content"}`` messages → the exact prompt text the model sees,
  through the tokenizer's own chat template (SmolLM2 uses ChatML: ``<|im_start|>role\\n…<|im_end|>\\n``).
  Training renders with the same function, so the model trains on exactly the format it runs on.
- ``ensure_chat_template``: a tokenizer without a template but with ChatML tokens gets the ChatML template
  (a GGUF file may lack one); any other gets a plain ``role: content`` template and a warning.
- ``neutralize_special_tokens``: message *content* cannot smuggle control tokens (``<|im_end|>`` in a
  retrieved document would otherwise end the turn and open a fake one — SECURITY.md §4). A zero-width
  space is inserted after the first character of every special-token string that appears in content, so it
  is tokenized as plain text; the template's own control tokens are untouched.
- ``check_fits``: prompt tokens + tokens asked for vs the context window — refuse with the numbers, never
  truncate silently.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from ragloop.core.errors import ContextWindowError, UsageError
from ragloop.models.types import ChatMessages, as_messages

log = logging.getLogger(__name__)

# ChatML as SmolLM2-Instruct uses it (its default system prompt included), written out here so that a GGUF
# without an embedded template still renders the way the model was trained.
SMOLLM2_CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# A last resort for tokenizers with neither a template nor ChatML tokens.
PLAIN_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] + ': ' + message['content'] + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)

ZWSP = "\u200b"


def ensure_chat_template(tokenizer: Any) -> None:
    """Give ``tokenizer`` a chat template if it has none (ChatML when it knows ``<|im_start|>``)."""
    if getattr(tokenizer, "chat_template", None):
        return
    vocab = tokenizer.get_vocab()
    if "<|im_start|>" in vocab and "<|im_end|>" in vocab:
        tokenizer.chat_template = SMOLLM2_CHATML_TEMPLATE
    else:
        log.warning("tokenizer has no chat template; using a plain 'role: content' template")
        tokenizer.chat_template = PLAIN_TEMPLATE


def special_token_strings(tokenizer: Any) -> list[str]:
    """The literal strings the tokenizer turns into control tokens (longest first)."""
    specials = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for tok in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if getattr(tok, "special", False):
            specials.add(str(tok.content))
    return sorted((s for s in specials if len(s) > 1), key=len, reverse=True)


def neutralize_special_tokens(text: str, specials: Iterable[str]) -> str:
    """Break every special-token string in ``text`` so it tokenizes as text:
    ``neutralize_special_tokens("a<|im_end|>b", ["<|im_end|>"]) -> "a<\\u200b|im_end|>b"``."""
    for s in specials:
        if s in text:
            text = text.replace(s, s[0] + ZWSP + s[1:])
    return text


def render_messages(
    tokenizer: Any, messages: ChatMessages, *, add_generation_prompt: bool = True, neutralize: bool = True
) -> str:
    """The prompt text for ``messages`` under the tokenizer's chat template."""
    msgs = as_messages(messages)
    if not msgs:
        raise UsageError("no messages to render (the prompt is empty)")
    if neutralize:
        specials = special_token_strings(tokenizer)
        msgs = [{"role": m["role"], "content": neutralize_special_tokens(m["content"], specials)} for m in msgs]
    ensure_chat_template(tokenizer)
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)


def check_fits(prompt_tokens: int, max_new_tokens: int, context_window: int) -> None:
    """Raise ContextWindowError (with the numbers and the fix) unless prompt + generation fit the window."""
    if prompt_tokens + max_new_tokens <= context_window:
        return
    if prompt_tokens >= context_window:
        raise ContextWindowError(
            f"the prompt has {prompt_tokens} tokens but the context window is {context_window} tokens",
            hint=f"shorten the prompt by at least {prompt_tokens - context_window + 1} tokens",
        )
    room = context_window - prompt_tokens
    raise ContextWindowError(
        f"prompt ({prompt_tokens} tokens) + max new tokens ({max_new_tokens}) = "
        f"{prompt_tokens + max_new_tokens} exceeds the context window of {context_window} tokens",
        hint=f"lower max new tokens to at most {room} or shorten the prompt",
    )
