"""`costeer cache` and the CLI's use of the prefix cache: a second `generate` with the same context file
restores the context's state from the encrypted file the first one wrote."""

import json
import stat

from typer.testing import CliRunner

from costeer.cli import app
from costeer.engine import prefix_cache as pc
from tests.test_cli import context_file, folders  # noqa: F401 (fixtures)

runner = CliRunner()


def test_second_generate_restores_the_context_and_clear_removes_it(folders, context_file, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("COSTEER_CACHE_DIR", str(tmp_path / "cache"))
    key_file = tmp_path / "cfg" / "cache.key"
    monkeypatch.setenv("COSTEER_CACHE_KEY_FILE", str(key_file))
    monkeypatch.delenv("COSTEER_CACHE_KEY", raising=False)
    made = runner.invoke(app, ["cache", "new-key"])
    assert made.exit_code == 0 and stat.S_IMODE(key_file.stat().st_mode) == 0o600
    again = runner.invoke(app, ["cache", "new-key"])
    assert again.exit_code == 2 and "exists already" in again.output

    lookups = []
    real_lookup = pc.PrefixCache.lookup

    def spy(self, identity, tokens, codec):
        state = real_lookup(self, identity, tokens, codec)
        lookups.append(state is not None)
        return state

    monkeypatch.setattr(pc.PrefixCache, "lookup", spy)
    args = ["generate", "-q", "Plan my weekend.", "-c", str(context_file), "--llm", folders["llm"], "--slm",
            folders["slm"], "--max-new-tokens", "6", "--json"]  # fmt: skip
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    files = list((tmp_path / "cache" / "prefix").glob("*.kv"))
    assert len(files) == 1 and b"Seattle" not in files[0].read_bytes()
    second = runner.invoke(app, args)  # a new CoSteer, nothing in memory: the file serves it
    assert second.exit_code == 0 and lookups == [False, True]
    ids = [json.loads(r.output.splitlines()[-1])["token_ids"] for r in (first, second)]
    assert ids[0] == ids[1]

    cleared = runner.invoke(app, ["cache", "clear"])
    assert cleared.exit_code == 0 and "removed 2 files" in cleared.output
    assert not list((tmp_path / "cache" / "prefix").iterdir())
