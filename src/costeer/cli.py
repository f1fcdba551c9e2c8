"""The `costeer` command line. Holds no logic a Python user would need: it parses, calls the
API, prints. Errors a user can cause end in one line on stderr and exit code 2."""

from __future__ import annotations

import json
import os
import sys
from importlib import resources
from pathlib import Path
from typing import Optional

import typer

from costeer.engine.config import METHOD_HELP, GenerationConfig, Method, SamplingConfig, SteeringConfig

DEFAULT_LLM = "smollm2-135m-instruct"
DEFAULT_SLM = "smollm2-135m-instruct"

app = typer.Typer(
    help="CoSteer: a small on-device model privately steers a cloud LLM's decoding.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

METHODS_DOC = "; ".join(f"{m.value}: {h}" for m, h in METHOD_HELP.items())


def _fail(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(2)


def _quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _load(llm: Optional[str], slm: Optional[str], config: GenerationConfig, device: str):
    from costeer.api import CoSteer

    typer.echo(f"loading LLM={llm} SLM={slm} …", err=True)
    return CoSteer.load(llm, slm, config, device=device)


def _run_guarded(fn):
    """User errors -> one line; anything else is a bug and keeps its traceback."""
    from costeer.engine.models import ModelLoadError
    from costeer.engine.vocab import IncompatibleVocabularies

    try:
        return fn()
    except (ModelLoadError, IncompatibleVocabularies, FileNotFoundError, ValueError) as e:
        _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    except KeyboardInterrupt:
        _fail("interrupted")


def _steering(T: int, alpha: float, beta: float, lam: float, eta: float) -> SteeringConfig:
    return SteeringConfig(T=T, alpha=alpha, beta=beta, lam=lam, eta=eta)


@app.command()
def generate(
    query: str = typer.Option(..., "--query", "-q", help="The public query (the only text the LLM sees)."),
    context_file: Optional[Path] = typer.Option(
        None, "--context-file", "-c", help="Private profile / history: plain text, JSON or YAML."
    ),
    context: Optional[str] = typer.Option(None, "--context", help="Private context given inline instead of a file."),
    llm: str = typer.Option(DEFAULT_LLM, help="LLM: preset, .gguf file, model folder or hub name."),
    slm: str = typer.Option(DEFAULT_SLM, help="SLM (on the device): preset, .gguf file, folder or hub name."),
    method: Method = typer.Option(Method.costeer, help=METHODS_DOC),
    max_new_tokens: int = typer.Option(128, min=1),
    temperature: float = typer.Option(0.0, min=0.0, help="0 = greedy (the paper's setting)."),
    top_k: int = typer.Option(0, min=0),
    top_p: float = typer.Option(1.0, min=0.0, max=1.0),
    seed: Optional[int] = typer.Option(None),
    T: int = typer.Option(20, "--T", min=1, help="FTRL iterations."),
    alpha: float = typer.Option(2.0, help="α: LLM policy contrast."),
    beta: float = typer.Option(1.0, help="β: weight of the SLM delta."),
    lam: float = typer.Option(2.0, "--lambda", help="λ: KL anchor to the LLM's policy."),
    eta: float = typer.Option(10.0, help="η: FTRL step size."),
    device: str = typer.Option("auto", help="auto | cpu | cuda[:N]"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of streaming text."),
) -> None:
    """Generate one response with any method; tokens stream as they are chosen."""

    def run():
        from costeer.engine.prompts import load_context

        if context_file is not None and context is not None:
            raise ValueError("give --context or --context-file, not both")
        ctx = load_context(context_file) if context_file is not None else context
        if not query.strip():
            raise ValueError("the query is empty")
        cfg = GenerationConfig(
            steering=_steering(T, alpha, beta, lam, eta),
            sampling=SamplingConfig(
                temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, max_new_tokens=max_new_tokens
            ),
        )
        _quiet_libraries()
        needs_llm, needs_slm = method.uses_llm, method.uses_slm
        cs = _load(llm if needs_llm else None, slm if needs_slm else None, cfg, device)
        stream = cs.stream(query, ctx, method)
        if as_json:
            for _ in stream:
                pass
        else:
            for chunk in stream:
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
            sys.stdout.write("\n")
        g = stream.generation
        if as_json:
            typer.echo(
                json.dumps(
                    {
                        "method": g.method,
                        "text": g.text,
                        "token_ids": g.token_ids,
                        "prompt_ids": g.prompt_ids,
                        "stop_reason": g.stop_reason,
                        "coefficient": g.coefficient,
                        "llm": llm if needs_llm else None,
                        "slm": slm if needs_slm else None,
                        "config": cfg.model_dump(),
                        "timing_s": g.timing(),
                    }
                )
            )

    _run_guarded(run)


@app.command()
def demo(
    llm: str = typer.Option(DEFAULT_LLM, help="LLM: preset, .gguf file, model folder or hub name."),
    slm: str = typer.Option(DEFAULT_SLM, help="SLM: preset, .gguf file, folder or hub name."),
    max_new_tokens: int = typer.Option(64, min=1),
    device: str = typer.Option("auto"),
) -> None:
    """Run the default pair on the shipped example persona: `llm` vs `costeer` vs `slm_context`."""
    import yaml

    def run():
        from costeer.engine.prompts import render_context

        example = yaml.safe_load(resources.files("costeer").joinpath("examples/persona.yaml").read_text())
        ctx = render_context(example["profile"])
        cfg = GenerationConfig(sampling=SamplingConfig(max_new_tokens=max_new_tokens))
        _quiet_libraries()
        cs = _load(llm, slm, cfg, device)
        typer.echo(f"\nPrivate context (stays on the device):\n{ctx}\n")
        typer.echo(f"Public query (all the cloud LLM sees): {example['query']}\n")
        for m in (Method.llm, Method.costeer, Method.slm_context):
            typer.secho(f"── {m.value}: {METHOD_HELP[m]}", bold=True)
            stream = cs.stream(example["query"], ctx, m)
            for chunk in stream:
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
            steps = stream.generation.steps
            ms = 1000 * sum(s.llm_s + s.slm_s + s.fusion_s + s.sample_s for s in steps[1:]) / max(1, len(steps) - 1)
            typer.echo(f"\n   [{len(stream.generation.token_ids)} tokens, {ms:.0f} ms/token]\n")

    _run_guarded(run)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
