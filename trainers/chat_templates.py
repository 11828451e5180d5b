"""Chat templates: the built-in ones `data.chat_template` can name, and how a spec's value
becomes template text.

The built-ins are the upstream text, byte for byte (an exported tokenizer then carries the
template inference servers recognise), so they have no `{% generation %}` tags: their
assistant masks come from trainers.data's prefix rendering.

Pure: the standard library only (the launcher's pre-flight imports it without torch).
"""

from __future__ import annotations

import json
import os
import re

# ChatML, as OpenAI documented it and Qwen/Hermes models ship it.
CHATML = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Meta-Llama-3-*-Instruct's template.
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
BUILTIN = {"chatml": CHATML, "llama3": LLAMA3}

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


class TemplateError(ValueError):
    """`data.chat_template` names no built-in, no readable file and is no template."""


def is_template_text(value: str) -> bool:
    """A value that is the template itself (what the launcher sends in place of a file)."""
    return "{{" in value or "{%" in value


def is_file_reference(value: object) -> bool:
    """Whether the value names a file (a string that is neither a built-in nor template
    text); anything else, even malformed, is left to the spec's validation."""
    return isinstance(value, str) and bool(value) and value not in BUILTIN and not is_template_text(value)


def resolve(value: str | None) -> str | None:
    """The template text `data.chat_template` stands for (None: the tokenizer's own)."""
    if value is None:
        return None
    if value in BUILTIN:
        return BUILTIN[value]
    if is_template_text(value):
        return value
    try:
        with open(os.path.expanduser(value), encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise TemplateError(f"data.chat_template: {value} is not a built-in ({', '.join(BUILTIN)}) and cannot be "
                            f"read as a jinja file: {getattr(e, 'strerror', None) or e}") from None


def has_generation_tags(template: str | None) -> bool:
    """Whether the template marks assistant output with `{% generation %}` (Hugging Face's
    `return_assistant_tokens_mask` then says exactly which tokens train)."""
    return bool(template) and _GENERATION_TAG.search(template) is not None


def model_dir_has_template(model_dir: str) -> bool | None:
    """Whether a local model directory's tokenizer has a chat template, read from its files
    as transformers reads them; None when `model_dir` is not a local directory (a hub id,
    `s3://`): the job checks those where it runs."""
    if "://" in model_dir or not os.path.isdir(model_dir):
        return None
    if any(os.path.exists(os.path.join(model_dir, name)) for name in ("chat_template.jinja", "chat_template.json")):
        return True
    if os.path.isdir(os.path.join(model_dir, "additional_chat_templates")):
        return True
    try:
        with open(os.path.join(model_dir, "tokenizer_config.json"), encoding="utf-8") as f:
            return bool(json.load(f).get("chat_template"))
    except (OSError, ValueError, AttributeError):
        return False


def missing(model_path: str, chat_datasets: list[str]) -> tuple[str, str]:
    """(message, hint) when chat data meets a tokenizer without a template: the same words
    from the launcher's pre-flight and from the job."""
    return (f"data.chat_template: the tokenizer of {model_path} has no chat template, and "
            f"{', '.join(chat_datasets)} {'is' if len(chat_datasets) == 1 else 'are'} chat data",
            f"set data.chat_template to a built-in ({', '.join(BUILTIN)}), a jinja file, or use a model whose "
            "tokenizer has a template")
