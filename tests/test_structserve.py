"""tuneline.llm.structserve: decoding under a JSON schema, with a real tiny model (in process, and served)."""

from __future__ import annotations

import json
import pickle

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from tuneline.llm.structserve import SchemaLogitsProcessor, response_schema, schema_grammar

SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["winner", "why"],
    "properties": {
        "winner": {"type": "string", "enum": ["A", "B", "tie"]},
        "why": {"type": "string", "minLength": 3, "maxLength": 20},
    },
}


def generate(model_dir, processors: list, seed: int) -> str:
    import torch

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Which is better?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    torch.manual_seed(seed)
    out = model.generate(
        **inputs, logits_processor=processors, max_new_tokens=80, do_sample=True, temperature=1.0
    )
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def test_a_random_model_decoded_under_the_schema_writes_json_of_that_schema(tiny_model_dir):
    eos = (AutoTokenizer.from_pretrained(tiny_model_dir).eos_token_id,)
    for seed in range(3):
        # The processor travels to the server's model process by pickle: test it as it arrives there.
        processor = pickle.loads(
            pickle.dumps(SchemaLogitsProcessor(str(tiny_model_dir), schema_grammar(SCHEMA), eos))
        )
        reply = json.loads(generate(tiny_model_dir, [processor], seed))
        assert set(reply) == {"winner", "why"} and reply["winner"] in ("A", "B", "tie")
        assert 3 <= len(reply["why"]) <= 20
    with pytest.raises(ValueError):  # unconstrained, the same model writes no JSON
        json.loads(generate(tiny_model_dir, [], 0))


def test_response_format_maps_to_a_schema_or_none():
    assert response_schema(None) is None and response_schema({"type": "text"}) is None
    assert response_schema({"type": "json_object"}) == {"type": "object"}
    assert response_schema({"type": "json_schema", "json_schema": {"name": "v", "schema": SCHEMA}}) == SCHEMA
    with pytest.raises(ValueError, match="json_schema.schema"):
        response_schema({"type": "json_schema", "json_schema": {"name": "v"}})
    with pytest.raises(ValueError, match="not one of text, json_object, json_schema"):
        response_schema({"type": "grammar"})
