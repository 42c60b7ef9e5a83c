"""The one error type all input checks raise."""


class ValidationError(ValueError):
    """Bad user input; the message is meant for the user: it names the problem and the limit, and never a
    server path or an internal exception text."""
