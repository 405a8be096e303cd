"""``ragloop generate | tokens | models | plan``: the model commands (thin: parse, call one function, print).

Every command that loads a model takes ``--policy SPEC`` (``default``, an HF directory, a .gguf file or a
ragloop checkpoint; also ``$RAGLOOP_POLICY`` or ``[models] policy`` in ``config.toml``). Decoding defaults
may come from ``[generate]`` in ``config.toml``; options given on the command line win. Model output is
printed with control characters escaped, so generated text cannot drive the terminal.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import typer

from ragloop.core.config import load_config
from ragloop.core.errors import RagloopError, UsageError

POLICY_HELP = "Model: 'default' (embedded SmolLM2), an HF directory, a .gguf file, or a ragloop checkpoint."

# C0/C1 control characters except tab and newline (ESC sequences included)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def safe_text(text: str) -> str:
    """Escape control characters so model output cannot move the cursor or recolour the terminal:
    ``safe_text("a\\x1b[2Jb") -> "a\\\\x1b[2Jb"``."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _console():
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True)


def _policy_spec(policy: str | None) -> str | None:
    if policy:
        return policy
    return load_config().get("models", {}).get("policy")


def _pick(cli_value: Any, section: dict[str, Any], key: str, default: Any) -> Any:
    return cli_value if cli_value is not None else section.get(key, default)


# GenerationConfig's field names → this command's option names, for error messages
_FLAGS = {"max_new_tokens": "--max-tokens", "top_p": "--top-p", "top_k": "--top-k", "temperature": "--temperature",
          "repetition_penalty": "--repetition-penalty", "n must": "--n must", "stop sequences": "--stop values"}


@contextmanager
def _option_names() -> Iterator[None]:
    try:
        yield
    except UsageError as e:
        for field, flag in _FLAGS.items():
            e.message = e.message.replace(field, flag)
        e.args = (e.message,)
        raise


def _config(cls: Any, defaults: dict[str, Any], max_tokens: Any, temperature: Any, top_k: Any, top_p: Any,
            greedy: bool, stop: Any, n: int, seed: Any, repetition_penalty: Any, logprobs: bool) -> Any:
    return cls(
        max_new_tokens=_pick(max_tokens, defaults, "max_tokens", 256),
        temperature=_pick(temperature, defaults, "temperature", 1.0),
        top_k=_pick(top_k, defaults, "top_k", 0),
        top_p=_pick(top_p, defaults, "top_p", 1.0),
        greedy=greedy,
        stop=list(stop or defaults.get("stop", [])),
        n=n,
        seed=seed,
        repetition_penalty=_pick(repetition_penalty, defaults, "repetition_penalty", 1.0),
        logprobs=logprobs,
    )


def generate_cmd(
    prompt: str = typer.Argument(..., help="The prompt ('-' reads it from stdin)."),
    policy: str | None = typer.Option(None, "--policy", envvar="RAGLOOP_POLICY", help=POLICY_HELP),
    temperature: float | None = typer.Option(None, "--temperature", "-t", help="Sampling temperature (> 0; 0 = greedy)."),
    top_p: float | None = typer.Option(None, "--top-p", help="Nucleus sampling mass in (0, 1]."),
    top_k: int | None = typer.Option(None, "--top-k", help="Sample among the k most likely tokens (0 = all)."),
    greedy: bool = typer.Option(False, "--greedy", help="Pick the most likely token at every step."),
    n: int = typer.Option(1, "--n", help="Candidates to sample (as one batch)."),
    max_tokens: int | None = typer.Option(None, "--max-tokens", help="Most tokens to generate."),
    seed: int | None = typer.Option(None, "--seed", help="Random seed (same seed → same text)."),
    stop: list[str] | None = typer.Option(None, "--stop", help="Stop before this string (repeatable)."),
    repetition_penalty: float | None = typer.Option(None, "--repetition-penalty", help="CTRL penalty (1 = off)."),
    stream: bool = typer.Option(False, "--stream", help="Print tokens as they are generated."),
    show_logprobs: bool = typer.Option(False, "--show-logprobs", help="Show each token's log-probability."),
    system: str | None = typer.Option(None, "--system", help="A system message before the prompt."),
    raw: bool = typer.Option(False, "--raw", help="Continue the text as is (no chat template)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    backend: str = typer.Option("auto", "--backend", help="Decode path: auto, hf or fast."),
    dtype: str = typer.Option("float32", "--dtype", help="Weights dtype: float32, bfloat16, float16."),
    precision: str = typer.Option("fp32", "--precision", envvar="RAGLOOP_PRECISION",
                                  help="Fast decode path weights: fp32 (exact, the default here), bf16, int8, int4 "
                                       "(faster), or auto (the fastest that passed the quality gate on this CPU; "
                                       "`ragloop models` says which)."),
) -> None:
    """Generate text with the local policy model.

    Examples:
      ragloop generate "Explain top-p sampling in one sentence." --temperature 0.7 --top-p 0.9 --stream
      ragloop generate "2+2=" --greedy --max-tokens 8 --show-logprobs
    """
    from ragloop.cli.text import read_stdin_text, require_utf8
    from ragloop.models.types import GenerationConfig

    prompt = read_stdin_text("the prompt") if prompt == "-" else require_utf8(prompt, "the prompt")
    if system is not None:
        require_utf8(system, "--system")
    for s in stop or []:
        require_utf8(s, "--stop")
    if not prompt.strip():
        raise UsageError("the prompt is empty", hint='give some text, e.g. ragloop generate "Hello"')
    if raw and system:
        raise UsageError("--system needs the chat template; drop --raw or --system")
    if stream and as_json:
        raise UsageError("--stream and --json do not combine; choose one")
    if stream and n != 1:
        raise UsageError(f"--stream shows one candidate; got --n {n}", hint="use --n 1 with --stream")
    defaults = load_config().get("generate", {})
    with _option_names():
        cfg = _config(GenerationConfig, defaults, max_tokens, temperature, top_k, top_p, greedy, stop, n, seed,
                      repetition_penalty, show_logprobs or as_json)
    from ragloop.models.loading import load_policy

    pol = load_policy(_policy_spec(policy), dtype=dtype, backend=backend, precision=precision)
    messages: Any
    if raw:
        messages = prompt
    else:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    console = _console()
    if stream:
        run = pol.decode_run([messages], cfg)
        for _, piece in run:
            sys.stdout.write(safe_text(piece))
            sys.stdout.flush()
        sys.stdout.write("\n")
        gens = run.results()[0]
    else:
        gens = pol.generate(messages, cfg)
    if as_json:
        out = {
            "policy": pol.name,
            "precision": getattr(pol, "precision", None),  # resolved: --precision auto shows what it became
            "prompt_tokens": gens[0].prompt_tokens,
            "config": cfg.to_dict(),
            "candidates": [
                {"text": g.text, "finish_reason": g.finish_reason, "num_tokens": g.num_tokens,
                 "token_ids": g.token_ids, "logprobs": g.logprobs}
                for g in gens
            ],
        }
        typer.echo(json.dumps(out, ensure_ascii=False))
        return
    if not stream:
        for i, g in enumerate(gens):
            if len(gens) > 1:
                console.rule(f"[{i + 1}/{len(gens)}] {g.finish_reason}, {g.num_tokens} tokens", style="dim")
            console.print(safe_text(g.text), markup=False)
    if show_logprobs:
        _print_logprobs(console, pol, gens)


def _print_logprobs(console: Any, pol: Any, gens: list[Any]) -> None:
    import math

    from rich.table import Table

    for i, g in enumerate(gens):
        stopped = {"length": "stopped at --max-tokens", "stop": "stopped at a stop sequence or end of text"}.get(
            g.finish_reason, f"stopped: {g.finish_reason}")
        head = f"candidate {i + 1}: " if len(gens) > 1 else ""
        table = Table(title=f"{head}per-token log-probabilities ({len(g.token_ids)} tokens, {stopped})")
        for col in ("#", "token", "id", "logprob", "prob"):
            table.add_column(col, justify="right" if col != "token" else "left")
        for k, (tid, lp) in enumerate(zip(g.token_ids, g.logprobs or [], strict=False)):
            table.add_row(str(k), repr(safe_text(pol.detokenize([tid]))), str(tid), f"{lp:.4f}", f"{math.exp(lp):.4f}")
        console.print(table)
        if g.logprobs:
            console.print(f"sum logprob {sum(g.logprobs):.4f} over {len(g.logprobs)} tokens", markup=False)


def tokens_cmd(
    text: str = typer.Argument(..., help="Text to tokenize."),
    policy: str | None = typer.Option(None, "--policy", envvar="RAGLOOP_POLICY", help=POLICY_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Show token ids, pieces and whether detokenizing gives the text back.

    Example:
      ragloop tokens "De-tokenization is lossless, isn't it?"
    """
    from ragloop.cli.text import require_utf8

    require_utf8(text, "the text")
    if not text:
        raise UsageError("the text is empty", hint='give some text, e.g. ragloop tokens "Hello"')
    from ragloop.models.tokenizer import load_tokenizer, round_trip

    rt = round_trip(load_tokenizer(_policy_spec(policy)), text)
    ids, pieces, texts, back, ok = rt.ids, rt.pieces, rt.texts, rt.decoded, rt.ok
    if as_json:
        typer.echo(json.dumps({"count": len(ids), "ids": ids, "pieces": pieces, "texts": texts,
                               "round_trip": ok, "detokenized": back}, ensure_ascii=False))
    else:
        from rich.table import Table

        console = _console()
        table = Table(title=f"{len(ids)} tokens")
        for col in ("#", "id", "piece", "text"):
            table.add_column(col)
        for k, (i, p, t) in enumerate(zip(ids, pieces, texts, strict=True)):
            table.add_row(str(k), str(i), safe_text(p), repr(safe_text(t)))
        console.print(table)
        console.print(f"ids: {ids}", markup=False)
        console.print(f"count: {len(ids)}", markup=False)
        console.print(f"round trip: {'OK' if ok else 'FAIL'}", markup=False)
        if not ok:
            console.print(f"detokenized: {safe_text(back)!r}", markup=False)
    if not ok:
        raise typer.Exit(1)


def models_cmd(
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    policy: str | None = typer.Option(None, "--policy",
                                      help="Describe this policy spec instead (name, family, path; no weights loaded)."),
) -> None:
    """List the installed models (the embedded default and the converted cache) and each one's family:
    decoder-only, encoder-decoder or encoder-only (docs/ARCHITECTURES.md).

    Example:
      ragloop models --json
      ragloop models --policy ./my-t5      # → family: encoder-decoder
    """
    from ragloop.core.config import cache_dir
    from ragloop.core.errors import ModelNotFoundError
    from ragloop.models.loading import (
        EMBEDDED_NAME,
        INSTALL_HINT,
        converted_dir,
        list_cached_models,
        resolve_spec,
    )
    from ragloop.models.seq2seq import read_model_family

    if policy is not None:
        src = resolve_spec(policy)
        family = read_model_family(src.path) if src.kind == "hf" else "decoder-only"
        info = {"name": src.name, "kind": src.kind, "family": family, "path": str(src.path)}
        if as_json:
            typer.echo(json.dumps(info))
        else:
            _console().print(f"{info['name']}: {family} ({src.kind}) {info['path']}", markup=False)
        return
    embedded: dict[str, Any] = {"name": EMBEDDED_NAME, "family": "decoder-only"}
    try:
        src = resolve_spec(None)
        conv = converted_dir(src)
        embedded.update(installed=True, path=str(src.path), bytes=src.path.stat().st_size,
                        converted=conv.is_dir(), cache_path=str(conv))
    except ModelNotFoundError:
        embedded.update(installed=False, hint=INSTALL_HINT)
    cached = list_cached_models()
    for e in cached:
        try:
            e["family"] = read_model_family(e["path"])
        except RagloopError:
            e["family"] = "?"
    cpu = _cpu_summary()
    if as_json:
        typer.echo(json.dumps({"embedded": embedded, "cache_dir": str(cache_dir()), "cached": cached, "cpu": cpu}))
        return
    from rich.table import Table

    console = _console()
    if embedded["installed"]:
        state = "converted" if embedded["converted"] else "not converted yet (first use converts, ~20 s)"
        console.print(f"embedded default: {EMBEDDED_NAME} (decoder-only)  {embedded['path']}  "
                      f"{embedded['bytes'] / 1e6:.1f} MB (GGUF), {state}", markup=False)
    else:
        console.print(f"embedded default: not installed ({INSTALL_HINT})", markup=False)
    console.print(f"cpu: {cpu['describe']}; threads {cpu['threads']}", markup=False)
    console.print(f"--precision auto → {cpu['precision_auto']['q4_grid']} for weights on a 4-bit grid (the embedded "
                  f"model), {cpu['precision_auto']['other']} for others; bf16 kernel: {cpu['kernels']['bf16']['small']}; "
                  f"training bf16 autocast: {'yes' if cpu['autocast_bf16'] else 'no (fp32)'}", markup=False)
    table = Table(title=f"converted models in {cache_dir() / 'models'}")
    for col in ("name", "family", "params", "context", "size", "status", "path"):
        table.add_column(col, overflow="fold")
    for e in cached:
        params = f"{e['params'] / 1e6:.1f}M" if e.get("params") else "?"
        size = f"{e['bytes'] / 1e6:.0f} MB" if e.get("bytes") else "?"
        status = "ok" if e["ok"] else f"damaged: {e.get('problem')}"
        table.add_row(str(e.get("name")), str(e.get("family", "?")), params, str(e.get("context_window") or "?"), size,
                      status, e["path"])
    console.print(table)


def _cpu_summary() -> dict[str, Any]:
    """What this CPU is and what follows from it (``ragloop.models.cpu``), for ``ragloop models``."""
    import torch

    from ragloop.models.cpu import (
        DECODE_PRECISIONS,
        autocast_bf16,
        detect_cpu,
        matmul_kernel,
        resolve_precision,
    )

    info = detect_cpu()
    return {
        "capability": info.capability, "torch_capability": info.torch_capability, "arch": info.arch,
        "forced": info.forced, "describe": info.describe(), "threads": torch.get_num_threads(),
        "precision_auto": {"q4_grid": resolve_precision("auto", info, q4_grid=True),
                           "other": resolve_precision("auto", info, q4_grid=False)},
        "kernels": {p: matmul_kernel(p, info) for p in DECODE_PRECISIONS},
        "autocast_bf16": autocast_bf16(info),
    }


def plan_cmd(
    model_or_size: str = typer.Argument(..., help="A model (default, a directory, a .gguf file) or a size like 7B."),
    gpu_memory: float | None = typer.Option(None, "--gpu-memory", help="Memory of one GPU in GB (GiB)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Parameters, training memory by precision, sharding need, and the Chinchilla token budget.

    Examples:
      ragloop plan 7B --gpu-memory 24
      ragloop plan default --json
    """
    from ragloop.models.plan import human_count, plan

    out = plan(model_or_size, gpu_memory)
    if as_json:
        typer.echo(json.dumps(out))
        return
    from rich.table import Table

    console = _console()
    console.print(f"{out['name']}: {out['params']:,} parameters ({human_count(out['params'])})"
                  + (f", context window {out['context_window']}" if out.get("context_window") else ""), markup=False)
    inf = out["inference_gib"]
    console.print("weights alone: " + ", ".join(f"{k} {v:.2f} GiB" for k, v in inf.items()), markup=False)
    table = Table(title="full fine-tuning with Adam: model states (GiB; activations come on top)")
    for col in ("precision", "weights", "grads", "fp32 master", "Adam m+v", "total", "B/param"):
        table.add_column(col, justify="right")
    for regime, row in out["training_gib"].items():
        table.add_row(regime, *(f"{row[k]:.2f}" for k in ("weights", "gradients", "master_weights", "adam_states",
                                                           "total")), f"{row['bytes_per_param']:.0f}")
    console.print(table)
    if "sharding" in out:
        for regime, s in out["sharding"].items():
            verdict = (f"needs sharding (FSDP/ZeRO-3) over at least {s['min_gpus']} GPUs"
                       if s["needs_sharding"] else "fits one GPU")
            console.print(f"{regime}: {verdict} of {out['gpu_memory_gib']:g} GB "
                          f"(using {s['usable_gib_per_gpu']:.1f} GB each for model states)", markup=False)
    c = out["chinchilla"]
    console.print(f"Chinchilla compute-optimal: {c['tokens']:,} tokens ({c['tokens_per_param']} per parameter), "
                  f"training ≈ 6·N·D = {c['train_flops']:.3g} FLOPs", markup=False)


def register(app: typer.Typer) -> None:
    app.command("generate")(generate_cmd)
    app.command("tokens")(tokens_cmd)
    app.command("models")(models_cmd)
    app.command("plan")(plan_cmd)
