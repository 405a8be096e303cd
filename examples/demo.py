"""ragloop's main job on the embedded defaults (run by ``make demo``).

1. Load the embedded policy (SmolLM2-135M-Instruct) and show decoding settings side by side.
2. Index the sample corpus in ``examples/corpus`` (FAISS + BM25, crash-safe) and search it.
3. Answer a retrieval question with the ReAct agent over that index.
4. Answer a word problem with the PAL agent (its program runs in the sandbox).

Each stage prints what it did; the traces of the agent runs are saved under ``runs/demo/``.
Everything runs offline on the CPU.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from rich.console import Console
from rich.panel import Panel
from rich.table import Table

ROOT = Path(__file__).resolve().parent
console = Console(highlight=False)


def show_decoding(policy) -> None:
    from ragloop.models.types import GenerationConfig

    prompt = [{"role": "user", "content": "Write one sentence about the ocean."}]
    settings = [
        ("greedy", GenerationConfig(greedy=True, max_new_tokens=32)),
        ("temperature 0.7", GenerationConfig(temperature=0.7, max_new_tokens=32, seed=1)),
        ("temperature 1.3", GenerationConfig(temperature=1.3, max_new_tokens=32, seed=1)),
        ("top-k 5", GenerationConfig(temperature=1.0, top_k=5, max_new_tokens=32, seed=1)),
        ("top-p 0.9", GenerationConfig(temperature=1.0, top_p=0.9, max_new_tokens=32, seed=1)),
    ]
    table = Table(title="1. One prompt, five decoding settings", show_lines=True)
    table.add_column("setting", style="bold")
    table.add_column("output")
    table.add_column("tok/s", justify="right")
    for label, cfg in settings:
        t0 = time.perf_counter()
        gen = policy.generate(prompt, cfg)[0]
        dt = time.perf_counter() - t0
        table.add_row(label, gen.text.strip(), f"{gen.num_tokens / dt:.0f}")
    console.print(table)


def index_corpus(index_path: Path):
    from ragloop.retrieval import Retriever
    from ragloop.retrieval.indexer import build_index

    summary = build_index([ROOT / "corpus"], index_path)
    console.print(Panel(
        f"indexed {summary.documents} documents as {summary.chunks} chunks into {index_path}\n"
        f"embedder {summary.embedder}; this run embedded {summary.chunks_embedded} chunks "
        f"(re-running embeds only changed files) in {summary.seconds:.1f} s",
        title="2. Index the sample corpus (FAISS + BM25, crash-safe generations)"))
    retriever = Retriever.open(index_path)
    query = "how does nucleus sampling choose tokens?"
    table = Table(title=f"hybrid search: {query!r}")
    for col in ("rank", "score", "chunk", "text"):
        table.add_column(col)
    for hit in retriever.search(query, k=3, mode="hybrid"):
        table.add_row(str(hit.rank), f"{hit.score:.4f}", hit.chunk_id, hit.text[:90].replace("\n", " ") + "…")
    console.print(table)
    return retriever


def run_agents(policy, retriever, out_dir: Path) -> None:
    from ragloop.agents.factory import AgentSpec, build_agent
    from ragloop.agents.repl import render_trace
    from ragloop.core.trace import write_traces

    jobs = [
        ("3. ReAct over the index", AgentSpec(kind="react", task="qa", max_steps=4, seed=0),
         "Does nucleus sampling ever pick a token outside the top-k when combined with top-k?", retriever),
        ("4. PAL: the model writes a program, the sandbox runs it", AgentSpec(kind="pal", task="math", seed=0),
         "A store sells pens at 3 for $2. How much do 18 pens cost?", None),
    ]
    traces = []
    for title, spec, question, ret in jobs:
        t0 = time.perf_counter()
        trace = build_agent(policy, spec, retriever=ret).run(question)
        traces.append(trace)
        console.print(Panel(render_trace(trace), title=title,
                            subtitle=f"{time.perf_counter() - t0:.1f} s, {trace.tokens_out} tokens generated"))
    count = write_traces(out_dir / "traces.jsonl", traces)
    console.print(f"saved {count} traces to {out_dir / 'traces.jsonl'} (the records alignment trains on)")


def main() -> int:
    from ragloop.models import load_policy

    sys.stdout.reconfigure(line_buffering=True)  # show each stage as it finishes, even through a pipe
    console.print(Panel("ragloop demo — everything below runs locally on the CPU", style="cyan"))
    t0 = time.perf_counter()
    policy = load_policy()
    console.print(f"loaded policy [bold]{policy.name}[/] in {time.perf_counter() - t0:.1f} s "
                  f"(context window {policy.context_window} tokens)")
    show_decoding(policy)
    out_dir = Path("runs/demo")
    out_dir.mkdir(parents=True, exist_ok=True)
    retriever = index_corpus(out_dir / "index")
    run_agents(policy, retriever, out_dir)
    console.print("next: `ragloop chat --index runs/demo/index` for the REPL, `ragloop --help` for the rest")
    return 0


if __name__ == "__main__":
    sys.exit(main())
