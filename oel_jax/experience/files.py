"""Extraction files: the saved state, and knowledge sets (one text per run and a manifest)."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

from oel_jax import distributed
from oel_jax.atomic_write import atomic_write_text
from oel_jax.experience.state import ExtractionState

MANIFEST_FILE = "manifest.json"
"""A knowledge set's manifest; present only when the set was written completely."""
KNOWLEDGE_FILE = "knowledge_{}.txt"
"""A knowledge set's file for run ``k``."""

MANIFEST_KIND = "oel_jax.knowledge_set"
MANIFEST_VERSION = 1


@distributed.writer_only
def save_state(path: str | os.PathLike[str], state: ExtractionState) -> None:
  """Writes the state as JSON, atomically (on process 0: `oel_jax.distributed.writer_only`)."""
  atomic_write_text(path, state.to_json())


def load_state(path: str | os.PathLike[str]) -> ExtractionState:
  """Reads a state written by `save_state`; errors name the file."""
  path = os.fspath(path)
  with open(path, encoding="utf-8") as f:
    text = f.read()
  try:
    return ExtractionState.from_json(text)
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from None


@distributed.writer_only
def write_knowledge_set(folder: str | os.PathLike[str], state: ExtractionState) -> list[str]:
  """Writes ``knowledge_{k}.txt`` per run and then ``manifest.json`` into ``folder``.

  Any old manifest is removed first, so a manifest is only ever next to the files it names.
  On several processes, process 0 writes and the others wait: `oel_jax.distributed.writer_only`.

  Returns:
    The knowledge file paths, by run (None on processes other than 0).
  """
  folder = os.fspath(folder)
  os.makedirs(folder, exist_ok=True)
  manifest_path = os.path.join(folder, MANIFEST_FILE)
  if os.path.exists(manifest_path):
    os.unlink(manifest_path)
  names = [KNOWLEDGE_FILE.format(k) for k in range(len(state.knowledge))]
  for name, text in zip(names, state.knowledge):
    atomic_write_text(os.path.join(folder, name), text)
  last = state.history[-1]["runs"] if state.history else []
  manifest = {
      "kind": MANIFEST_KIND, "version": MANIFEST_VERSION, "files": names,
      "steps": state.step, "complete": state.done,
      "knowledge_tokens": [r["knowledge_tokens"] for r in last],
      "knowledge_items": [r["knowledge_items"] for r in last],
      "empty_extractions": sum(r["empty"] for h in state.history for r in h["runs"]),
      "unterminated_replies": sum(bool(r.get("unterminated_reasoning"))
                                  for h in state.history for r in h["runs"]),
      "config": state.config.to_dict(), "orders": [list(o) for o in state.orders],
      "pool_size": state.pool_size, "pool_digest": state.pool_digest,
      "history": [dict(h) for h in state.history],
  }
  atomic_write_text(manifest_path, json.dumps(manifest, ensure_ascii=False, indent=1) + "\n")
  return [os.path.join(folder, name) for name in names]


@dataclasses.dataclass(frozen=True)
class KnowledgeSet:
  """A knowledge set read from files: the K knowledge texts and their manifest."""

  texts: tuple[str, ...]
  """The knowledge texts, by run (a text may be "" when a run extracted nothing)."""

  manifest: Mapping[str, Any]
  """The manifest's JSON data ({} for a single text file)."""

  path: str
  """The folder (or file) it was read from."""

  def __len__(self) -> int:
    return len(self.texts)


def load_knowledge_set(path: str | os.PathLike[str]) -> KnowledgeSet:
  """Reads a knowledge set folder written by `write_knowledge_set` (or one ``.txt`` file).

  Raises:
    FileNotFoundError: the folder has no manifest (not a knowledge set, or one whose writing
      was interrupted) or a file it names is missing.
    ValueError: the manifest is malformed.
  """
  path = os.fspath(path)
  if os.path.isfile(path):
    with open(path, encoding="utf-8") as f:
      return KnowledgeSet(texts=(f.read(),), manifest={}, path=path)
  manifest_path = os.path.join(path, MANIFEST_FILE)
  if not os.path.isfile(manifest_path):
    raise FileNotFoundError(
        f"{path}: not a knowledge set ({MANIFEST_FILE} missing; if an extraction was "
        "interrupted there, run it again to finish)")
  try:
    with open(manifest_path, encoding="utf-8") as f:
      manifest = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{manifest_path}: invalid JSON: {e}") from None
  if not isinstance(manifest, dict) or manifest.get("kind") != MANIFEST_KIND:
    raise ValueError(f"{manifest_path}: not a knowledge set manifest (kind must be "
                     f"{MANIFEST_KIND!r})")
  files = manifest.get("files")
  if (not isinstance(files, list) or not files or
      not all(isinstance(n, str) and n and os.path.basename(n) == n for n in files)):
    raise ValueError(f"{manifest_path}: files: expected a non-empty list of file names")
  texts = []
  for name in files:
    file_path = os.path.join(path, name)
    if not os.path.isfile(file_path):
      raise FileNotFoundError(f"{manifest_path}: names {name}, which is missing")
    with open(file_path, encoding="utf-8") as f:
      texts.append(f.read())
  return KnowledgeSet(texts=tuple(texts), manifest=manifest, path=path)
