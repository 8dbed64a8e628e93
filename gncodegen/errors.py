"""Errors gncodegen reports to its users, each a one-line message."""


class GncodegenError(Exception):
    """Base of every error the CLI turns into a one-line message."""

    exit_code = 2


class SpecError(GncodegenError):
    """A spec violates a rule; the message names the field and the rule."""

    def __init__(self, field: str, rule: str):
        self.field = field
        self.rule = rule
        super().__init__(f"{field}: {rule}" if field else rule)


class TargetUnavailable(GncodegenError):
    """A target (or a feature of one) cannot be produced on this machine or at all."""


class BuildError(GncodegenError):
    """A compiler failed; carries the command line and the compiler's output."""

    def __init__(self, what: str, command: list[str], output: str):
        self.command = command
        self.output = output
        super().__init__(f"{what}: compile failed: {' '.join(command)}\n{output.strip()}")


class VerificationError(GncodegenError):
    """Generated code disagreed with the reference."""

    exit_code = 1
