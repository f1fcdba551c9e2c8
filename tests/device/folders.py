"""Tiny models saved as folders (what `costeer serve --llm PATH` and the CLI load)."""

from tests.tiny import bpe_tokenizer, gemma3, llama


def save(path, model, tok) -> str:
    model.config.eos_token_id = model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def tiny_folders(root) -> dict[str, str]:
    tok = bpe_tokenizer()
    return {"llm": save(root / "llm", llama(len(tok), seed=1), tok), "slm": save(root / "slm", gemma3(len(tok), seed=2), tok)}
