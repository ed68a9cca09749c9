"""The one exception type for bad input: its message is a single line that says what to do."""


class UserError(Exception):
    """Bad input (a path, a name, a shape, a setting). The CLI prints it on one line, exit 2."""


class TrainingDiverged(UserError):
    """A non-finite loss during training; carries where it happened."""

    def __init__(self, step: int, domain: str, last_checkpoint: str | None):
        self.step, self.domain, self.last_checkpoint = step, domain, last_checkpoint
        where = f"last good checkpoint: {last_checkpoint}" if last_checkpoint else "no checkpoint was written yet"
        super().__init__(
            f"non-finite loss at step {step} on domain '{domain}'; {where}; lower the learning rate or resume from it"
        )
