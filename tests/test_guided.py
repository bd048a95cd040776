"""Structured output (runtime/guided.py): every answer follows its grammar, random weights included."""
from __future__ import annotations

import json
import re

import pytest
from conftest import make_image

from builder.format.errors import InputError
from builder.runtime.guided import Guide
from builder.runtime.sampling import SamplingParams

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["colour", "count", "shapes"],
          "properties": {"colour": {"enum": ["red", "green", "blue"]},
                         "count": {"type": "integer", "minimum": 0, "maximum": 99},
                         "shapes": {"type": "array", "maxItems": 3, "items": {"enum": ["circle", "square"]}}}}
PROMPTS = ["USER: <image>\nDescribe the picture as JSON. ASSISTANT:", "USER: <image>\nWhat is red? ASSISTANT:"]


def valid(answer: dict) -> bool:
    return (set(answer) == {"colour", "count", "shapes"} and answer["colour"] in ("red", "green", "blue")
            and isinstance(answer["count"], int) and 0 <= answer["count"] <= 99
            and len(answer["shapes"]) <= 3 and set(answer["shapes"]) <= {"circle", "square"})


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_every_json_schema_answer_parses_and_validates(engine, images, temperature):
    guide = Guide("json_schema", json.dumps(SCHEMA))
    params = [SamplingParams(80, temperature=temperature, seed=i, guide=guide) for i in range(4)]
    results = engine.generate([PROMPTS[i % 2] for i in range(4)], images[:4], params=params)
    for r in results:
        assert r.finish_reason == "stop" and valid(json.loads(r.text)), r.text


@pytest.mark.parametrize("guide, check", [
    (Guide("regex", r"(yes|no), [0-9]{2}"), lambda t: re.fullmatch(r"(yes|no), [0-9]{2}", t)),
    (Guide("ebnf_grammar", 'root ::= ("cat" | "dog") " is " ("red" | "blue")'),
     lambda t: re.fullmatch(r"(cat|dog) is (red|blue)", t)),
    (Guide("lark", 'start: ("up" | "down") "-" ("left" | "right")'), lambda t: re.fullmatch(r"(up|down)-(left|right)", t)),
    (Guide("json"), lambda t: isinstance(json.loads(t), dict)),
])
def test_regex_and_grammar_answers_follow_them(engine, guide, check):
    [r] = engine.generate(["USER: answer ASSISTANT:"], params=[SamplingParams(60, guide=guide)])
    assert r.finish_reason == "stop" and check(r.text), r.text


def test_a_guided_request_leaves_its_batch_neighbours_unchanged(engine):
    plain = SamplingParams(8, end_id=-1)
    [alone] = engine.generate(["USER: count to ten ASSISTANT:"], params=[plain])
    both = engine.generate(["USER: count to ten ASSISTANT:", "USER: pick ASSISTANT:"],
                           params=[plain, SamplingParams(20, guide=Guide("regex", "[ab]{3}"))])
    assert both[0].token_ids == alone.token_ids and re.fullmatch("[ab]{3}", both[1].text)


@pytest.mark.parametrize("guide, message", [
    (Guide("json_schema", "{not json"), "the json_schema guide does not compile"),
    (Guide("json_schema", json.dumps({"type": "bogus"})), "Invalid type: bogus"),
    (Guide("regex", "(unclosed"), "the regex guide does not compile"),
    (Guide("yaml", "x"), "guided decoding type must be one of json, json_schema, regex, lark, ebnf_grammar"),
])
def test_a_guide_that_cannot_compile_is_refused_before_any_work(engine, guide, message):
    with pytest.raises(InputError, match=re.escape(message)) as e:
        engine.prepare("USER: hi ASSISTANT:", make_image(40, 60), SamplingParams(8, guide=guide))
    assert "\n" not in str(e.value)
