"""Grammar-constrained decoding (ragloop.models.grammar): matchers on literal strings, masks, and decoding
with every agent grammar on the tiny random model (the worst case for validity) through the real decoder."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import BaseModel

from ragloop.agents.cot import parse_answer
from ragloop.agents.pal import extract_program
from ragloop.agents.parsing import parse_json_step, parse_react_text
from ragloop.agents.tools import Tool, calculator_tool, finish_tool, tool_from_function
from ragloop.core.errors import UsageError
from ragloop.models import grammar as G
from ragloop.models.types import GenerationConfig, GrammarSpec

LABELS = ["SUPPORTS", "REFUTES", "NOT ENOUGH INFO"]


def convert_currency(amount: float, currency: str) -> str:
    """Convert an amount of US dollars into another currency."""
    return f"{amount} {currency}"


@pytest.fixture(scope="module")
def tools():
    return [calculator_tool(), tool_from_function(convert_currency), finish_tool()]


def accepts(spec: GrammarSpec, tok, text: str) -> bool:
    """Whether ``text`` (tokenised) is a complete sentence of ``spec``."""
    m = G.matcher_for(spec, tok)
    for t in tok(text, add_special_tokens=False).input_ids:
        bits = G.allocate_bitmask(1, len(tok))
        m.fill_mask(bits[0])
        if not (int(bits[0, t // 32]) >> (t % 32)) & 1:
            return False
        m.accept(t)
    return m.is_accepting()


def test_apply_bitmask_known_answer():
    logits = torch.zeros(2, 40)
    mask = G.allocate_bitmask(2, 40)
    mask[0, 0] = 0b101  # row 0: tokens 0 and 2 of the first word; all of the second word
    out = G.apply_bitmask(logits, mask)
    assert out[0, :3].tolist() == [0.0, float("-inf"), 0.0]
    assert torch.isinf(out[0, 3:32]).all() and torch.isfinite(out[0, 32:]).all() and torch.isfinite(out[1]).all()


def test_react_paper_grammar_accepts_valid_rejects_invalid(smol_tokenizer, tools):
    spec = G.react_paper_grammar(tools, step=2)
    ok = [" I need 3 * 4.\nAction 2: Calculator[3 * 4]", " Done.\nAction 2: Finish[12]",
          ' Convert it.\nAction 2: convert_currency[{"amount": 5, "currency": "EUR"}]']
    bad = [" x\nAction 1: Calculator[3]",  # wrong step number
           " x\nAction 2: Search[paris]",  # unregistered tool
           " Action 2: Finish[1]\nAction 2: Finish[2]",  # a thought that is itself an action line
           ' x\nAction 2: Finish["quoted"]',  # a repair the parser would record
           ' x\nAction 2: convert_currency[{"amount": 5}]']  # a required argument missing
    assert all(accepts(spec, smol_tokenizer, t) for t in ok)
    assert not any(accepts(spec, smol_tokenizer, t) for t in bad)


def test_pal_cot_label_grammars_on_literals(smol_tokenizer):
    pal = G.pal_grammar()
    assert accepts(pal, smol_tokenizer, "\n    pens = 18 / 3  # groups\n    cost = pens * 2\n    return cost\n")
    assert not accepts(pal, smol_tokenizer, "\n    cost = 18 / 3\n")  # no return
    assert not accepts(pal, smol_tokenizer, "\n    import os\n    return 1\n")
    cot = G.cot_grammar()
    assert accepts(cot, smol_tokenizer, " 3 + 2 = 5.\nThe answer is 5.")
    assert not accepts(cot, smol_tokenizer, " The answer is 4.\nThe answer is 5.")  # answer only on the last line
    lab = G.label_grammar(LABELS)
    assert accepts(lab, smol_tokenizer, " NOT ENOUGH INFO") and not accepts(lab, smol_tokenizer, " MAYBE")


def test_bad_grammar_is_a_usage_error(smol_tokenizer):
    with pytest.raises(UsageError, match="does not compile"):
        G.matcher_for(GrammarSpec("lark", "start: (", name="broken"), smol_tokenizer)


def _strict(kind: str, text: str, names: list[str]) -> bool:
    if kind == "react":
        p = parse_react_text(text, step=2, tools=names)
        return p.ok and not p.repairs
    if kind == "json":
        p = parse_json_step(text, tools=names)
        return p.ok and not p.repairs
    if kind == "pal":
        prog, rep = extract_program('def solution():\n    """q"""' + text)
        if prog is None or rep:
            return False
        compile(prog, "<pal>", "exec")
        return True
    if kind == "cot":
        ans, rep = parse_answer(text)
        return ans is not None and not rep
    return text.strip() in LABELS


@pytest.mark.parametrize("kind", ["react", "json", "pal", "cot", "label"])
def test_tiny_model_output_is_always_strictly_valid(kind, tiny_policy, tools):
    specs = {"react": G.react_paper_grammar(tools, step=2), "json": G.react_json_grammar(tools, step=2),
             "pal": G.pal_grammar(max_statements=3), "cot": G.cot_grammar(), "label": G.label_grammar(LABELS)}
    cfg = GenerationConfig(max_new_tokens=600, temperature=1.0, n=6, seed=3, grammar=specs[kind], logprobs=True)
    gens = tiny_policy.generate("Question: what?\nThought 2:", cfg)
    names = [t.name for t in tools]
    for g in gens:
        assert g.finish_reason in ("stop", "eos"), (kind, g.finish_reason, g.text[-80:])
        assert _strict(kind, g.text, names), (kind, g.text)
        # scaled log-probs are under the masked distribution: never below the raw model's
        assert all(s >= r - 1e-4 for s, r in zip(g.scaled_logprobs, g.logprobs, strict=True))


def test_rows_with_different_grammars_share_a_batch(tiny_policy):
    a, b = G.label_grammar(["yes", "no"]), G.cot_grammar()
    ta = tiny_policy.submit(["Q1:"], GenerationConfig(max_new_tokens=300, greedy=True, grammar=a))
    tb = tiny_policy.submit(["Q2:"], GenerationConfig(max_new_tokens=300, greedy=True, grammar=b))
    tc = tiny_policy.submit(["Q3:"], GenerationConfig(max_new_tokens=5, greedy=True))
    ga, gb, gc = ta.results()[0][0], tb.results()[0][0], tc.results()[0][0]
    assert ga.text.strip() in ("yes", "no") and parse_answer(gb.text)[1] == [] and gc.num_tokens <= 5


def test_json_schema_tool_call_for_a_two_argument_tool(tiny_policy):
    class Args(BaseModel):
        amount: float
        currency: str

    tool = Tool("convert_currency", "converts money", Args, lambda amount, currency: f"{amount} {currency}")
    spec = G.react_json_grammar([tool], step=1)
    gens = tiny_policy.generate("x", GenerationConfig(max_new_tokens=200, temperature=1.0, n=4, seed=0, grammar=spec))
    for g in gens:
        call = json.loads(g.text[g.text.index("{"):])
        assert call["tool"] == "convert_currency" and set(call["arguments"]) == {"amount", "currency"}
        Args.model_validate(call["arguments"])


def test_decode_run_hook_matches(tiny_policy):
    """The reference DecodeRun loop (not the engine) constrains, stops and records the same way."""
    from ragloop.models.decoding import DecodeRun, HFStepper

    spec = G.label_grammar(LABELS)
    run = DecodeRun(HFStepper(tiny_policy.model), [tiny_policy.encode("Claim: x\nAnswer:")],
                    GenerationConfig(max_new_tokens=20, greedy=True, grammar=spec), tokenizer=tiny_policy.tokenizer,
                    end_ids=tiny_policy.end_ids, pad_id=tiny_policy.pad_id)
    g = run.results()[0][0]
    assert g.text.strip() in LABELS and g.finish_reason == "stop"


def test_a_row_with_nothing_allowed_may_only_end():
    """A broken matcher (error state) must not leave an all -inf row to sample from: only end tokens remain."""

    class Broken:
        def unsafe_compute_mask_ptr(self, ptr, size):
            pass

        def is_error(self):
            return True

    m = G.GrammarMatcher(Broken(), GrammarSpec("regex", "x"), [2, 31, 63])
    row = G.allocate_bitmask(1, 64)[0]
    m.fill_mask(row)
    allowed = torch.isfinite(G.apply_bitmask(torch.zeros(1, 64), row.unsqueeze(0)))[0]
    assert allowed.nonzero().flatten().tolist() == [2, 31, 63]


def test_compiled_grammars_are_bounded(smol_tokenizer):
    comp = G.compiler_for(smol_tokenizer)
    old, comp.max_grammars = comp.max_grammars, 3
    try:
        for i in range(6):
            comp.matcher(G.label_grammar([f"L{i}"]))
        assert len(comp._protos) == 3
    finally:
        comp.max_grammars = old
