"""The one base of the errors a user can cause and fix (a bad model spec, two tokenizers that share
too little, an unreachable or refusing cloud, a missing dataset file…). The CLI prints the first
line of any of them and exits with 2; library callers may catch this one type. Each subclass also
keeps the builtin base it had (ValueError, RuntimeError, FileNotFoundError), so existing
`except ValueError` code still catches it. Imports nothing: every layer may raise these."""


class CoSteerError(Exception):
    """A user-facing error: its message is one clear line."""
