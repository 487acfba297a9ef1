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
        raise ValueError(
            "the chat template calls strftime_now with a format that is not a string literal; "
            "set tokenize.template to a named template or edit the template"
        )
    return fixed


def chat_template_for(tokenizer, template: str) -> str:
    """The Jinja chat template to render with: the tokenizer's own for `auto`, else the named one."""
    if template == "auto":
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.chat_template
        raise ValueError(
            "the tokenizer has no chat template; set tokenize.template to one of " + ", ".join(TEMPLATES)
        )
    return TEMPLATES[template]


# A conversation to find what a template writes after an answer (its end of turn).
_PROBE = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Probe answer"}]


def end_of_turn(tokenizer, template: str) -> str | None:
    """The special token that closes an assistant turn in `template`: the first special token it writes
    after an answer's text (<|im_end|>, <|eot_id|>, <end_of_turn>, <|end|>, or the EOS of templates
    that end answers with it). None when it writes none there: such a template's answers end in text.

    A base model's EOS is often not this token (Qwen2.5 base: <|endoftext|>; Llama 3 base:
    <|end_of_text|>), so generation must stop on it as well, or the answer runs on to max_new_tokens.
    """
    full = render(tokenizer, _PROBE, template)
    after = full[full.rindex(_PROBE[-1]["content"]) + len(_PROBE[-1]["content"]) :]
    specials = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    found = [(after.index(t), t) for t in specials if t in after]
    return min(found)[1] if found else None


def render(tokenizer, messages: list[dict], template: str, add_generation_prompt: bool = False) -> str:
    """The conversation as text, through the chosen chat template."""
    return render_many(tokenizer, [messages], template, add_generation_prompt)[0]


def render_many(
    tokenizer, conversations: list[list[dict]], template: str, add_generation_prompt: bool = False
) -> list[str]:
    """Many conversations as text: the strings `apply_chat_template` renders, at a quarter of its cost.

    The conversations are `to_messages` output, plain dicts of strings, so the per-message
    normalisation `apply_chat_template` does (rebuilding every message as plain template data,
    about half its time) changes nothing; they go straight to the template transformers compiles
    (the same cached Jinja environment, with its `raise_exception`, `strftime_now` and `tojson`),
    with the tokenizer's special tokens as variables, as `apply_chat_template` passes them.
    Without that function (another transformers), `apply_chat_template` renders them.
    """
    if not conversations:
        return []
    chat_template = chat_template_for(tokenizer, template)
    try:  # imported here: build reads this module and never loads transformers
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:
        return tokenizer.apply_chat_template(
            conversations,
            chat_template=chat_template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )
    compiled = _compile_jinja_template(chat_template)
    variables = dict(
        tokenizer.special_tokens_map, tools=None, documents=None, add_generation_prompt=add_generation_prompt
    )
    return [compiled.render(messages=messages, **variables) for messages in conversations]


def segments(tokenizer, messages: list[dict], template: str) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, is_answer) pieces.

    Each assistant turn is the text that rendering the conversation up to and including it adds
    after the generation prompt, up to and including its end-of-turn token; everything else is prompt. The
    pieces joined give exactly the
    rendered conversation, so label masks line up with what the model sees.
    """
    return segments_many(tokenizer, [messages], template)[0]


def segments_many(tokenizer, conversations: list[list[dict]], template: str) -> list[list[tuple[str, bool]]]:
    """`segments` of many conversations, with every render they need done in two batched calls.

    A conversation with k assistant turns needs 2k renders: each turn's prompt (with the
    generation prompt) and the conversation up to and including the turn. The whole conversation
    is the last of these when it ends on an answer, so it is rendered a third time only when it
    does not.
    """
    prompts: list[list[dict]] = []  # conversation prefixes rendered with the generation prompt
    fulls: list[list[dict]] = []  # prefixes ending on an answer, and whole conversations that do not
    plans = []
    for messages in conversations:
        turns = [i for i, message in enumerate(messages) if message["role"] == "assistant"]
        ends_on_answer = bool(turns) and turns[-1] == len(messages) - 1
        plans.append((len(prompts), len(fulls), len(turns), ends_on_answer))
        prompts += [messages[:i] for i in turns]
        fulls += [messages[: i + 1] for i in turns]
        if not ends_on_answer:
            fulls.append(messages)
    prompt_texts = render_many(tokenizer, prompts, template, add_generation_prompt=True)
    full_texts = render_many(tokenizer, fulls, template)

    turn_end = end_of_turn(tokenizer, template)
    out = []
    for p0, f0, n_turns, ends_on_answer in plans:
        turns = list(zip(prompt_texts[p0 : p0 + n_turns], full_texts[f0 : f0 + n_turns]))
        if not prefix_stable(turns):
            # The template rewrites earlier turns once a later one exists (Qwen3 drops their reasoning,
            # Phi-3 ends a conversation with EOS): the whole conversation is the last turn's prompt
            # plus its answer, so only that answer is learnt, as the model will see it when serving.
            turns = turns[-1:]
            if not turns[0][1].startswith(turns[0][0]):
                raise ValueError(
                    f"chat template {template!r} does not render the last answer after its prompt"
                )
        pieces: list[tuple[str, bool]] = []
        done = ""
        for prompt, full in turns:
            pieces.append((prompt[len(done) :], False))
            pieces += answer_pieces(full[len(prompt) :], turn_end)
            done = full
        rest = "" if ends_on_answer else full_texts[f0 + n_turns][len(done) :]
        if rest:
            pieces.append((rest, False))
        out.append([(text, is_answer) for text, is_answer in pieces if text])
    return out


def prefix_stable(turns: list[tuple[str, str]]) -> bool:
    """Whether each turn's (prompt, prompt + answer) renders extend the previous turn's as a prefix."""
    done = ""
    for prompt, full in turns:
        if not prompt.startswith(done) or not full.startswith(prompt):
            return False
        done = full
    return True


def answer_pieces(text: str, turn_end: str | None) -> list[tuple[str, bool]]:
    """An answer turn's text as (answer up to and including its end-of-turn token, True) and what the
    template writes after that token (a newline, Phi-3's EOS) as prompt: the model is taught to stop
    at the end of turn, never to write past it."""
    if not turn_end or turn_end not in text:
        return [(text, True)]
    cut = text.rindex(turn_end) + len(turn_end)
    return [(text[:cut], True), (text[cut:], False)]
