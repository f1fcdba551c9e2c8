"""One base for the errors a user can cause: every such error is a CoSteerError (the CLI's one
catch) and keeps the builtin base that existing `except` clauses rely on."""

import pytest
from typer.testing import CliRunner

from costeer.device import CloudError
from costeer.engine.llamacpp import LlamaCppError
from costeer.engine.models import ModelLoadError
from costeer.engine.vocab import IncompatibleVocabularies
from costeer.errors import CoSteerError
from costeer.eval.tasks import TaskFileNotFoundError


@pytest.mark.parametrize(
    "cls, builtin",
    [(CloudError, ValueError), (LlamaCppError, RuntimeError), (ModelLoadError, ValueError),
     (IncompatibleVocabularies, ValueError), (TaskFileNotFoundError, FileNotFoundError)],
)  # fmt: skip
def test_user_errors_share_one_base_and_keep_theirs(cls, builtin):
    assert issubclass(cls, CoSteerError) and issubclass(cls, builtin)


def test_the_cli_prints_any_of_them_as_one_line(monkeypatch):
    """A CoSteerError that is no ValueError (llama.cpp's) still ends in one line and exit 2."""
    import costeer.cli as cli

    def boom(*a, **kw):
        raise LlamaCppError("llama.cpp could not load the model\nsecond line")

    monkeypatch.setattr(cli, "_load_for", boom)
    r = CliRunner().invoke(cli.app, ["generate", "-q", "hi", "--method", "llm"])
    assert r.exit_code == 2 and "error: llama.cpp could not load the model" in r.output
    assert "second line" not in r.output and "Traceback" not in r.output
