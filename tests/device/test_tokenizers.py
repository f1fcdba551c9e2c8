"""The device's tokenizer cache (costeer.device.tokenizers): what a cloud's tokenizer files may write."""

import threading

from costeer.cloud.server import tokenizer_files
from costeer.device import tokenizers
from costeer.frames import tokenizer_fingerprint
from tests.tiny import bpe_tokenizer


def test_two_stores_at_once_in_one_process_write_to_folders_of_their_own(tmp_path, monkeypatch):
    """Two connects to one cloud from two threads: each writes the files to its own temporary folder
    (they were named by process id, so one thread's cleanup removed the other's files), and both get the tokenizer."""
    monkeypatch.setenv("COSTEER_CACHE_DIR", str(tmp_path / "cache"))
    tok = bpe_tokenizer()
    fp = tokenizer_fingerprint(tok)
    files = tokenizer_files(tok)  # what the cloud's /v1/tokenizer sends
    load, folders, both_in = tokenizers._load_checked, [], threading.Barrier(2)

    def load_when_both_wrote(folder, fingerprint):
        folders.append(folder)
        both_in.wait(10)  # both stores have written their files before either loads (and cleans up)
        return load(folder, fingerprint)

    monkeypatch.setattr(tokenizers, "_load_checked", load_when_both_wrote)
    got, errors = [], []

    def store():
        try:
            got.append(tokenizers.store_tokenizer(fp, files))
        except Exception as e:  # noqa: BLE001 - collected for the assertion
            errors.append(e)

    threads = [threading.Thread(target=store) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and len(got) == 2 and all(tokenizer_fingerprint(t) == fp for t in got)
    assert len(set(folders)) == 2
    assert [p.name for p in (tmp_path / "cache" / "tokenizers").iterdir()] == [fp]  # nothing left behind
