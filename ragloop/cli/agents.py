"""``ragloop ask | chat | eval``: run an agent once, talk to agents interactively, measure them on benchmarks.

Thin commands: parse options, build an ``AgentSpec`` / ``RunConfig``, call one library function, print.
``--policy`` takes the models area's specs (``default``, an HF directory, a .gguf file, a checkpoint; also
``$RAGLOOP_POLICY``); ``scripted:FILE.json`` (a JSON list of responses, or ``{"responses": [...],
"default": "..."}``) selects the deterministic scripted policy used by the tests.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from ragloop.core.config import load_config, ragloop_home
from ragloop.core.errors import DataError, UsageError

POLICY_HELP = "Policy model: default, an HF directory, a .gguf file or a ragloop checkpoint."
PRECISION_HELP = ("Decode weights of the fast path: auto (default: the fastest that passed the quality gate on this "
                  "CPU; `ragloop models` says which), fp32 (exact), bf16, int8 or int4 (see RESULTS.md).")
AGENT_HELP = ("Agent: rag (retrieve, answer with citations; the default with --index), react "
              "(Thought/Action/Observation; the default without), pal (program + sandbox) or cot (chain of thought).")
NO_LOG_HELP = "Do not append this exchange to the local log ($RAGLOOP_HOME/logs.db; see `ragloop logs`)."
SELECT_HELP = ("How --samples N picks its answer: majority (the most common answer; ties go to the earliest run), "
               "verifier (the run --verifier scores highest) or majority+verifier (each answer's runs weighted by "
               "the verifier's probabilities, DIVERSE weighted voting).")
EVAL_SAMPLES_HELP = ("Run every question N times (sampled at --temperature, seeds SEED..SEED+N-1; all questions x "
                     "samples decoded as one batch) and keep one run per question as --select says; every run is "
                     "saved, judged, next to --out as *.samples.jsonl (the input of `ragloop train verifier`).")
EVAL_TEMPERATURE_HELP = "Sampling temperature of the --samples runs (default 0.7; a single run is greedy)."
VERIFIER_HELP = ("Verifier for --select verifier|majority+verifier: a reward model directory (the --out of "
                 "`ragloop train verifier` or `train reward`, or its model/).")


def load_policy_spec(spec: str | None, precision: str = "auto") -> Any:
    """A policy from a CLI spec (see the module docstring); ``precision`` = the fast decode path's weights."""
    spec = spec or load_config().get("models", {}).get("policy")
    if spec and spec.startswith("scripted:"):
        from ragloop.models.scripted import ScriptedPolicy

        path = Path(spec.split(":", 1)[1])
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise UsageError(f"cannot read the scripted policy file {path}: {e}") from None
        if isinstance(data, list):
            return ScriptedPolicy([str(x) for x in data])
        if isinstance(data, dict) and isinstance(data.get("responses"), list):
            return ScriptedPolicy([str(x) for x in data["responses"]], default=data.get("default"))
        raise UsageError(f"{path}: expected a JSON list of responses or {{'responses': [...]}}")
    from ragloop.models import load_policy

    return load_policy(spec, precision=precision)


def _shared(*parts: str) -> str:
    from ragloop.agents.prompts import shared_data_dir

    return str(shared_data_dir().joinpath(*parts))


CONSTRAINED_HELP = ("Grammar-constrained decoding: ReAct actions, PAL programs and CoT answers valid by "
                    "construction (default: on for the embedded model, off for other policies).")


def resolve_constrained(flag: bool | None, policy_spec: str | None) -> bool:
    """``--constrained/--no-constrained`` as given, else on for the embedded default model only (a grammar
    needs the local tokenizer; other models keep their own format habits)."""
    if flag is not None:
        return flag
    return policy_spec in (None, "", "default")


def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=True)


# ------------------------------------------------------------------------------------------------ ask
def ask_cmd(
    question: str = typer.Argument(..., help="The question ('-' reads it from stdin)."),
    agent: str | None = typer.Option(None, "--agent", "-a", help=AGENT_HELP),
    index: str | None = typer.Option(None, "--index", "-i", help="Index (path or name) that rag / react search."),
    task: str = typer.Option("auto", "--task", help="qa, math or claims (auto: qa with --index, else math)."),
    shots: int | None = typer.Option(None, "--shots", help="Exemplars in the prompt (0 = zero-shot)."),
    self_consistency: int = typer.Option(1, "--self-consistency", help="Sample N answers and take the majority."),
    samples: int = typer.Option(1, "--samples", min=1, help="Run the whole agent N times (sampled at "
                                "--temperature, default 0.7; seeds SEED..SEED+N-1), decoded as one batch, and "
                                "answer with the majority or as --select says (every run's answer and the votes are "
                                "shown)."),
    select: str = typer.Option("majority", "--select", help=SELECT_HELP),
    verifier: str | None = typer.Option(None, "--verifier", help=VERIFIER_HELP),
    tools: str = typer.Option("", "--tools", help="Extra ReAct tools, comma-separated: calculator, python."),
    temperature: float | None = typer.Option(None, "--temperature", "-t", help="Sampling temperature (default greedy)."),
    max_new_tokens: int | None = typer.Option(None, "--max-new-tokens", help="Tokens per generation."),
    max_steps: int | None = typer.Option(None, "--max-steps", help="ReAct step budget."),
    prompt_style: str | None = typer.Option(None, "--prompt-style", help="chat or raw (no chat template)."),
    action_format: str = typer.Option("text", "--action-format", help="ReAct actions: text (Search[...]) or json."),
    constrained: bool | None = typer.Option(None, "--constrained/--no-constrained", help=CONSTRAINED_HELP),
    seed: int = typer.Option(0, "--seed", help="Random seed (recorded in the trace)."),
    as_json: bool = typer.Option(False, "--json", help="Print the whole Trace as JSON on stdout."),
    save: str | None = typer.Option(None, "--save", help="Append the Trace to this JSONL file."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No live view; print only the answer."),
    no_log: bool = typer.Option(False, "--no-log", help=NO_LOG_HELP),
    policy: str | None = typer.Option(None, "--policy", envvar="RAGLOOP_POLICY", help=POLICY_HELP),
    precision: str = typer.Option("auto", "--precision", envvar="RAGLOOP_PRECISION", help=PRECISION_HELP),
) -> None:
    """Ask one question; the agent reasons (and searches / computes) and answers, with its sources.

    Examples:
      ragloop ask "Does nucleus sampling ever pick a token outside the top-k?" --index mydocs
      ragloop ask "A store sells pens at 3 for $2. How much do 18 pens cost?" --agent pal
      ragloop ask "What is 17 * 23?" --agent react --tools calculator --no-constrained
      ragloop ask "A pen costs $2. How much do 7 pens cost?" --agent pal --samples 8
      ragloop ask "A pen costs $2. How much do 7 pens cost?" --agent pal --samples 8 --select majority+verifier --verifier ckpt/verifier
    """
    from ragloop.agents.factory import AgentSpec, build_agent
    from ragloop.agents.rag import attach_sources
    from ragloop.agents.repl import EventPrinter, answer_notes, safe_text
    from ragloop.core.trace import write_traces

    if quiet or as_json:
        from ragloop.cli.progress import quiet_libraries

        quiet_libraries()
    from ragloop.cli.text import read_stdin_text, require_file_target, require_utf8

    question = read_stdin_text("the question") if question == "-" else require_utf8(question, "the question")
    require_file_target(save, "--save")
    if not question.strip():
        raise UsageError("the question is empty", hint='e.g. ragloop ask "What is 3 * 7?" --agent pal')
    if agent is None:
        agent = "rag" if index else "react"
    if agent == "rag" and not index:
        raise UsageError("the rag agent needs an index", hint='ragloop ask "..." --index mydocs')
    if task == "auto":
        task = "qa" if (agent in ("react", "rag") and index) else "math"
    tool_names = tuple(t.strip() for t in tools.split(",") if t.strip())
    if action_format not in ("text", "json"):
        raise UsageError(f"--action-format must be text or json, got {action_format!r}")
    spec = AgentSpec(kind=agent, task=task, shots=shots, self_consistency=self_consistency,  # type: ignore[arg-type]
                     tools=tool_names, temperature=temperature, max_new_tokens=max_new_tokens,
                     max_steps=max_steps, prompt_style=prompt_style, action_format=action_format,  # type: ignore[arg-type]
                     seed=seed, constrained=resolve_constrained(constrained, policy))
    retriever = None
    if index:
        if agent not in ("react", "rag"):
            raise UsageError(f"--index is for the react agent and the rag agent (got --agent {agent})")
        from ragloop.retrieval import Retriever

        retriever = Retriever.open(index)
    verifier_obj = load_verifier(verifier, select, samples)
    pol = load_policy_spec(policy, precision)
    if samples > 1:
        trace = _ask_samples(pol, spec, question, samples, retriever=retriever, quiet=quiet or as_json,
                             select=select, verifier=verifier_obj)
    else:
        printer = None if (quiet or as_json) else EventPrinter(_console())
        trace = build_agent(pol, spec, retriever=retriever, on_event=printer).run(question)
    attach_sources(trace, retriever)
    if save:
        write_traces(save, [trace], append=True)
    if not no_log:
        from ragloop.core.logs import append_exchange

        append_exchange(trace, command="ask", index=index)
    if as_json:
        typer.echo(trace.to_json())
    elif quiet:
        typer.echo(safe_text(trace.answer if trace.answer is not None else "(no answer)"))
    else:
        if samples > 1:  # no live view of one run printed the answer: say which one was chosen
            typer.echo(safe_text(f"Answer: {trace.answer if trace.answer is not None else '(no answer)'}  "
                                 f"(run {trace.meta['selection']['index'] + 1} of {samples}, by {select})"))
        for line in answer_notes(trace):
            typer.echo(safe_text(line))


def load_verifier(path: str | None, select: str, samples: int) -> Any:
    """The ``--verifier`` of ``--select`` (None for majority), checked before any policy loads: one clear line
    for a verifier method without ``--verifier``, a verifier without such a method, ``--select`` without
    ``--samples``, or a path that is not a reward model."""
    from ragloop.eval.select import RewardModelVerifier, check_method

    check_method(select, path)
    if select != "majority" and samples < 2:
        raise UsageError(f"--select {select} chooses among sampled runs", hint="add --samples N (N >= 2, e.g. 8)")
    if path is None:
        return None
    if select == "majority":
        raise UsageError("--verifier is used only by --select verifier or --select majority+verifier",
                         hint=f"add --select majority+verifier (or drop --verifier {path})")
    from ragloop.alignment.data import trace_prompt_text, trace_response_text
    from ragloop.alignment.reward import load_reward_model

    # the texts outcome_pairs trains the verifier on: the agent's prompt and its whole response
    return RewardModelVerifier(load_reward_model(path), trace_prompt_text, trace_response_text, name=str(path))


def _ask_samples(pol: Any, spec: Any, question: str, samples: int, *, retriever: Any, quiet: bool,
                 select: str = "majority", verifier: Any = None) -> Any:
    """``samples`` whole agent runs at a temperature, as one batch (``ragloop.agents.runtime``); the answer is
    chosen by ``ragloop.eval.select`` (majority: ties go to the earliest run, and are reported). Returns a copy
    of the chosen run's trace, with every run's answer and the votes in ``meta["samples"]`` and the selection
    (method, votes, verifier scores, weights) in ``meta["selection"]``."""
    import dataclasses

    from ragloop.agents.factory import build_agent
    from ragloop.agents.repl import safe_text
    from ragloop.agents.runtime import Episode, run_episodes
    from ragloop.eval.select import select_trace

    temp = spec.temperature if spec.temperature else 0.7
    eps = [Episode(build_agent(pol, dataclasses.replace(spec, temperature=temp, seed=spec.seed + j),
                               retriever=retriever).episode(question)) for j in range(samples)]
    err = _console(stderr=True)
    done = 0

    def on_done(i: int, t: Any) -> None:
        nonlocal done
        done += 1
        if not quiet:
            err.print(f"[dim]run {i + 1} (seed {spec.seed + i}): {safe_text(t.answer or '(no answer)')}  "
                      f"[{done}/{samples}][/dim]")

    traces = run_episodes(pol, eps, on_done=on_done)
    chosen, sel = select_trace(traces, select, task=spec.task, verifier=verifier, question=question)
    chosen.meta["samples"] = {"n": samples, "temperature": temp, "answers": [t.answer for t in traces],
                              "votes": sel.votes, "tie": sel.tie if select == "majority" else None}
    if not quiet:
        vote_text = ", ".join(f"{safe_text(k)}: {v}" for k, v in sorted(sel.votes.items(), key=lambda kv: -kv[1]))
        err.print(f"votes over {samples} runs: {vote_text or '(no answers)'}"
                  + (f" — a tie between {', '.join(sel.tie)}; the first seen wins"
                     if sel.tie and select == "majority" else ""))
        if sel.scores is not None:
            err.print("verifier scores: " + ", ".join(f"run {i + 1}: {s:.3f}" for i, s in enumerate(sel.scores)))
        if sel.weights is not None:
            err.print("weighted votes: " + ", ".join(f"{safe_text(k)}: {v:.3f}" for k, v in
                                                     sorted(sel.weights.items(), key=lambda kv: -kv[1])))
        if select != "majority":
            err.print(f"{select} chose run {sel.index + 1}: {safe_text(sel.answer or '(no answer)')}")
    return chosen


# ----------------------------------------------------------------------------------------------- chat
def chat_cmd(
    agent: str | None = typer.Option(None, "--agent", "-a", help=AGENT_HELP),
    index: str | None = typer.Option(None, "--index", "-i", help="Index (path or name) that rag / react search."),
    policy: str | None = typer.Option(None, "--policy", envvar="RAGLOOP_POLICY", help=POLICY_HELP),
    precision: str = typer.Option("auto", "--precision", envvar="RAGLOOP_PRECISION", help=PRECISION_HELP),
    temperature: float = typer.Option(0.0, "--temperature", "-t", help="Sampling temperature (0 = greedy)."),
    seed: int = typer.Option(0, "--seed", help="Random seed."),
    timeout: float = typer.Option(5.0, "--timeout", help="Wall-clock limit of each sandboxed program, seconds."),
    constrained: bool | None = typer.Option(None, "--constrained/--no-constrained", help=CONSTRAINED_HELP),
    no_log: bool = typer.Option(False, "--no-log", help=NO_LOG_HELP),
) -> None:
    """Interactive agent REPL: streams tokens, shows Thought / Action / Observation live. /help inside.

    Examples:
      ragloop chat --index mydocs            # rag agent: answers with sources; /agent react to switch
      ragloop chat --agent pal --timeout 10
      ragloop chat --agent react --no-constrained   # free decoding (/set constrained on|off inside)
    """
    from ragloop.agents.repl import ChatSession, run_repl

    if agent is None:
        agent = "rag" if index else "react"
    if agent not in ("rag", "react", "pal", "cot"):
        raise UsageError(f"unknown agent {agent!r}", hint="choose rag, react, pal or cot")
    if agent == "rag" and not index:
        raise UsageError("the rag agent needs an index", hint="ragloop chat --index mydocs")
    session = ChatSession(agent=agent, settings={"temperature": temperature, "seed": seed,
                                                 "constrained": resolve_constrained(constrained, policy)})
    if not 0 < timeout <= 3600:
        raise UsageError(f"--timeout must be in (0, 3600] seconds, got {timeout}")
    if index:
        session.retriever(index)  # a bad index is reported now, not at the first question
        session.index = index
    rc = run_repl(session, lambda: load_policy_spec(policy, precision), history_file=ragloop_home() / "chat_history",
                  sandbox_seconds=timeout, log=not no_log)
    raise typer.Exit(rc)


# ----------------------------------------------------------------------------------------------- eval
eval_app = typer.Typer(help="Measure agents on benchmarks (accuracy with a 95% CI, format validity, traces).",
                       no_args_is_help=True)


def _print_report(report: Any, as_json: bool) -> None:
    d = report.to_dict()
    lo, hi = d["ci95"]
    typer.echo(f"{d['task']} · agent={d['agent']} · model={d['model']} · slice={d['slice']} · seed={d['seed']}")
    typer.echo(f"accuracy {d['accuracy']:.3f} ({d['correct']}/{d['n']}), 95% CI [{lo:.3f}, {hi:.3f}]")
    ts = "n/a" if d["tool_success"] is None else f"{d['tool_success']:.3f} of {d['tool_calls']} calls"
    typer.echo(f"format-valid {d['format_valid']:.3f} (strict {d['format_valid_strict']:.3f}) · tool-success {ts} · "
               f"fallback {d['fallback_rate']:.3f} · {d['seconds_per_question']:.1f} s/question")
    if d.get("by_gold"):
        parts = [f"{g}: {v['correct']}/{v['n']}" for g, v in sorted(d["by_gold"].items())]
        typer.echo("by gold label: " + ", ".join(parts) + " · predicted: " + json.dumps(d["predictions"]))
    g = d.get("groundedness")
    if g and g.get("measured"):
        typer.echo(f"groundedness {g['grounded']:.3f} of {g['measured']} answers (K-Precision >= {g['threshold']} "
                   f"against the passages cited or retrieved; mean {g['k_precision']:.3f}; citing {g['cited']:.3f})")
    elif g is not None:
        typer.echo("groundedness: no answer could be measured (no retrieval, or only fallback answers)")
    sel = d.get("selection")
    if sel:
        typer.echo(f"selection {sel['method']} of {sel['samples']} samples (temperature {sel.get('temperature')}): "
                   f"one sample {sel['sample_accuracy']:.3f} · pass@{sel['samples']} {sel['pass_at_n']:.3f}"
                   + (f" · verifier {sel['verifier']}" if sel.get("verifier") else ""))
        if len(sel.get("by_method", {})) > 1:
            typer.echo("same samples, every method: " + ", ".join(
                f"{m} {v['accuracy']:.3f} ({v['correct']}/{v['n']})" for m, v in sel["by_method"].items()))
        if sel.get("samples_file"):
            typer.echo(f"every sample: {sel['samples_file']}")
    if d.get("traces"):
        typer.echo(f"traces: {d['traces']}")
    if as_json:
        typer.echo(json.dumps(d))


def _progress(quiet: bool):
    if quiet:
        return None

    def show(i: int, n: int, trace: Any) -> None:
        mark = "✓" if trace.feedback.correct else "✗"
        typer.echo(f"[{i}/{n}] {mark} answer={trace.answer!r} gold={trace.feedback.gold!r} ({trace.seconds:.1f}s)",
                   err=True)

    return show


def _default_out(task: str, agent: str, seed: int) -> str:
    return str(ragloop_home() / "traces" / f"eval-{task}-{agent}-seed{seed}.jsonl")


@eval_app.command("gsm8k")
def eval_gsm8k_cmd(
    agent: str = typer.Option("pal", "--agent", "-a", help="pal, cot or react (with a calculator)."),
    data: str | None = typer.Option(None, "--data", help="GSM8K JSONL (default: shared test_dev300.jsonl)."),
    limit: int | None = typer.Option(None, "--limit", help="Use this many rows (from --offset)."),
    offset: int = typer.Option(0, "--offset", help="Skip this many rows first."),
    policy: str | None = typer.Option(None, "--policy", envvar="RAGLOOP_POLICY", help=POLICY_HELP),
    precision: str = typer.Option("auto", "--precision", envvar="RAGLOOP_PRECISION", help=PRECISION_HELP),
    seed: int = typer.Option(0, "--seed", help="Seed (decoding is greedy; recorded in every trace)."),
    out: str | None = typer.Option(None, "--out", help="Traces JSONL (default under ~/.ragloop/traces)."),
    shots: int | None = typer.Option(None, "--shots", help="Exemplars (default: 8 for PAL/CoT, 4 for ReAct)."),
    self_consistency: int = typer.Option(1, "--self-consistency", help="Samples per question (majority vote)."),
    max_new_tokens: int | None = typer.Option(None, "--max-new-tokens", help="Tokens per generation."),
    max_steps: int | None = typer.Option(None, "--max-steps", help="ReAct step budget."),
    prompt_style: str | None = typer.Option(None, "--prompt-style", help="raw or chat."),
    fallback: str = typer.Option("cot-sc", "--fallback", help="ReAct fallback: cot-sc or none."),
    constrained: bool | None = typer.Option(None, "--constrained/--no-constrained", help=CONSTRAINED_HELP),
    as_json: bool = typer.Option(False, "--json", help="Last line: one JSON object of the figures."),
    batch_size: int | None = typer.Option(None, "--batch-size", min=1, envvar="RAGLOOP_BATCH_SIZE",
                                          help="Questions run together, their model calls decoded as one batch "
                                               "(default 32, ReAct 1: measured slower batched, see benchmarks/RESULTS.md; 1 = one at a time)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No per-question progress on stderr."),
    samples: int = typer.Option(1, "--samples", min=1, help=EVAL_SAMPLES_HELP),
    select: str = typer.Option("majority", "--select", help=SELECT_HELP),
    verifier: str | None = typer.Option(None, "--verifier", help=VERIFIER_HELP),
    temperature: float | None = typer.Option(None, "--temperature", "-t", help=EVAL_TEMPERATURE_HELP),
) -> None:
    """GSM8K accuracy of PAL, CoT or ReAct (greedy, fixed seed; or the best of --samples runs); writes the traces.

    Examples:
      ragloop eval gsm8k --agent pal --limit 100
      ragloop eval gsm8k --agent cot --self-consistency 5 --limit 20 --json
      ragloop eval gsm8k --agent react --limit 20 --no-constrained   # free decoding, as RL explores
      ragloop eval gsm8k --agent pal --limit 50 --samples 8 --select majority+verifier --verifier ckpt/verifier
    """
    if quiet:
        from ragloop.cli.progress import quiet_libraries

        quiet_libraries()
    from ragloop.cli.text import require_file_target
    from ragloop.eval.runners import RunConfig, run_benchmark

    require_file_target(out, "--out")
    cfg = RunConfig(task="gsm8k", agent=agent, data=data or _shared("gsm8k", "test_dev300.jsonl"),  # type: ignore[arg-type]
                    limit=limit, offset=offset, seed=seed, out=out or _default_out("gsm8k", agent, seed), shots=shots,
                    self_consistency=self_consistency, max_new_tokens=max_new_tokens, max_steps=max_steps,
                    prompt_style=prompt_style, fallback=fallback, batch_size=batch_size,  # type: ignore[arg-type]
                    constrained=resolve_constrained(constrained, policy), samples=samples, select=select,
                    temperature=temperature)
    _check_agent(agent)
    verifier_obj = load_verifier(verifier, select, samples)
    report = run_benchmark(cfg, load_policy_spec(policy, precision), progress=_progress(quiet), verifier=verifier_obj)
    _print_report(report, as_json)


@eval_app.command("claims")
def eval_claims_cmd(
    agent: str = typer.Option("react", "--agent", "-a", help="react (search + lookup), rag (retrieve once, "
                              "verdict + cited evidence) or cot (no retrieval)."),
    index: str = typer.Option("scifact", "--index", "-i", help="Index of the SciFact corpus (path or name)."),
    corpus: str | None = typer.Option(None, "--corpus", help="Build the index from this BEIR corpus.jsonl if missing."),
    data: str | None = typer.Option(None, "--data", help="Claims CSV (default: shared claims_train.csv)."),
    limit: int | None = typer.Option(None, "--limit", help="Use this many claims (from --offset)."),
    offset: int = typer.Option(0, "--offset", help="Skip this many claims first."),
    policy: str | None = typer.Option(None, "--policy", envvar="RAGLOOP_POLICY", help=POLICY_HELP),
    precision: str = typer.Option("auto", "--precision", envvar="RAGLOOP_PRECISION", help=PRECISION_HELP),
    seed: int = typer.Option(0, "--seed", help="Seed (decoding is greedy; recorded in every trace)."),
    out: str | None = typer.Option(None, "--out", help="Traces JSONL (default under ~/.ragloop/traces)."),
    shots: int | None = typer.Option(None, "--shots", help="Exemplars (default 3, the paper's FEVER prompt)."),
    max_new_tokens: int | None = typer.Option(None, "--max-new-tokens", help="Tokens per generation."),
    max_steps: int | None = typer.Option(None, "--max-steps", help="ReAct step budget."),
    prompt_style: str | None = typer.Option(None, "--prompt-style", help="chat or raw."),
    fallback: str = typer.Option("cot-sc", "--fallback", help="ReAct fallback: cot-sc or none."),
    constrained: bool | None = typer.Option(None, "--constrained/--no-constrained", help=CONSTRAINED_HELP),
    as_json: bool = typer.Option(False, "--json", help="Last line: one JSON object of the figures."),
    batch_size: int | None = typer.Option(None, "--batch-size", min=1, envvar="RAGLOOP_BATCH_SIZE",
                                          help="Questions run together, their model calls decoded as one batch "
                                               "(default 32, ReAct 1: measured slower batched, see benchmarks/RESULTS.md; 1 = one at a time)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No per-claim progress on stderr."),
    samples: int = typer.Option(1, "--samples", min=1, help=EVAL_SAMPLES_HELP),
    select: str = typer.Option("majority", "--select", help=SELECT_HELP),
    verifier: str | None = typer.Option(None, "--verifier", help=VERIFIER_HELP),
    temperature: float | None = typer.Option(None, "--temperature", "-t", help=EVAL_TEMPERATURE_HELP),
) -> None:
    """SciFact claim verification (SUPPORTS / REFUTES / NOT ENOUGH INFO) over a local index; with rag or react
    it also reports groundedness (answers whose content is in the passages they cite or retrieved).

    Examples:
      ragloop eval claims --agent rag --limit 50
      ragloop eval claims --agent react --index scifact --corpus ../shared/data/scifact/corpus.jsonl --limit 20
      ragloop eval claims --agent rag --limit 20 --samples 5 --select majority
    """
    from ragloop.eval.runners import RunConfig, ensure_scifact_index, run_benchmark

    if agent not in ("react", "rag", "cot"):
        raise UsageError(f"claims are verified by rag, react or cot, not {agent!r}")
    if quiet:
        from ragloop.cli.progress import quiet_libraries

        quiet_libraries()
    if corpus is not None and not Path(corpus).is_file():
        raise DataError(f"corpus file not found: {corpus}", hint="e.g. --corpus ../shared/data/scifact/corpus.jsonl")
    from ragloop.cli.text import require_file_target

    require_file_target(out, "--out")
    verifier_obj = load_verifier(verifier, select, samples)
    retriever = None
    if agent in ("react", "rag"):
        retriever = ensure_scifact_index(index, corpus, progress=lambda m: typer.echo(m, err=True))
    cfg = RunConfig(task="claims", agent=agent, data=data or _shared("scifact", "claims_train.csv"),  # type: ignore[arg-type]
                    limit=limit, offset=offset, seed=seed, out=out or _default_out("claims", agent, seed), shots=shots,
                    max_new_tokens=max_new_tokens, max_steps=max_steps, prompt_style=prompt_style,
                    fallback=fallback, batch_size=batch_size, extra_settings={"index": index},  # type: ignore[arg-type]
                    constrained=resolve_constrained(constrained, policy), samples=samples, select=select,
                    temperature=temperature)
    report = run_benchmark(cfg, load_policy_spec(policy, precision), retriever=retriever, progress=_progress(quiet),
                           verifier=verifier_obj)
    _print_report(report, as_json)


def _check_agent(agent: str) -> None:
    if agent not in ("react", "pal", "cot"):
        raise UsageError(f"unknown agent {agent!r}", hint="choose pal, cot or react")


def register(app: typer.Typer) -> None:
    app.command("ask")(ask_cmd)
    app.command("chat")(chat_cmd)
    app.add_typer(eval_app, name="eval")
