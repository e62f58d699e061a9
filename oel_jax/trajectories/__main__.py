"""Recorded experience -> a trajectory file.

    python -m oel_jax.trajectories import --input chats.jsonl [more.jsonl ...] \\
        --output trajectories.jsonl [--model_name NAME] [--env_id chat] [--skip_invalid]
    python -m oel_jax.trajectories served --workdir SERVE_DIR [--until TIME] \\
        --output trajectories.jsonl

``import`` reads OpenAI-format chat logs (`oel_jax.trajectories.chat_logs`); ``served`` reads a
serve workdir's log up to ``--until`` (unix seconds or an ISO 8601 time, UTC unless it names a
zone; default: all). Both print a summary of what was read and left out, and write the file
atomically. A malformed line stops with ``error: <file>:<line>: <field>: <problem>`` and exit
code 2 (``import --skip_invalid`` skips and counts such lines instead).
"""

from __future__ import annotations

import argparse
import sys

from oel_jax.envs import write_trajectories
from oel_jax.errors import InputError
from oel_jax.trajectories.chat_logs import import_chat_logs
from oel_jax.trajectories.records import parse_time
from oel_jax.trajectories.served import load_served


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m oel_jax.trajectories",
                                   description="Recorded experience -> a trajectory file.")
  commands = parser.add_subparsers(dest="command", required=True)
  imp = commands.add_parser("import", help="OpenAI-format chat logs (JSONL)")
  imp.add_argument("--input", nargs="+", required=True, help="chat-log JSONL files")
  imp.add_argument("--output", required=True, help="the trajectory file to write")
  imp.add_argument("--model_name", default="", help="model name for lines naming none")
  imp.add_argument("--env_id", default="chat", help="env.id of the trajectories")
  imp.add_argument("--skip_invalid", action="store_true",
                   help="skip malformed lines (counted) instead of stopping")
  served = commands.add_parser("served", help="a serve workdir's log")
  served.add_argument("--workdir", required=True, help="the server's --workdir")
  served.add_argument("--until", default="", help="cut-off: unix seconds or ISO 8601 time")
  served.add_argument("--output", required=True, help="the trajectory file to write")
  return parser


def main(argv: list[str] | None = None) -> int:
  """Runs the command; returns the exit code."""
  args = _parser().parse_args(argv)
  try:
    if args.command == "import":
      trajectories, summary = import_chat_logs(args.input, env_id=args.env_id,
                                               model_name=args.model_name,
                                               skip_invalid=args.skip_invalid)
      text = summary.describe()
    else:
      try:
        until = parse_time(args.until) if args.until else None
      except ValueError as e:
        raise InputError(f"--until: {e}") from None
      log = load_served(args.workdir, until)
      trajectories, text = log.trajectories, log.describe()
    count = write_trajectories(args.output, trajectories)
  except (InputError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(text)
  print(f"wrote {count} trajectories to {args.output}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
