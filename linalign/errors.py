"""One exception type for everything a user can get wrong."""


class LinalignError(ValueError):
    """Bad input or an unusable model, with a message that names the problem and the rule; `param`: the knob or
    field at fault, where there is one (`linalign.params`), so that the server's 400 can name it."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param
