"""Alpaca records as chat messages, and the named chat templates for tokenizers that have none.

The model's own chat template is used whenever the tokenizer has one (`tokenize.template: auto`);
a named template here is used when it has none or when params ask for one by name.
"""

from __future__ import annotations

import datetime
import json
import re

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

ALPACA = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}### Instruction:\n{{ m['content'] }}\n\n### Response:\n"
    "{% else %}{{ m['content'] }}{{ eos_token }}\n\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{% endif %}"
)

TEMPLATES = {"chatml": CHATML, "llama3": LLAMA3, "alpaca": ALPACA}

# The special tokens each template needs in the vocabulary, and the one that ends a turn.
TEMPLATE_TOKENS = {
    "chatml": (["<|im_start|>", "<|im_end|>"], "<|im_end|>"),
    "llama3": (["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], "<|eot_id|>"),
    "alpaca": ([], None),
}


def user_content(record: dict) -> str:
    """The user turn of an Alpaca record: the instruction, then the input when there is one."""
    instruction = record["instruction"]
    extra = record.get("input") or ""
    return f"{instruction}\n\n{extra}" if extra else instruction


def to_messages(record: dict, with_answer: bool = True) -> list[dict]:
    """An Alpaca record as chat messages: system, history turns, the user turn, the answer."""
    messages = []
    if record.get("system"):
        messages.append({"role": "system", "content": record["system"]})
    for user, assistant in record.get("history") or []:
        messages.append({"role": "user", "content": user})
        messages.append({"role": "assistant", "content": assistant})
    messages.append({"role": "user", "content": user_content(record)})
    if with_answer:
        messages.append({"role": "assistant", "content": record["output"]})
    return messages


# A template's call of transformers' strftime_now with a literal format, e.g. Llama 3.1's
# strftime_now("%d %b %Y") for "Today Date:" in the system header.
_STRFTIME_NOW_RE = re.compile(r"""strftime_now\(\s*(["'])(.*?)\1\s*\)""")


def with_fixed_date(template: str, date: str) -> str:
    """`template` with every strftime_now("<format>") call replaced by `date` (YYYY-MM-DD) in that format.

    transformers renders strftime_now as the time of rendering, so the same records would give
    other tokens on another day; with the date written into the template they never do.
    """
    day = datetime.date.fromisoformat(date)
    fixed = _STRFTIME_NOW_RE.sub(lambda m: json.dumps(day.strftime(m.group(2))), template)
    if "strftime_now(" in fixed:
        raise ValueError("the chat template calls strftime_now with a format that is not a string literal; "
                         "set tokenize.template to a named template or edit the template")
    return fixed


def chat_template_for(tokenizer, template: str) -> str:
    """The Jinja chat template to render with: the tokenizer's own for `auto`, else the named one."""
    if template == "auto":
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.chat_template
        raise ValueError(
            "the tokenizer has no chat template; set tokenize.template to one of "
            + ", ".join(TEMPLATES)
        )
    return TEMPLATES[template]


def render(tokenizer, messages: list[dict], template: str, add_generation_prompt: bool = False) -> str:
    """The conversation as text, through the chosen chat template."""
    return tokenizer.apply_chat_template(
        messages,
        chat_template=chat_template_for(tokenizer, template),
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
    )


def segments(tokenizer, messages: list[dict], template: str) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, is_answer) pieces.

    Each assistant turn is the text that rendering the conversation up to and including it adds
    after the generation prompt; everything else is prompt. The pieces joined give exactly the
    rendered conversation, so label masks line up with what the model sees.
    """
    pieces: list[tuple[str, bool]] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(tokenizer, messages[:i], template, add_generation_prompt=True)
        full = render(tokenizer, messages[: i + 1], template)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise ValueError(f"chat template {template!r} does not render turns as a prefix of the whole")
        pieces.append((prompt[len(done):], False))
        pieces.append((full[len(prompt):], True))
        done = full
    rest = render(tokenizer, messages, template)[len(done):]
    if rest:
        pieces.append((rest, False))
    return [(text, is_answer) for text, is_answer in pieces if text]
