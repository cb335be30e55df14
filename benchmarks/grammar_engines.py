"""llguidance (the engine used) against xgrammar on SmolLM2's tokenizer: which JSON Schema features each enforces (a
valid answer accepted and an invalid one rejected, or the schema refused) and the mask time per token.

xgrammar is not a dependency (on Linux it pulls triton and apache-tvm-ffi); to run this:

    .venv/bin/pip install --target /tmp/xgt --no-deps xgrammar apache-tvm-ffi
    PYTHONPATH=/tmp/xgt .venv/bin/python -m benchmarks.grammar_engines --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

from benchmarks.common import emit, machine, versions


def _object(**properties: Any) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}


# feature → (schema, a valid answer, an invalid one)
CASES: dict[str, tuple[dict[str, Any], str, str]] = {
    "nested object, pattern": (
        _object(name={"type": "string", "maxLength": 20},
                address=_object(zip={"type": "string", "pattern": "^[0-9]{5}$"})),
        '{"name": "Bob", "address": {"zip": "75001"}}', '{"name": "Bob", "address": {"zip": "7500A"}}'),
    "array of enums, maxItems": (
        _object(c={"type": "array", "items": {"enum": ["red", "blue"]}, "minItems": 1, "maxItems": 2}),
        '{"c": ["red", "blue"]}', '{"c": ["red", "blue", "red"]}'),
    "integer bounds": (_object(age={"type": "integer", "minimum": 18, "maximum": 99}), '{"age": 42}', '{"age": 120}'),
    "number multipleOf": (_object(s={"type": "number", "minimum": 0, "maximum": 1, "multipleOf": 0.01}),
                          '{"s": 0.25}', '{"s": 0.255}'),
    "string format date": (_object(when={"type": "string", "format": "date"}), '{"when": "2026-12-01"}',
                           '{"when": "yesterday"}'),
    "anyOf": (_object(v={"anyOf": [{"type": "integer"}, {"type": "string", "enum": ["none"]}]}), '{"v": "none"}',
              '{"v": "some"}'),
    "minLength": (_object(n={"type": "string", "minLength": 3}), '{"n": "abc"}', '{"n": "ab"}'),
}
STORY = _object(title={"type": "string", "maxLength": 40}, story={"type": "string", "minLength": 400,
                                                                  "maxLength": 2000})


def timed(step: Callable[[], Any]) -> float:
    started = time.perf_counter()
    step()
    return time.perf_counter() - started


def run() -> dict[str, Any]:
    import xgrammar as xgr
    from transformers import AutoTokenizer

    from swarm.client.grammar import GrammarError, Grammars
    from swarm.client.requests import Grammar
    from swarm.model.source import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model().path)
    ids_of = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    ours = Grammars(tokenizer, len(tokenizer), tokenizer.eos_token_id)
    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=len(tokenizer)))

    def ours_accepts(schema: dict[str, Any], text: str) -> bool:
        matcher = ours.matcher(Grammar("json_schema", json.dumps(schema)))
        return all(matcher.consume_token(t) for t in ids_of(text)) and matcher.is_accepting()

    def theirs_accepts(compiled: Any, text: str) -> bool:
        matcher = xgr.GrammarMatcher(compiled)
        return all(matcher.accept_token(t) for t in ids_of(text)) and matcher.accept_token(tokenizer.eos_token_id)

    def xgr_compile(schema: dict[str, Any]) -> Any:
        return compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=(", ", ": "))

    features: dict[str, dict[str, str]] = {}
    for name, (schema, good, bad) in CASES.items():
        row = features[name] = {}
        try:
            ours.check(Grammar("json_schema", json.dumps(schema)))
            row["llguidance"] = "enforced" if ours_accepts(schema, good) and not ours_accepts(schema, bad) \
                else "NOT enforced"
        except GrammarError as e:
            row["llguidance"] = f"refused: {e}"[:100]
        try:
            compiled = xgr_compile(schema)
            row["xgrammar"] = "enforced" if theirs_accepts(compiled, good) and not theirs_accepts(compiled, bad) \
                else "NOT enforced (accepted the invalid answer)"
        except Exception as e:
            row["xgrammar"] = f"refused: {e}"[:100]

    answer = ids_of(json.dumps({"title": "The keeper", "story": "The lighthouse keeper counted the ships. " * 20}))
    matcher = ours.matcher(Grammar("json_schema", json.dumps(STORY)))
    ours_times = []
    for token in answer[:64]:
        ours_times.append(timed(matcher.compute_bitmask))
        matcher.consume_token(token)
    theirs = xgr.GrammarMatcher(xgr_compile(STORY))
    bitmask = xgr.allocate_token_bitmask(1, len(tokenizer))
    theirs_times = []
    for token in answer[:64]:
        theirs_times.append(timed(lambda: theirs.fill_next_token_bitmask(bitmask)))
        theirs.accept_token(token)

    def ms(times: list[float]) -> dict[str, float]:
        return {"median": round(1000 * statistics.median(times), 3), "max": round(1000 * max(times), 3)}

    return {"benchmark": "grammar_engines", "machine": machine(), "versions": versions(),
            "features": features, "mask_ms_per_token": {"llguidance": ms(ours_times), "xgrammar": ms(theirs_times)},
            "compile_ms": {
                "llguidance": round(1000 * timed(lambda: ours.check(Grammar("json_schema", json.dumps(
                    {**STORY, "title": "fresh"})))), 1),
                "xgrammar": round(1000 * timed(lambda: xgr_compile({**STORY, "title": "fresh"})), 1)}}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.grammar_engines",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="also write OUT/grammar_engines.json")
    emit("grammar_engines", run(), parser.parse_args().out)


if __name__ == "__main__":
    main()
