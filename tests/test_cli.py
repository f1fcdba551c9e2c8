"""The CLI on tiny model folders: JSON output for replay, and one-line errors for bad input."""

import json

import pytest
from typer.testing import CliRunner

from costeer.api import CoSteer
from costeer.cli import app
from costeer.engine.models import load_lm
from tests.tiny import bpe_tokenizer, disjoint_tokenizer, gemma3, llama

runner = CliRunner()


def _save(path, model, tok):
    model.config.eos_token_id = model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    tok = bpe_tokenizer()
    return {
        "llm": _save(root / "llm", llama(len(tok), seed=1), tok),
        "slm": _save(root / "slm", gemma3(len(tok), seed=2), tok),
        "alien": _save(root / "alien", llama(len(disjoint_tokenizer()), seed=3), disjoint_tokenizer()),
    }


@pytest.fixture()
def context_file(tmp_path):
    f = tmp_path / "me.yaml"
    f.write_text("name: Sam\ncity: Seattle\nlikes: [spicy tofu, running]\n")
    return f


def run(*args):
    return runner.invoke(app, list(args))


def test_generate_json_carries_everything_to_replay_a_run(folders, context_file):
    r = run("generate", "--llm", folders["llm"], "--slm", folders["slm"], "-q", "what should I cook",
            "--context-file", str(context_file), "--max-new-tokens", "8", "--json")  # fmt: skip
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(out["prompt_ids"]) == {"llm", "slm", "slm_context"}
    assert 1 <= len(out["token_ids"]) <= 8 and out["method"] == "costeer"
    assert out["coefficient"] == pytest.approx(1.7833, abs=1e-4)
    # replay through the API from the same files gives the same tokens and prompts
    cs = CoSteer(load_lm(folders["llm"], "cpu"), load_lm(folders["slm"], "cpu"))
    from costeer.engine.prompts import load_context

    g = cs.generate("what should I cook", load_context(context_file), "costeer", max_new_tokens=8)
    assert g.token_ids == out["token_ids"] and g.prompt_ids == out["prompt_ids"]


def test_generate_streams_text(folders):
    r = run("generate", "--llm", folders["llm"], "--method", "llm", "-q", "hello", "--max-new-tokens", "5")
    assert r.exit_code == 0, r.output
    assert r.stdout.strip()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--llm", "no-such-model", "--method", "llm", "-q", "hi"], "unknown model 'no-such-model'"),
        (["--method", "costeer", "-q", "hi", "--context-file", "/no/such/file.yaml"], "context file not found"),
        (["--method", "llm", "-q", "   "], "query is empty"),
        (["--method", "costeer", "-q", "hi"], "needs a personal context"),
        (["--method", "nope", "-q", "hi"], "nope"),
        (["-q", "hi", "--max-new-tokens", "0"], "max-new-tokens"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(args, message, folders):
    if "--llm" not in args:
        args = ["--llm", folders["llm"], "--slm", folders["slm"], *args]
    r = run("generate", *args)
    assert r.exit_code == 2
    assert message in r.output
    assert "Traceback" not in r.output


def test_incompatible_pair_is_one_line(folders, context_file):
    r = run("generate", "--llm", folders["llm"], "--slm", folders["alien"], "-q", "hi", "--context-file", str(context_file))
    assert r.exit_code == 2
    assert "share" in r.output and "Traceback" not in r.output
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1


def test_generate_and_eval_take_the_variant_options(folders, context_file, tmp_path):
    base = ["--llm", folders["llm"], "--slm", folders["slm"], "--max-new-tokens", "6"]
    q = ["-q", "what should I cook", "--context-file", str(context_file)]
    r = run("generate", *base, *q, "--method", "costeer_trust", "--epsilon", "0", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["method"] == "costeer_trust"
    assert out["config"]["steering"]["variant"] == {"tau": 0.1, "tau_pers": None, "epsilon": 0.0,
                                                    "repetition_penalty": 0.0, "no_repeat_ngram": 4}  # fmt: skip
    llm = json.loads(run("generate", *base, *q, "--method", "llm", "--json").stdout.strip().splitlines()[-1])
    assert out["token_ids"] == llm["token_ids"]  # ε = 0: no move away from the LLM

    r = run("generate", *base, *q, "--method", "costeer_guarded", "--tau", "0", "--epsilon", "inf",
            "--repetition-penalty", "0.5", "--no-repeat-ngram", "2", "--json")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout.strip().splitlines()[-1])["config"]["steering"]["variant"]["epsilon"] is None
    r = run("generate", *base, *q, "--method", "costeer_plausible", "--tau-pers", "0.1", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout.strip().splitlines()[-1])["config"]["steering"]["variant"]["tau_pers"] == 0.1
    r = run("generate", *base, *q, "--method", "costeer_plausible", "--tau", "2")
    assert r.exit_code == 2 and "Traceback" not in r.output

    run_dir = tmp_path / "run"
    ev = ["eval", "--task", "cogenesis", "--limit", "1", "--llm", folders["llm"], "--slm", folders["slm"],
          "--max-new-tokens", "4", "--device", "cpu", "--out", str(run_dir)]  # fmt: skip
    r = run(*ev, "--methods", "llm,costeer_trust", "--epsilon", "0")
    assert r.exit_code == 0, r.output
    assert json.loads((run_dir / "run.json").read_text())["steering"]["variant"]["epsilon"] == 0.0
    rows = {m: json.loads((run_dir / f"{m}.jsonl").read_text()) for m in ("llm", "costeer_trust")}
    assert rows["costeer_trust"]["token_ids"] == rows["llm"]["token_ids"]
    r = run(*ev, "--methods", "costeer_trust", "--epsilon", "0.5")  # other parameters: refused on resume
    assert r.exit_code == 2 and "steering.variant" in r.output


def test_generate_takes_a_reference_file_for_the_matched_method(folders, context_file, tmp_path):
    ref = tmp_path / "ref.yaml"
    ref.write_text("name: Alex\ncity: Boston\nlikes: [mild pasta, cycling]\n")
    base = ["--llm", folders["llm"], "--slm", folders["slm"], "--max-new-tokens", "6", "-q", "what should I cook",
            "--context-file", str(context_file)]  # fmt: skip
    r = run("generate", *base, "--method", "costeer_matched", "--reference-file", str(ref), "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(out["prompt_ids"]) == {"llm", "slm", "slm_reference", "slm_context"}
    from costeer.engine.prompts import load_context, user_message

    cs = CoSteer(load_lm(folders["llm"], "cpu"), load_lm(folders["slm"], "cpu"))
    g = cs.generate("what should I cook", load_context(context_file), "costeer_matched", max_new_tokens=6,
                    reference_message=user_message("what should I cook", load_context(ref)))  # fmt: skip
    assert g.token_ids == out["token_ids"] and g.prompt_ids == out["prompt_ids"]

    r = run("generate", *base, "--method", "costeer_matched", "--json")
    assert r.exit_code == 0 and "without --reference-file" in r.stderr
    for bad, message in [(["--method", "costeer", "--reference-file", str(ref)], "costeer_matched only"),
                         (["--method", "costeer_matched", "--reference-file", "/no/ref.yaml"], "not found")]:
        r = run("generate", *base, *bad)
        assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output


def test_demo_runs_every_shown_method_on_the_shipped_persona(folders):
    r = run("demo", "--llm", folders["llm"], "--slm", folders["slm"], "--max-new-tokens", "3", "--device", "cpu")
    assert r.exit_code == 0, r.output
    for m in ("llm", "costeer", "costeer_matched", "slm_context"):
        assert f"── {m}:" in r.output
    assert "Sam Okafor" in r.output and "Jordan Avery" not in r.output  # the reference is never printed


def test_generate_and_eval_share_one_declaration_of_their_common_options():
    """The Models and Decoding groups reach both commands, under the same names and defaults, and
    with no option given they are the library's own defaults."""
    import typer.main

    from costeer.cli import Decoding, Models, eval_, generate
    from costeer.engine.config import GenerationConfig

    def options(fn):
        return {p.name: p.default for p in typer.main.get_command_from_info(
            typer.models.CommandInfo(callback=fn), pretty_exceptions_short=True, rich_markup_mode=None).params}  # fmt: skip

    gen, ev = options(generate), options(eval_)
    shared = {f for cls in (Models, Decoding) for f in cls.__dataclass_fields__}
    assert shared <= set(gen) and shared <= set(ev)
    assert {k: gen[k] for k in shared} == {k: ev[k] for k in shared}
    assert Decoding().config() == GenerationConfig()
    assert Decoding(tau=0.0, gate=0.5).config().steering.variant.tau == 0.0


def test_chat_gateway_and_playground_take_the_same_groups():
    """chat and gateway take Models and Decoding (the gateway's budget default is its own), the
    playground the in-process model options: one declaration each, the same names and defaults."""
    import typer.main

    from costeer.cli import Decoding, LocalModels, Models, chat, gateway, generate, playground

    def options(fn):
        return {p.name: p.default for p in typer.main.get_command_from_info(
            typer.models.CommandInfo(callback=fn), pretty_exceptions_short=True, rich_markup_mode=None).params}  # fmt: skip

    gen, ch, gw, pg = options(generate), options(chat), options(gateway), options(playground)
    shared = {f for cls in (Models, Decoding) for f in cls.__dataclass_fields__}
    assert {k: ch[k] for k in shared} == {k: gen[k] for k in shared}
    assert {k: gw[k] for k in shared - {"max_new_tokens"}} == {k: gen[k] for k in shared - {"max_new_tokens"}}
    assert gw["max_new_tokens"] == 256 and gen["max_new_tokens"] == Decoding().max_new_tokens
    local = set(LocalModels.__dataclass_fields__)
    assert {k: pg[k] for k in local} == {k: gen[k] for k in local}
    assert not (set(Models.__dataclass_fields__) - local - {"cloud", "cloud_k"}) & set(pg)  # no option it would ignore


@pytest.mark.parametrize("env, exact", [(None, True), ("on", False)])
def test_eval_cuts_cached_prefixes_exactly_unless_told(folders, tmp_path, monkeypatch, env, exact):
    """An evaluation's outputs must not depend on the prefix cache: eval defaults to its exact cut."""
    import costeer.eval.runner as runner

    seen = {}

    def fake_run_eval(cs, *a, **kw):
        seen["exact"] = cs.prefix_cache.config.exact
        raise ValueError("stopped by the test")

    monkeypatch.setattr(runner, "run_eval", fake_run_eval)
    if env is None:
        monkeypatch.delenv("COSTEER_PREFIX_CACHE", raising=False)
    else:
        monkeypatch.setenv("COSTEER_PREFIX_CACHE", env)
    r = run("eval", "--task", "cogenesis", "--limit", "1", "--llm", folders["llm"], "--slm", folders["slm"],
            "--methods", "costeer", "--device", "cpu", "--out", str(tmp_path / "run"))  # fmt: skip
    assert r.exit_code != 0 and "stopped by the test" in r.output
    assert seen == {"exact": exact}
