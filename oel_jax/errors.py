"""The error type for bad input: a config value, a checkpoint, a trajectory or knowledge file.

Every error a user can fix by changing what they passed in derives from `InputError`, and its
message names what is wrong and where (the config field, the file and line). The command line
(`oel_jax.main`) prints such an error as one line, ``error: <message>``, and exits with code 2;
anything else is a bug and keeps its traceback.
"""


class InputError(ValueError):
  """Bad input, named in the message: the field, file or line, and what is wrong with it."""


def one_line(error: BaseException) -> str:
  """The error's message on one line (a multi-line message's lines joined by "; ")."""
  parts = [line.strip() for line in str(error).splitlines() if line.strip()]
  text = "; ".join(parts) if parts else type(error).__name__
  return text.replace(":;", ":")
