"""Recorded experience as trajectory records: imported chat logs and the serve workdir's log.

- `import_chat_logs` (`chat_logs.py`): OpenAI-format chat logs (JSONL of ``{"messages": [...],
  "feedback"?, "reward"?, "success"?, "model"?, "id"?}``) -> one `oel_jax.envs.Trajectory` per
  line, one turn per assistant reply, in the ``"chat"`` prompt format; an `ImportSummary` of
  what was imported and left out, and why.
- `read_served` / `load_served` (`served.py`): ``<workdir>/served.jsonl`` and
  ``feedback.jsonl`` of `oel_jax.serve` -> one trajectory per conversation, up to a cut-off.
- `LogError`: a malformed log line, named by file, line and field.

The command line (``python -m oel_jax.trajectories``) writes either as a trajectory file;
the loop reads them directly with ``config.collect.source = "files"`` (`oel_jax.stages.collect`).
"""

from oel_jax.trajectories.chat_logs import ImportSummary, import_chat_logs
from oel_jax.trajectories.records import LogError, outcome_of, parse_time
from oel_jax.trajectories.served import (FEEDBACK_FILE, SERVED_FILE, ServedLog, load_served,
                                         read_served)

__all__ = ["ImportSummary", "import_chat_logs", "LogError", "outcome_of", "parse_time",
           "FEEDBACK_FILE", "SERVED_FILE", "ServedLog", "load_served", "read_served"]
