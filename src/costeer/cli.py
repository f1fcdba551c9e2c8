"""The `costeer` command line. Holds no logic a Python user would need: it parses, calls the
API, prints. Errors a user can cause end in one line on stderr and exit code 2."""

from __future__ import annotations

import functools
import inspect
import json
import os
import sys
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Annotated, Optional, get_type_hints

import typer
from pydantic import ValidationError

from costeer import frames
from costeer.device.options import HELP as CLOUD_K_HELP
from costeer.device.options import LOOKAHEAD_HELP
from costeer.device.transport import Retry
from costeer.engine.config import GenerationConfig, Method, SamplingConfig, SteeringConfig, VariantConfig
from costeer.engine.methods import METHODS, PAPER_METHODS
from costeer.errors import CoSteerError

DEFAULT_LLM = "smollm2-135m-instruct"
DEFAULT_SLM = "smollm2-135m-instruct"

app = typer.Typer(
    help="CoSteer: a small on-device model privately steers a cloud LLM's decoding.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

METHODS_DOC = "; ".join(f"{s.name}: {s.help}" for s in METHODS)


def _fail(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(2)


def _quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _load(llm: Optional[str], slm: Optional[str], config: GenerationConfig, device: str, backend: str):
    from costeer.api import CoSteer

    typer.echo(f"loading LLM={llm} SLM={slm} …", err=True)
    return CoSteer.load(llm, slm, config, device=device, backend=backend)


def _load_cloud(url: str, slm: Optional[str], config: GenerationConfig, device: str, backend: str, frames_,
                tail: str, wire_log: Optional[Path], public: list[dict], api: str = "costeer", llm_spec: Optional[str] = None,
                link: Optional[dict] = None, lookahead=None, run_ahead: bool = True):  # fmt: skip
    """The LLM is the cloud at `url` (our service, or a serving engine whose model `llm_spec`
    names for its tokenizer); the SLM loads here, on the device. frames_: a device.CloudFrames;
    link: how to reach it (Models.link); lookahead: a device.Lookahead (engines: positions per request);
    run_ahead: with our service and look-ahead, guessed SLM-pair forwards while a round is on its way;
    public: the conversation the cloud may see, noted in the wire log for the audit."""
    from costeer.api import CoSteer
    from costeer.device import connect_cloud, connect_engine
    from costeer.engine.models import load_lm

    typer.echo(f"connecting to {url}; loading SLM={slm} …", err=True)
    link = link or {}
    if api == "costeer":
        llm = connect_cloud(url, k=frames_, tail=tail, wire_log=wire_log, lookahead=lookahead, run_ahead=run_ahead, **link)
    else:
        llm = connect_engine(url, llm_spec or DEFAULT_LLM, api=api, k=frames_, tail=tail, wire_log=wire_log,
                             lookahead=lookahead, **link)  # fmt: skip
    if llm.wire is not None:
        # the audit's default public text, and the turns each OPEN's prompt must be exactly
        llm.wire.meta(query="\n".join(m["content"] for m in public), messages=public)
    return CoSteer(llm, load_lm(slm, device, backend) if slm else None, config)


CLOUD_APIS = ("costeer", "llamacpp", "openai", "auto")


def _cloud_frames(k: Optional[str], api: str):
    """--cloud-k parsed once (device.CloudFrames), else the default of the cloud kind; checked
    against the kind before anything is loaded or sent."""
    from costeer.device import CloudFrames

    if api not in CLOUD_APIS:
        raise ValueError(f"unknown --cloud-api '{api}' ({' | '.join(CLOUD_APIS)})")
    frames_ = CloudFrames.parse(k) if k is not None else CloudFrames.default_for(api)
    return frames_ if api == "costeer" else frames_.top_k_only()


def _label(spec: Optional[str], lm) -> Optional[str]:
    """A model as a run folder records it: llama.cpp's numerics differ from transformers', so a
    folder made with one must not be resumed with the other (transformers keeps the bare name)."""
    backend = getattr(lm, "backend", "transformers")
    return spec if spec is None or backend == "transformers" else f"{spec} [{backend}]"


# Config fields whose flag is not the field's name with dashes.
_FLAG_OF_FIELD = {"lam": "--lambda", "T": "--T"}


def _invalid_options(e: ValidationError) -> str:
    """A config's validation errors as one line that names each flag, its value and the reason."""
    parts = []
    for err in e.errors():
        field = next((str(x) for x in reversed(err["loc"]) if isinstance(x, str)), "")
        flag = _FLAG_OF_FIELD.get(field, "--" + field.replace("_", "-"))
        reason = err["msg"].replace("Input should be", "must be").replace("Value error, ", "")
        parts.append(f"{flag} {err.get('input')!r}: {reason}")
    return "; ".join(parts)


def _run_guarded(fn):
    """User errors -> one line; anything else is a bug and keeps its traceback. Besides CoSteerError,
    ValueError (a refused argument; a config's ValidationError names its flags) and FileNotFoundError
    are the user's."""
    try:
        return fn()
    except ValidationError as e:
        _fail(_invalid_options(e))
    except (CoSteerError, FileNotFoundError, ValueError) as e:
        _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    except KeyboardInterrupt:
        _fail("interrupted")


# ---- options shared by the commands: each declared once, as a typer Annotated type ------------------

Llm = Annotated[str, typer.Option(help="LLM: preset, .gguf file, model folder or hub name.")]
Slm = Annotated[str, typer.Option(help="SLM (on the device): preset, .gguf file, folder or hub name.")]
MaxNew = Annotated[int, typer.Option(min=1)]
Device = Annotated[str, typer.Option(help="auto | cpu | cuda[:N]")]
Backend = Annotated[str, typer.Option(help="transformers | llamacpp | auto (llama.cpp for GGUF files on the CPU "
                                           "when installed).")]  # fmt: skip
_S, _P, _V = SteeringConfig(), SamplingConfig(), VariantConfig()  # the defaults, from the configs themselves


CloudK = Annotated[Optional[str], typer.Option(help=f"With --cloud: {CLOUD_K_HELP}")]


@dataclass
class LocalModels:
    """The model pair in this process (playground; with the cloud options below, `Models`)."""

    llm: Llm = DEFAULT_LLM
    slm: Slm = DEFAULT_SLM
    device: Device = "auto"
    backend: Backend = "auto"


_LOCAL_FIELDS = {f.name for f in fields(LocalModels)}


@dataclass
class Models(LocalModels):
    """Where the models run: both here, or the LLM behind --cloud (generate, eval, chat, gateway)."""

    cloud: Annotated[Optional[str], typer.Option(
        help="ws://HOST:PORT of `costeer serve` (key from COSTEER_API_KEY; --llm is then the server's), or a serving "
        "engine (--cloud-api): the LLM runs there, the SLM and the context stay here (llm_context is refused).")] = None
    cloud_k: CloudK = None
    cloud_tail: Annotated[str, typer.Option(help="With --cloud: model of the mass outside the top-k: slm | uniform.")] = "slm"
    cloud_api: Annotated[str, typer.Option(
        help="With --cloud: costeer (our service, ws://) | llamacpp (llama-server) | openai (vLLM, SGLang) | auto; for "
        "an engine, --llm names the model it serves (its tokenizer).")] = "costeer"  # fmt: skip
    ca_file: Annotated[Optional[Path], typer.Option(
        "--ca-file", help="With a wss:// or https:// --cloud: the CA bundle to trust (default: SSL_CERT_FILE, else the "
        "system's).")] = None  # fmt: skip
    insecure: Annotated[bool, typer.Option(
        "--insecure", help="With --cloud: allow the API key over plain ws:// or http:// to a host other than this "
        "machine (anyone on the path can read it).")] = False  # fmt: skip
    cloud_resume_s: Annotated[float, typer.Option(
        "--cloud-resume-s", min=0.0, help="With --cloud: how long to keep trying to resume after the connection is "
        "lost (a cloud restart), in seconds.")] = Retry().budget_s  # fmt: skip
    lookahead: Annotated[str, typer.Option(help=f"With --cloud: {LOOKAHEAD_HELP}")] = "auto"
    run_ahead: Annotated[bool, typer.Option(
        "--run-ahead/--no-run-ahead", help="With --cloud (--cloud-api costeer) and look-ahead: while a round is on its "
        "way, run the SLM pair ahead on the tokens the device guesses it will choose (the output is the same "
        "either way).")] = True  # fmt: skip

    def frames(self):
        """--cloud-k parsed once (device.CloudFrames), else the default of the cloud kind."""
        return _cloud_frames(self.cloud_k, self.cloud_api)

    def lookahead_option(self):
        """--lookahead parsed once (device.Lookahead), checked against the cloud kind."""
        from costeer.device import Lookahead

        la = Lookahead.parse(self.lookahead)
        if self.cloud_api != "costeer" and la.tree:
            raise ValueError("--lookahead tree:D:M needs --cloud-api costeer (a serving engine answers chains)")
        return la

    def unread_cloud_options(self) -> list[str]:
        """The --cloud-* options given without --cloud, which nothing reads then."""
        if self.cloud is not None:
            return []
        return ["--" + f.name.replace("_", "-") for f in fields(Models) if f.name not in _LOCAL_FIELDS
                and f.name != "cloud" and getattr(self, f.name) != f.default]  # fmt: skip

    def link(self) -> dict:
        """--ca-file, --insecure and --cloud-resume-s as connect_cloud / connect_engine keywords."""
        return {"ca_file": self.ca_file, "insecure": self.insecure, "retry": Retry(budget_s=self.cloud_resume_s)}


@dataclass
class Decoding:
    """Sampling, the FTRL hyper-parameters, the costeer_* variants' stages and the gate (generate, eval,
    chat, gateway)."""

    max_new_tokens: MaxNew = _P.max_new_tokens
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy (the paper's setting).")] = _P.temperature
    top_k: Annotated[int, typer.Option(min=0)] = _P.top_k
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = _P.top_p
    seed: Annotated[Optional[int], typer.Option()] = _P.seed
    T: Annotated[int, typer.Option("--T", min=1, help="FTRL iterations.")] = _S.T
    alpha: Annotated[float, typer.Option(help="α: LLM policy contrast.")] = _S.alpha
    beta: Annotated[float, typer.Option(help="β: weight of the SLM delta.")] = _S.beta
    lam: Annotated[float, typer.Option("--lambda", help="λ: KL anchor to the LLM's policy.")] = _S.lam
    eta: Annotated[float, typer.Option(help="η: FTRL step size.")] = _S.eta
    # the costeer_* variants' stages: unset ones keep VariantConfig's defaults
    tau: Annotated[Optional[float], typer.Option(min=0.0, max=1.0, help=f"Plausible head τ (default {_V.tau}; 0 = off).")] = None
    tau_pers: Annotated[Optional[float], typer.Option(min=0.0, max=1.0, help="Also keep the context SLM's head at this τ "
                                                      "(default off).")] = None
    epsilon: Annotated[Optional[float], typer.Option(min=0.0, help=f"Trust region ε, nats/token (default {_V.epsilon}; "
                                                     "inf = off).")] = None
    repetition_penalty: Annotated[Optional[float], typer.Option(min=0.0, help="Guard: nats off used tokens (default "
                                                                f"{_V.repetition_penalty}).")] = None
    no_repeat_ngram: Annotated[Optional[int], typer.Option(min=0, help="Guard: ban repeated n-grams (default "
                                                           f"{_V.no_repeat_ngram}; 0 = off).")] = None
    gate: Annotated[Optional[float], typer.Option(min=0.0, max=1.0, help="Confidence gate: skip steering (and the SLM) "
                                                  "where the LLM's top probability reaches this; default off.")] = None  # fmt: skip

    def variant(self) -> VariantConfig | None:
        """The variant options given, or None (the defaults) when none was."""
        given = {k: getattr(self, k) for k in VariantConfig.model_fields if getattr(self, k) is not None}
        return VariantConfig(**given) if given else None

    def config(self) -> GenerationConfig:
        return GenerationConfig(
            steering=SteeringConfig(T=self.T, alpha=self.alpha, beta=self.beta, lam=self.lam, eta=self.eta,
                                    variant=self.variant(), gate=self.gate),
            sampling=SamplingConfig(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, seed=self.seed,
                                    max_new_tokens=self.max_new_tokens),
        )  # fmt: skip


@dataclass
class GatewayDecoding(Decoding):
    """Decoding for the gateway: a request may name its own budget, this is the one when it does not."""

    max_new_tokens: Annotated[int, typer.Option(min=1, help="A request's token budget when it names none.")] = 256


def _check_reference(reference_file: Optional[Path], method: Method) -> None:
    if reference_file is not None and not method.matched:
        raise ValueError(f"--reference-file is read by costeer_matched only, not by {method.value}")


def _check_sampling_and_gate(cfg: GenerationConfig, methods: list[Method]) -> None:
    """Options the run would not read: a gate without a steered method is refused; sampling options
    under greedy decoding are named in a warning (they change nothing, the output is still right)."""
    if cfg.steering.gate is not None and not any(m.steered for m in methods):
        names = ", ".join(m.value for m in methods)
        raise ValueError(f"--gate skips steering where the LLM is confident, and {names} does not steer")
    unread = cfg.sampling.unread()
    if unread:
        flags = ", ".join("--" + name.replace("_", "-") for name in unread)
        typer.echo(f"warning: --temperature 0 decodes greedily and ignores {flags}; give --temperature > 0 to "
                   "sample", err=True)  # fmt: skip


def _with_options(**groups: type):
    """Give a command the fields of each options dataclass as its own options; it receives them
    gathered, one instance per group (e.g. `models: Models`), so that commands share one declaration."""

    def wrap(fn):
        sig = inspect.signature(fn)
        own = [p for name, p in sig.parameters.items() if name not in groups]
        annotations = {k: v for k, v in get_type_hints(fn, include_extras=True).items() if k not in groups}
        added = []
        for cls in groups.values():
            hints = get_type_hints(cls, include_extras=True)
            for f in fields(cls):
                added.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default,
                                               annotation=hints[f.name]))  # fmt: skip
                annotations[f.name] = hints[f.name]

        @functools.wraps(fn)
        def command(**kw):
            for name, cls in groups.items():
                kw[name] = cls(**{f.name: kw.pop(f.name) for f in fields(cls)})
            return fn(**kw)

        command.__signature__ = sig.replace(parameters=own + added)
        command.__annotations__ = annotations
        return command

    return wrap


@app.command()
@_with_options(models=Models, decoding=Decoding)
def generate(
    query: Optional[str] = typer.Option(None, "--query", "-q", help="The public query (the only text the LLM sees)."),
    messages: Optional[Path] = typer.Option(None, "--messages", help="A public conversation instead of --query: a "
                                            "JSON list of {role, content} turns (system / user / assistant), ending "
                                            "with the user's; the context goes before the first user turn."),
    context_file: Optional[Path] = typer.Option(
        None, "--context-file", "-c", help="Private profile / history: plain text, JSON or YAML."
    ),
    context: Optional[str] = typer.Option(None, "--context", help="Private context given inline instead of a file."),
    reference_file: Optional[Path] = typer.Option(
        None, "--reference-file", help="For costeer_matched: a public reference profile in the context's format "
        "(text, JSON or YAML); the SLM's without-context branch reads it with the query."),
    method: Method = typer.Option(Method.costeer, help=METHODS_DOC),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of streaming text."),
    wire_log: Optional[Path] = typer.Option(None, help="With --cloud: record every byte sent and received here."),
    truncate_context: bool = typer.Option(False, help="Cut the context's end until every prompt fits its model's "
                                          "trained window (default: refuse a context that does not fit)."),
    models: Models = Models(),
    decoding: Decoding = Decoding(),
) -> None:
    """Generate one response with any method; tokens stream as they are chosen."""

    def run():
        from costeer.engine.prompts import conversation, first_user, load_context, user_message

        if (query is None) == (messages is None):
            raise ValueError("give --query or --messages (one of them)")
        turns = conversation(_read_messages(messages) if messages is not None else query)
        if context_file is not None and context is not None:
            raise ValueError("give --context or --context-file, not both")
        if wire_log is not None and models.cloud is None:
            raise ValueError("--wire-log records the exchange with the cloud: give --cloud too")
        ctx = load_context(context_file) if context_file is not None else context
        _check_reference(reference_file, method)
        reference = user_message(first_user(turns), load_context(reference_file)) if reference_file else None
        if method.matched and reference is None:
            typer.echo("note: costeer_matched without --reference-file is the paper's update with the repetition "
                       "guard (docs/steering-variants.md §5)", err=True)
        cfg = decoding.config()
        _check_sampling_and_gate(cfg, [method])
        cs = _load_models(models, cfg, [method], wire_log, turns)  # the turns: what the cloud may see
        stream = cs.stream(turns, ctx, method, reference_message=reference, truncate_context=truncate_context)
        cut = stream.generation.context_cut
        if cut:
            typer.echo(f"note: cut the context to its first {len(ctx) - cut:,} of {len(ctx):,} characters to fit "
                       "the models' trained windows", err=True)  # fmt: skip
        interrupted = _consume(stream, echo=not as_json)
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
                        "context_cut": g.context_cut,
                        "llm": (models.cloud or models.llm) if method.uses_llm else None,
                        "slm": models.slm if method.uses_slm else None,
                        "config": cfg.model_dump(),
                        "timing_s": g.timing(),
                    }
                )
            )
        if interrupted:  # what was generated is out (text or JSON): now say it stopped early
            raise KeyboardInterrupt

    _run_guarded(run)


def _consume(stream, echo: bool) -> bool:
    """Run the stream to its end, writing its text when `echo` -> whether Ctrl-C cut it short (the
    generation then holds the tokens so far, stop_reason "interrupted")."""
    try:
        for chunk in stream:
            if echo:
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
    except KeyboardInterrupt:
        stream.generation.stop_reason = "interrupted"
        return True
    finally:
        if echo:
            sys.stdout.write("\n")
            sys.stdout.flush()
    return False


@app.command()
def demo(
    llm: Llm = DEFAULT_LLM,
    slm: Slm = DEFAULT_SLM,
    max_new_tokens: MaxNew = 64,
    device: Device = "auto",
    backend: Backend = "auto",
) -> None:
    """Run the default pair on the shipped example persona: `llm`, `costeer`, `costeer_matched`, `slm_context`."""
    import yaml

    def run():
        from costeer.engine.prompts import render_context, user_message

        def persona(name: str) -> dict:
            return yaml.safe_load(resources.files("costeer").joinpath(f"examples/{name}.yaml").read_text())

        example = persona("persona")
        ctx = render_context(example["profile"])
        # costeer_matched's public reference: another made-up user in the same format
        reference = user_message(example["query"], render_context(persona("reference_persona")["profile"]))
        cfg = GenerationConfig(sampling=SamplingConfig(max_new_tokens=max_new_tokens))
        _quiet_libraries()
        cs = _load(llm, slm, cfg, device, backend)
        typer.echo(f"\nPrivate context (stays on the device):\n{ctx}\n")
        typer.echo(f"Public query (all the cloud LLM sees): {example['query']}\n")
        for m in (Method.llm, Method.costeer, Method.costeer_matched, Method.slm_context):
            typer.secho(f"── {m.value}: {m.spec.help}", bold=True)
            stream = cs.stream(example["query"], ctx, m, reference_message=reference)
            for chunk in stream:
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
            steps = stream.generation.steps
            ms = 1000 * sum(s.llm_s + s.slm_s + s.fusion_s + s.sample_s for s in steps[1:]) / max(1, len(steps) - 1)
            typer.echo(f"\n   [{len(stream.generation.token_ids)} tokens, {ms:.0f} ms/token]\n")

    _run_guarded(run)


ALL_METHODS = ",".join(PAPER_METHODS)


def _load_examples(task: str, data: Optional[Path], preference: Optional[str], limit: Optional[int]):
    """The task's examples (default file: its shipped sample) and the file they came from."""
    from costeer.eval.tasks import load_task, sample_path

    path = data if data is not None else sample_path(task)  # sample_path rejects an unknown task
    examples = load_task(task, path, preference=preference, limit=limit)
    if not examples:
        raise ValueError(f"no examples in {path}")
    return examples, path


def _load_for(methods, llm: str, slm: str, cfg: GenerationConfig, device: str, backend: str):
    """Load only the models the methods need."""
    _quiet_libraries()
    needs_llm = any(m.uses_llm for m in methods)
    needs_slm = any(m.uses_slm for m in methods)
    return _load(llm if needs_llm else None, slm if needs_slm else None, cfg, device, backend)


def _load_models(m: Models, cfg: GenerationConfig, methods, wire_log: Optional[Path] = None,
                 public: Optional[list[dict]] = None):
    """The CoSteer for these methods: only the models they need, the LLM behind --cloud when given
    (its frames option checked before anything is loaded or sent)."""
    if m.cloud is None:
        unread = m.unread_cloud_options()
        if unread:
            typer.echo(f"warning: {', '.join(unread)} {'is' if len(unread) == 1 else 'are'} read with --cloud only; "
                       "the models run here", err=True)  # fmt: skip
        return _load_for(methods, m.llm, m.slm, cfg, m.device, m.backend)
    frames_, lookahead = m.frames(), m.lookahead_option()
    _quiet_libraries()
    slm = m.slm if any(x.uses_slm for x in methods) else None
    return _load_cloud(m.cloud, slm, cfg, m.device, m.backend, frames_, m.cloud_tail, wire_log, public or [], m.cloud_api, m.llm,
                       m.link(), lookahead, m.run_ahead)


def _interruptible(out: Path, fn):
    """Ctrl-C keeps every finished generation: say how to pick up from there."""
    try:
        return fn()
    except KeyboardInterrupt:
        _fail(f"interrupted; rerun the same command to resume into {out}")


@app.command("eval")
@_with_options(models=Models, decoding=Decoding)
def eval_(
    task: str = typer.Option(..., help="cogenesis | longlamp_abstract | longlamp_review | longlamp_writing | "
                             "helpsteer | personal_preference_eval | truthfulqa | ultrachat"),
    data: Optional[Path] = typer.Option(None, help="Task JSONL file or a folder with <task>.jsonl "
                                        "(default: the shipped sample rows)."),
    out: Path = typer.Option(..., "--out", help="Run folder (reruns into it resume)."),
    methods: str = typer.Option(ALL_METHODS, help=f"Comma-separated. {METHODS_DOC}"),
    preference: Optional[str] = typer.Option(None, help="Preference tasks: concise | creative | uplifting | verbose."),
    limit: Optional[int] = typer.Option(None, min=0, help="First N examples only."),
    models: Models = Models(),
    decoding: Decoding = Decoding(),
) -> None:
    """Run methods over a task into a resumable folder, then write metrics.json and report.md/csv/png."""

    def run():
        from costeer.eval.runner import parse_methods, run_eval
        from costeer.eval.report import render_markdown

        ms = parse_methods(methods.split(","))
        leaky = [m.value for m in ms if m.spec.privacy_violating]
        if models.cloud is not None and leaky:
            raise ValueError(f"method '{leaky[0]}' would send the private context to the cloud: drop it with --cloud")
        examples, path = _load_examples(task, data, preference, limit)
        cfg = decoding.config()
        _check_sampling_and_gate(cfg, ms)
        cs = _load_models(models, cfg, ms)
        if cs.prefix_cache is not None:
            # An evaluation's outputs must equal whole-prompt prefills: on llama.cpp the fastest cut moves
            # greedy paths (docs/prefix-cache.md), so eval defaults to the exact cut; the env var still rules.
            from costeer.engine.prefix_cache import PrefixCache

            cs.prefix_cache = PrefixCache.from_env(default_mode="exact")
        llm_label = f"{models.cloud} (k={models.frames()}, tail={models.cloud_tail})" if models.cloud else None
        labels = {"llm": llm_label or _label(models.llm, cs.llm), "slm": _label(models.slm, cs.slm)}
        metrics = _interruptible(out, lambda: run_eval(
            cs, examples, ms, out, data=path, limit=limit, models=labels
        ))  # fmt: skip
        typer.echo(render_markdown(metrics))
        typer.echo(f"wrote {out}/metrics.json, report.md, report.csv, report.png", err=True)

    _run_guarded(run)


@app.command()
def report(
    run_dir: Path = typer.Argument(..., help="A folder written by `costeer eval`."),
    task: Optional[str] = typer.Option(None, help="Default: the task in the folder's run.json."),
    data: Optional[Path] = typer.Option(None, help="Default: the file in run.json, else the task's sample."),
    preference: Optional[str] = typer.Option(None, help="Default: the preference in run.json."),
) -> None:
    """Re-score a run folder: metrics.json and report.md/csv/png; prints the Markdown table."""

    def run():
        from costeer.eval.report import render_markdown
        from costeer.eval.runner import report_run

        typer.echo(render_markdown(report_run(run_dir, task, data, preference)))

    _run_guarded(run)


@app.command()
def sweep(
    task: str = typer.Option(..., help="Task name (the paper sweeps longlamp_abstract)."),
    data: Optional[Path] = typer.Option(None, help="Task JSONL file (default: the shipped sample rows)."),
    out: Path = typer.Option(..., "--out", help="Sweep folder (generations are cached there by b)."),
    params: str = typer.Option("alpha,beta,lambda,eta,T", help="Comma-separated hyper-parameters to vary."),
    preference: Optional[str] = typer.Option(None, help="Preference tasks: concise | creative | uplifting | verbose."),
    limit: Optional[int] = typer.Option(None, min=0, help="First N examples only."),
    max_new_tokens: MaxNew = _P.max_new_tokens,
    llm: Llm = DEFAULT_LLM,
    slm: Slm = DEFAULT_SLM,
    device: Device = "auto",
    backend: Backend = "auto",
) -> None:
    """Vary α, β, λ, η, T one at a time around the defaults (paper Fig. 2); writes sweep.json/csv/png."""

    def run():
        from costeer.eval.sweep import parse_params, run_sweep

        names = parse_params(params.split(","))
        examples, path = _load_examples(task, data, preference, limit)
        cfg = GenerationConfig(sampling=SamplingConfig(max_new_tokens=max_new_tokens))
        cs = _load_for([Method.costeer], llm, slm, cfg, device, backend)
        result = _interruptible(out, lambda: run_sweep(
            cs, examples, out, params=names, data=path, limit=limit, models={"llm": llm, "slm": slm}
        ))  # fmt: skip
        metric = result["metric"] or "score"
        typer.echo(f"{'param':<6} {'value':>8} {'b':>12} {metric:>10}")
        for s in result["settings"]:
            score = "skipped" if s["skipped"] else ("–" if s["score"] is None else f"{s['score']:.4f}")
            b = "–" if s["b"] is None else f"{s['b']:.4g}"
            typer.echo(f"{s['param']:<6} {s['value']:>8g} {b:>12} {score:>10}")
        typer.echo(f"{result['distinct_coefficients']} distinct b generated; wrote {out}/sweep.json, "
                   "sweep.csv, sweep.png", err=True)

    _run_guarded(run)


@app.command()
def serve(
    llm: Llm = DEFAULT_LLM,
    host: str = typer.Option("127.0.0.1", help="Interface to listen on."),
    port: int = typer.Option(8765, min=1, max=65535),
    api_keys_file: Optional[Path] = typer.Option(None, help="Allowed API keys, one per line (also: COSTEER_API_KEYS)."),
    max_sessions: int = typer.Option(16, min=1, help="Open sessions in all."),
    max_sessions_per_key: int = typer.Option(4, min=1),
    max_prompt_tokens: int = typer.Option(4096, min=1),
    max_new_tokens: int = typer.Option(2048, min=1),
    max_kv_tokens: int = typer.Option(16384, min=1, help="KV cache tokens of all sessions together (each reserves prompt + max new tokens)."),
    max_backlog_tokens_per_key: int = typer.Option(12288, min=1, help="Prompt and replay tokens one key may have waiting."),
    prefill_chunk_tokens: int = typer.Option(512, min=1, help="Prompt tokens per forward (others' tokens wait at most one)."),
    idle_timeout: float = typer.Option(120.0, min=0.1, help="Seconds without a message before a session is evicted."),
    values: str = typer.Option("f16", help="Top-k log-probabilities on the wire: f16 | f32."),
    packed_floor: float = typer.Option(frames.PACKED_FLOOR, help="Packed frames hold every token whose log-probability is at least this."),
    ssl_certfile: Optional[Path] = typer.Option(None, help="TLS certificate (PEM): serve wss:// and https://."),
    ssl_keyfile: Optional[Path] = typer.Option(None, help="The certificate's private key (PEM)."),
    max_connections: int = typer.Option(256, min=1, help="Open sockets in all; more are answered 503 at once."),
    send_timeout: float = typer.Option(30.0, min=0.1, help="Seconds a peer may take to read a frame before it is dropped."),
    handshake_timeout: float = typer.Option(10.0, min=0.1, help="Seconds for a whole HTTP request, then for OPEN/ATTACH."),
    max_lookahead_depth: int = typer.Option(16, min=0, max=255, help="Look-ahead levels a device may ask for per round."),
    max_lookahead_nodes: int = typer.Option(64, min=1, max=65535, help="Look-ahead nodes (root included) a device may ask for per round."),
    device: Device = "auto",
    backend: Backend = "auto",
    log_level: str = typer.Option("info"),
) -> None:
    """Serve the LLM to devices over a WebSocket (the cloud side of the split; docs/wire-format.md, docs/security.md)."""

    def run():
        import logging

        from costeer.cloud import ServerSettings, read_api_keys, serve as run_server

        if values not in ("f16", "f32"):
            raise ValueError("--values must be f16 or f32")
        _check_log_level(log_level)
        keys = read_api_keys(os.environ.get("COSTEER_API_KEYS"), api_keys_file)
        settings = ServerSettings(api_keys=keys, max_sessions=max_sessions, max_sessions_per_key=max_sessions_per_key,
                                  max_prompt_tokens=max_prompt_tokens, max_new_tokens=max_new_tokens,
                                  max_kv_tokens=max_kv_tokens, max_backlog_tokens_per_key=max_backlog_tokens_per_key,
                                  prefill_chunk_tokens=prefill_chunk_tokens,
                                  idle_timeout_s=idle_timeout, values=values, packed_floor=packed_floor,
                                  max_connections=max_connections, send_timeout_s=send_timeout,
                                  handshake_timeout_s=handshake_timeout, max_lookahead_depth=max_lookahead_depth,
                                  max_lookahead_nodes=max_lookahead_nodes)  # fmt: skip
        logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
        _quiet_libraries()
        run_server(llm, settings, host=host, port=port, device=device, backend=backend, log_level=log_level,
                   ssl_certfile=str(ssl_certfile) if ssl_certfile else None,
                   ssl_keyfile=str(ssl_keyfile) if ssl_keyfile else None)  # fmt: skip

    _run_guarded(run)


def _read_messages(path: Path) -> list:
    """A conversation file: a JSON list of {role, content} (costeer.engine.prompts.conversation checks it)."""
    if not path.is_file():
        raise FileNotFoundError(f"messages file not found: {path}")
    try:
        turns = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"messages file {path} is not valid JSON: {str(e).splitlines()[0]}") from None
    if not isinstance(turns, list):
        raise ValueError(f"messages file {path} must hold a JSON list of turns")
    return turns


CONTEXT_FILE_OPT = typer.Option(None, "--context-file", "-c", help="Private profile / history: text, JSON or YAML.")
REFERENCE_FILE_OPT = typer.Option(None, "--reference-file", help="For costeer_matched: a public reference profile "
                                  "in the context's format (text, JSON or YAML).")

CHAT_HELP = "/reset clears the conversation, /context FILE swaps the private context, /quit (or Ctrl-D) ends."


@app.command()
@_with_options(models=Models, decoding=Decoding)
def chat(
    context_file: Optional[Path] = CONTEXT_FILE_OPT,
    reference_file: Optional[Path] = REFERENCE_FILE_OPT,
    system: Optional[str] = typer.Option(None, help="A system prompt (public: the cloud LLM reads it)."),
    method: Method = typer.Option(Method.costeer, help=METHODS_DOC),
    models: Models = Models(),
    decoding: Decoding = Decoding(),
) -> None:
    """Talk with the model pair in the terminal: answers stream, the public conversation is kept
    (the cloud LLM reads it), the private context only ever reaches the on-device SLM."""

    def setup():
        from costeer.chat import Chat
        from costeer.engine.prompts import load_context

        ctx = load_context(context_file) if context_file is not None else None
        if method.needs_context and ctx is None:
            raise ValueError(f"method '{method.value}' needs a personal context: give --context-file")
        _check_reference(reference_file, method)
        reference = load_context(reference_file) if reference_file is not None else None
        cfg = decoding.config()
        _check_sampling_and_gate(cfg, [method])
        cs = _load_models(models, cfg, [method])
        return Chat(cs, method, ctx, reference, system)

    session = _run_guarded(setup)
    typer.echo(f"chatting with method {method.value}. {CHAT_HELP}", err=True)
    try:
        while (line := _ask()) is not None:
            if line.startswith("/"):
                if not _chat_command(session, line):
                    break
            elif line:
                _run_turn(session, line)
    except KeyboardInterrupt:  # Ctrl-C at the prompt ends the chat like Ctrl-D
        typer.echo("", err=True)


def _ask() -> Optional[str]:
    """The next user line (None at the end of input)."""
    typer.echo("you> ", nl=False, err=True)
    line = sys.stdin.readline()
    return line.strip() if line else None


def _chat_command(session, line: str) -> bool:
    """Run a /command; False ends the chat."""
    from costeer.engine.prompts import load_context

    name, _, arg = line.partition(" ")
    if name in ("/quit", "/exit"):
        return False
    if name == "/reset":
        session.reset()
        typer.echo("(conversation cleared)", err=True)
    elif name == "/context" and arg.strip():
        try:
            session.context = load_context(arg.strip())
            typer.echo(f"(private context: {len(session.context)} characters from {arg.strip()})", err=True)
        except (FileNotFoundError, ValueError) as e:
            typer.echo(f"error: {e}", err=True)
    else:
        typer.echo(CHAT_HELP, err=True)
    return True


def _run_turn(session, line: str) -> None:
    """Stream one answer; an error ends the turn (not the chat) and leaves the history as it was."""
    try:
        answer = session.say(line)
        for piece in answer:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        session.keep(answer)
    except (CoSteerError, ValueError) as e:
        typer.echo(f"\nerror: {str(e).splitlines()[0] if str(e) else type(e).__name__}", err=True)
    except KeyboardInterrupt:
        typer.echo("\n(interrupted: the answer is dropped)", err=True)


@app.command()
@_with_options(models=Models, decoding=GatewayDecoding)
def gateway(
    context_file: Optional[Path] = typer.Option(None, "--context-file", "-c", help="The private profile (text, JSON "
                                                "or YAML), re-read when it changes. Requests never carry it."),
    reference_file: Optional[Path] = REFERENCE_FILE_OPT,
    host: str = typer.Option("127.0.0.1", help="Interface to listen on; anything but loopback needs a key."),
    port: int = typer.Option(8080, min=1, max=65535),
    api_keys_file: Optional[Path] = typer.Option(None, help="Accepted keys (Authorization: Bearer), one a line "
                                                 "(also: COSTEER_GATEWAY_KEYS, comma-separated)."),
    max_tokens_limit: int = typer.Option(2048, min=1, help="The most max_tokens a request may ask for."),
    max_prompt_tokens: int = typer.Option(8192, min=1, help="The longest conversation accepted, in tokens."),
    max_waiting: int = typer.Option(8, min=0, help="Requests queued behind the running one; more get HTTP 429."),
    playground: bool = typer.Option(True, help="Also serve the browser playground at /playground on the same "
                                    "server (loopback binds only: the page has no key)."),
    log_level: str = typer.Option("info"),
    models: Models = Models(),
    decoding: GatewayDecoding = GatewayDecoding(),
) -> None:
    """Serve the OpenAI chat API on this device (POST /v1/chat/completions, GET /v1/models): the
    model name picks the method, the private context comes from --context-file only. The browser
    playground is served beside it at /playground (docs/playground.md)."""

    def run():
        import logging

        from costeer.cloud import read_api_keys
        from costeer.cloud.net import listen
        from costeer.gateway import GatewaySettings, check_bind, create_app, serve
        from costeer.device.transport import is_loopback
        from costeer.engine.prompts import load_context

        keys = read_api_keys(os.environ.get("COSTEER_GATEWAY_KEYS"), api_keys_file)
        settings = GatewaySettings(context_file=context_file, reference_file=reference_file, api_keys=keys,
                                   max_tokens_limit=max_tokens_limit, max_prompt_tokens=max_prompt_tokens,
                                   max_waiting=max_waiting)  # fmt: skip
        check_bind(host, settings)  # before loading the models
        _check_log_level(log_level)
        for f in (context_file, reference_file):  # read once now: a broken file would answer 503 to every request
            if f is not None:
                load_context(f)
        sock = listen(host, port)  # a port in use: one line now, not after the models load
        cs = _load_models(models, decoding.config(), list(Method))  # a request's model name picks any method
        logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
        page = playground and is_loopback(host)
        if playground and not page:
            typer.echo(f"warning: the playground is not served on {host} (not loopback: the page has no key)", err=True)
        app_ = create_app(cs, settings, routers=[_served_playground(cs, models)] if page else [])
        serve(app_, host, port, log_level, lambda url: typer.echo(
            f"costeer gateway: {url}/v1" + (f", playground {url}/playground/" if page else ""), err=True), sock=sock)

    _run_guarded(run)


LOG_LEVELS = ("debug", "info", "warning", "error", "critical")  # what both logging and uvicorn take


def _check_log_level(level: str) -> None:
    """--log-level checked before anything loads (logging and uvicorn would refuse it only after the
    models, uvicorn with a KeyError)."""
    if level.lower() not in LOG_LEVELS:
        raise ValueError(f"unknown --log-level '{level}' ({' | '.join(LOG_LEVELS)})")


def _served_playground(cs, models: Models):
    """The playground's router over the gateway's own pair (its pickers offer that pair only)."""
    from costeer.playground import Models as PlaygroundModels, PlaygroundSettings, playground_router

    settings = PlaygroundSettings(llm=models.llm, slm=models.slm, cloud=models.cloud)
    return playground_router(PlaygroundModels.serving(cs, settings))


@app.command()
@_with_options(models=LocalModels)
def playground(
    model: list[str] = typer.Option([], "--model", help="Another model the pickers offer (repeat); presets are offered anyway."),
    host: str = typer.Option("127.0.0.1", help="Interface to listen on (the page holds your context: keep it local)."),
    port: int = typer.Option(8770, min=0, max=65535, help="0: any free port."),
    cloud: Optional[str] = typer.Option(None, help="ws://HOST:PORT of `costeer serve`: the LLM runs there (key from "
                                        "COSTEER_API_KEY); the wire panel then shows the bytes."),
    cloud_k: CloudK = None,
    wire_dir: Optional[Path] = typer.Option(None, help="With --cloud: keep the wire log here (default: a temporary folder)."),
    log_level: str = typer.Option("warning"),
    models: LocalModels = LocalModels(),
) -> None:
    """A local web page: the LLM alone and steered side by side, a steering heat-map, the wire, chat
    mode (docs/playground.md). The same server as `costeer gateway`, with the page at / and no /v1 API."""

    def run():
        from costeer.engine.models import PRESETS
        from costeer.gateway import create_app, serve
        from costeer.playground import Models as PlaygroundModels, PlaygroundSettings, playground_router

        from costeer.device.transport import is_loopback

        _check_log_level(log_level)
        if wire_dir is not None and cloud is None:
            raise ValueError("--wire-dir keeps the exchange with the cloud: give --cloud too")
        if not is_loopback(host):  # the page takes no key and shows the private context
            raise ValueError(f"the playground serves loopback only ({host} is not): the page has no key and "
                             "shows your context; use `costeer gateway --host ... ` with keys for an API on a network")
        settings = PlaygroundSettings(llm=models.llm, slm=models.slm, models=(*model, *PRESETS), cloud=cloud,
                                      cloud_k=cloud_k, device=models.device, backend=models.backend,
                                      wire_dir=wire_dir)  # fmt: skip
        _quiet_libraries()
        app_ = create_app(None, routers=[playground_router(PlaygroundModels(settings), prefix="")])
        serve(app_, host, port, log_level,
              lambda url: typer.echo(f"costeer playground: {url}/ (Ctrl-C stops it)", err=True))

    _run_guarded(run)


@app.command("audit-wire")
def audit_wire(
    log: Path = typer.Argument(..., help="A file written by `generate --cloud ... --wire-log`."),
    context_file: Path = typer.Option(..., "--context-file", "-c", help="The private context to look for."),
    query: Optional[str] = typer.Option(None, "--query", "-q", help="The public query (default: noted in the log)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Report every word 5-gram of the context found on the wire outside the query and the answer (exit 1 if any)."""

    def run():
        from costeer.device.wire import audit_wire as audit
        from costeer.engine.prompts import load_context

        if not log.is_file():
            raise FileNotFoundError(f"wire log not found: {log}")
        _quiet_libraries()
        return audit(log, load_context(context_file), query)

    report = _run_guarded(run)
    if as_json:
        typer.echo(json.dumps(report.to_dict()))
    else:
        typer.echo(f"{report.records} records, {report.bytes_sent} bytes sent, {report.bytes_received} received; "
                   f"{report.context_ngrams} context 5-grams checked")  # fmt: skip
        for note in report.notes:
            typer.echo(f"note: {note}")
        typer.echo("no leak found" if report.clean else f"LEAK: {len(report.leaks)} context 5-grams on the wire:")
        for g in report.leaks:
            typer.echo(f"  {g}")
    if not report.clean:
        raise typer.Exit(1)


cache_app = typer.Typer(help="The private contexts' KV prefix cache (docs/prefix-cache.md).", no_args_is_help=True)
app.add_typer(cache_app, name="cache")


@cache_app.command("clear")
def cache_clear() -> None:
    """Remove every cached context from disk (the in-memory cache ends with its process)."""
    from costeer.engine import prefix_cache

    def run():
        directory = prefix_cache.default_directory()
        n, size = prefix_cache.clear(directory)
        typer.echo(f"removed {n} files ({size / 2**20:.1f} MiB) from {directory}")

    _run_guarded(lambda: _or_oserror(run))


@cache_app.command("new-key")
def cache_new_key(key_file: Optional[Path] = typer.Option(None, help="Default: COSTEER_CACHE_KEY_FILE, else "
                                                          "~/.config/costeer/cache.key.")) -> None:  # fmt: skip
    """Create the key that encrypts cached contexts on disk (never replaces an existing one)."""
    from costeer.engine import prefix_cache

    def run():
        path = key_file or Path(os.environ.get(prefix_cache.KEY_FILE_ENV) or prefix_cache.default_key_file())
        if path.exists():
            raise ValueError(f"{path} exists already: a new key would make the cached contexts unreadable")
        typer.echo(f"wrote {prefix_cache.write_key_file(path.expanduser())} (mode 0600)")

    _run_guarded(lambda: _or_oserror(run))


def _or_oserror(fn):
    """A file-system refusal (permissions, a full disk) as a user error."""
    try:
        return fn()
    except OSError as e:
        raise ValueError(f"{e.filename or ''}: {e.strerror or e}".lstrip(": ")) from None


def main() -> None:
    app()


if __name__ == "__main__":
    main()
