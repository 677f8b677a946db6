"""docs/reference/errors.md: every stable error code with what it means, the hint that comes
with it, whether retrying can help, the CLI's exit code and the gRPC status, from the error
registry (backpropagate_api.errors)."""

from __future__ import annotations

from backpropagate.reference.markdown import generated_header, table
from backpropagate_api.errors import all_error_classes

EXIT_MEANINGS = {1: "1 (user error)", 2: "2 (runtime error)", 3: "3 (partial failure)"}
INTRO = """Every error Backpropagate raises on purpose has one of these codes: in the CLI's
`error CODE: message` line, in `BackpropagateError.code` (with `.hint`, `.retryable` and
`.context`), in a run's or an export's record, and in the details of a gRPC status, from which
the client raises the same class again. `INTERNAL` is a bug: please report it with the log
reference it names. docs/troubleshooting.md goes from a symptom to its code.

"""


def errors_page() -> str:
    classes = sorted(all_error_classes(), key=lambda cls: cls.code)
    rows = [
        (
            f"`{cls.code}`",
            " ".join((cls.__doc__ or "").split()),
            cls.default_hint,
            "yes" if cls.retryable else "no",
            EXIT_MEANINGS.get(cls.exit_code, str(cls.exit_code)),
            cls.grpc_status,
            f"`{cls.__name__}`",
        )
        for cls in classes
    ]
    headers = ["code", "meaning", "hint", "retryable", "exit code", "gRPC status", "class"]
    return (
        generated_header("Error codes", "the error registry, proto/backpropagate_api/errors.py")
        + INTRO
        + table(headers, rows)
    )
