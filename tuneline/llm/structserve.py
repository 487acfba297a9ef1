"""`transformers serve` with structured outputs: replies that follow the request's JSON schema.

`transformers serve` 5.x ignores `response_format` (it is in its list of unused fields), so a small
local model asked for JSON writes prose until max_tokens. This runs the same server, with one change:
its chat handler reads `response_format` and decodes under that constraint with llguidance (the
grammar engine behind vLLM's, SGLang's and llama.cpp's guided decoding), through a transformers
LogitsProcessor that masks every token the grammar does not allow next:

- {"type": "json_schema", "json_schema": {"schema": {...}}}: the reply is a JSON value of that schema
  (string lengths and array sizes included, so a reply the schema bounds ends before max_tokens);
- {"type": "json_object"}: the reply is a JSON object;
- no response_format, or {"type": "text"}: unconstrained, as `transformers serve`.

Requests, replies, logit_bias and seeds are `transformers serve`'s own.

    python -m tuneline.llm.structserve --host 127.0.0.1 --port 8000 --device cpu models/base/tiny_qwen
"""

from __future__ import annotations

import argparse
import functools

import llguidance
import llguidance.hf
import torch
from transformers import AutoTokenizer, LogitsProcessor
from transformers.cli.serve import Serve
from transformers.cli.serving.chat_completion import UNUSED_CHAT_COMPLETION_FIELDS, ChatCompletionHandler


def response_schema(response_format: dict | None) -> dict | None:
    """The JSON schema a response_format asks for: its schema, {"type": "object"} for json_object,
    None for text or none; anything else is a ValueError (the server's 400)."""
    if not response_format or response_format.get("type") == "text":
        return None
    kind = response_format.get("type")
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise ValueError("response_format json_schema needs json_schema.schema, a JSON schema object")
        return schema
    raise ValueError(f"response_format type {kind!r} is not one of text, json_object, json_schema")


@functools.lru_cache(maxsize=4)
def grammar_tokenizer(model: str, eos_ids: tuple[int, ...]) -> llguidance.LLTokenizer:
    """llguidance's view of the model's tokenizer (about a second to build, so built once per model)."""
    tokenizer = AutoTokenizer.from_pretrained(model)
    return llguidance.hf.from_tokenizer(tokenizer, eos_token=list(eos_ids))


class SchemaLogitsProcessor(LogitsProcessor):
    """Masks, at each step, the tokens that would leave the grammar; after the grammar is complete
    only an end-of-sequence token is allowed, so `generate` stops there.

    One processor per request (batch size 1, as `transformers serve` generates): it feeds the tokens
    generated since the last step to its matcher. It travels to the server's model process by
    pickle, so it holds only the grammar, the model path and the eos ids until its first step builds
    the matcher there."""

    def __init__(self, model: str, grammar: str, eos_ids: tuple[int, ...]):
        self.model, self.grammar, self.eos_ids = model, grammar, eos_ids
        self.matcher: llguidance.LLMatcher | None = None
        self.consumed = 0  # input_ids length already fed to the matcher

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.matcher is None:
            tokenizer = grammar_tokenizer(self.model, self.eos_ids)
            self.matcher = llguidance.LLMatcher(tokenizer, self.grammar, log_level=0)
        else:
            self.matcher.consume_tokens(input_ids[0, self.consumed :].tolist())
        self.consumed = input_ids.shape[1]
        allowed = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)
        if self.matcher.is_stopped() or self.matcher.is_error():
            allowed[list(self.eos_ids)] = True
        else:
            bias = torch.frombuffer(bytearray(self.matcher.compute_logit_bias()), dtype=torch.uint8)
            width = min(len(bias), scores.shape[-1])
            allowed[:width] = bias[:width].to(scores.device) > 0
        return scores.masked_fill(~allowed, float("-inf"))


def schema_grammar(schema: dict) -> str:
    """llguidance's grammar for a JSON schema, compact (no whitespace between tokens: fewer tokens to
    generate); a schema it cannot compile is a ValueError (the server's 400)."""
    grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides={"whitespace_flexible": False})
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise ValueError(f"response_format schema is not usable: {messages[0]}")
    return grammar


class StructuredChatHandler(ChatCompletionHandler):
    """`transformers serve`'s chat handler, plus `response_format` through SchemaLogitsProcessor."""

    _unused_fields = UNUSED_CHAT_COMPLETION_FIELDS - {"response_format"}

    def _build_generation_kwargs(self, body: dict, model_generation_config) -> dict:
        generation_kwargs = super()._build_generation_kwargs(body, model_generation_config)
        schema = response_schema(body.get("response_format"))
        if schema is not None:
            eos = model_generation_config.eos_token_id
            eos_ids = tuple(eos if isinstance(eos, list) else [eos])
            processor = SchemaLogitsProcessor(body["model"], schema_grammar(schema), eos_ids)
            generation_kwargs["logits_processor"] = [processor]
        return generation_kwargs


class StructuredServe(Serve):
    """`transformers serve` (one API server, one model) whose chat endpoint is StructuredChatHandler."""

    def run(self, socket=None, engine_connection=None) -> None:
        import uvicorn
        from transformers.cli.serving.completion import CompletionHandler
        from transformers.cli.serving.model_manager import ModelManager
        from transformers.cli.serving.response import ResponseHandler
        from transformers.cli.serving.server import build_server
        from transformers.cli.serving.systemone import SystemOneHandler
        from transformers.cli.serving.transcription import TranscriptionHandler

        manager = ModelManager(
            self.loader, self.generation_state, model_timeout=self.model_timeout, force_model=self.force_model
        )
        shared = {"model_manager": manager, "generation_state": self.generation_state}
        chat = {**shared, "chat_template_kwargs": self.chat_template_kwargs}
        app = build_server(
            manager,
            StructuredChatHandler(**chat),
            completion_handler=CompletionHandler(**shared),
            response_handler=ResponseHandler(**chat),
            transcription_handler=TranscriptionHandler(manager),
            systemone_handler=SystemOneHandler(**chat, decision_config=self.decision_config),
        )
        uvicorn.run(app, host=self.host, port=self.port, log_level="warning")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tuneline.llm.structserve", description=__doc__.splitlines()[0]
    )
    parser.add_argument("model", help="a local model directory, preloaded and used for every request")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    StructuredServe(
        force_model=args.model, host=args.host, port=args.port, device=args.device, log_level=args.log_level
    )


if __name__ == "__main__":
    main()
