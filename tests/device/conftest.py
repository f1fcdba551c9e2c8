from tests.cloud.conftest import _own_cache, server, tiny_llm, tiny_slm  # noqa: F401 (fixtures)
