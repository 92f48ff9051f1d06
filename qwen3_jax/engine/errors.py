"""What the engines refuse with, typed, so that each caller says it in its own words: the library raises
them as they are, the command line exits 2 on the Invalid ones, and the server maps each type to its API
family's status and body through one table (serve/errors.py). Beside these: the tokenizer's TooLong (a row
over max_length, truncation not allowed) and, for work submitted to a scheduler, its Overloaded,
ShuttingDown and BatchFailed (serve/scheduler.py)."""

from __future__ import annotations

from qwen3_jax.checks import UsageError


class Invalid(UsageError):
    """An input the engine cannot take (an empty text, an unknown prompt, a token id outside the
    vocabulary, a width outside the model's). `reason` is a short name of the problem ("empty_input",
    "invalid_prompt", ...), `param` the argument at fault (None: the request as a whole)."""

    def __init__(self, message: str, *, reason: str, param: str | None = None):
        super().__init__(message)
        self.reason, self.param = reason, param


class NotServed(Invalid):
    """A model asked for that is not loaded here."""

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message, reason="model_not_found", param=param)


class TooManyCharacters(Invalid):
    """A text over the character bound put on what one text may cost the tokenizer, truncation not
    allowed (TooLong is the same refusal counted in tokens)."""

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message, reason="context_length_exceeded", param=param)


class RequestTooLarge(Exception):
    """A request of more tokens (`tokens`) than the queue holds at all (`limit`): it can never be taken."""

    def __init__(self, tokens: int, limit: int):
        super().__init__(f"the request holds {tokens} tokens, more than the queue holds at once ({limit})")
        self.tokens, self.limit = tokens, limit
