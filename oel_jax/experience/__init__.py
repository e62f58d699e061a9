"""Server side, stage 1: extracting experiential knowledge from trajectories.

The model reads its own trajectories and writes down transferable knowledge, one trajectory at a
time, each extraction appended to what came before (arXiv:2603.16856, Eq. 1 and Appendix B.2-B.3;
DESIGN.md section 5.2):

    e_i = truncate(e_{i-1} + extract(tau_i, e_{i-1}), L_max),   i = 1..n

K such accumulations with different seeds form the knowledge set C that consolidation draws from.

    config = ExtractionConfig(knowledge_format="structured", num_trajectories=25, num_runs=10)
    pool = load_pool("round1/extract.jsonl")
    state = run_extraction(pool, config, sampler=sampler, tokenizer=tokenizer,
                           out_dir="round1/knowledge")
    knowledge = load_knowledge_set("round1/knowledge").texts      # K strings

What each piece does, and how it follows the official implementation (microsoft/LMOps,
``oel/verl/verl/trainer/ppo/ray_trainer.py``, ``_validate_textgame`` and ``_truncate_experience``;
``oel/scripts/textgame_extract*.sh`` and ``oel/usage_example.sh`` for the settings):

- `format_trajectory`: our games (`format_game`): each turn as ``\\nRound{i}_Input:
  <observation>\\n\\nRound{i}_Output: <response>`` (``i`` from 0; the response as recorded,
  reasoning included), then ``\\n\\n\\n<final feedback>\\n`` (the official
  ``textgame_wfeedback=True``, every script's setting).
  `Turn.observation` already has the rules paragraph removed, as the official code does for turn 0.
  A trajectory that is not one of our games (a recorded conversation; `is_game`) is read by
  `format_conversation` (``User:`` / ``Assistant:`` turns, the result and the feedback) and
  extracted with our generic templates (``oel_jax/prompts/extraction_*_conversation.txt``, not
  the paper's; see ``oel_jax/prompts/README.md``).
- `extraction_prompt`: the paper's Figure 10 (structured) or 11 (unstructured) template
  (`oel_jax.prompts`), filled with that text and the knowledge so far, or with ``No previous
  experience.`` when there is none yet or when `ExtractionConfig.with_previous` is off (the
  official ``exp_sel_with_prev``; off for Qwen3-1.7B). Sent as one user message through the
  tokenizer's chat template, thinking on or off (`ExtractionConfig.enable_thinking`).
- `parse_extraction`: the reasoning is dropped (the text after the last ``</think>``); then
  structured: every ``- EXPERIENCE ITEM:`` on a line that contains one starts an item (text before
  the first marker on the line is dropped, a line with two markers gives two items, items with
  no text are dropped, trailing spaces removed); unstructured: the whole answer, stripped.
- `accumulate`: ``e_{i-1} + "\\n" + new`` (either side may be empty; an empty extraction leaves the
  knowledge as it was).
- `truncate_knowledge`: above L_max tokens, keep the newest whole items whose token counts
  (each item counted with a trailing newline) sum to at most L_max. Items are lines starting with
  the marker (with any continuation lines) for structured knowledge, single lines for
  unstructured knowledge (as officially). The result never exceeds L_max tokens.
- K runs (`ExtractionConfig.num_runs`): step ``i`` of every run goes to the extractor in **one**
  batched generation call. Sampling: temperature 0.7, top-p 0.8, top-k 20 (the official scripts'
  ``val_kwargs``, used for extraction), at most L_max new tokens (the official extractor's
  ``max_response_length`` is L_max).

Which trajectories each run reads. Officially every run plays its own n games (the same n
boards, in the same order, for every run; the runs differ by their sampling seed, so their games
and extractions differ) and extracts from each game right after playing it. Here the games are
played beforehand and read from trajectory files (the pool), and `ExtractionConfig.pool_order`
says how each run draws its n: ``"shuffle"`` (default) permutes the whole pool with the run's
seed and takes the first n, so every run reads its own order (and, with a pool larger than n,
its own subset); ``"chunks"`` gives run k the k-th block of n trajectories in file order, which is
the official arrangement when the pool holds K plays of the same n boards, run by run.

Resumability. `ExtractionState` (config, each run's trajectory order, step index, knowledge so
far, per-step statistics) is JSON-serialisable (`ExtractionState.to_json` / `from_json`), and
`extraction_step` advances it by one accumulation step. Each step's sampling seed comes from
``(config.seed, step)`` only, so resuming from a saved state gives the same result as an
uninterrupted run. `run_extraction` with ``out_dir`` saves the state after every step
(atomically) and continues from it when called again.

Knowledge set files (`write_knowledge_set`, `load_knowledge_set`): ``knowledge_{k}.txt`` per run
(UTF-8, exactly the knowledge text) and ``manifest.json`` (config, orders, per-step statistics),
all written atomically, the manifest last (its presence means the set is complete).

An extraction that yields nothing (no items, only reasoning) is recorded in the statistics
(``empty``) and the run's knowledge stays as it was; it is not an error.

A reply whose ``<think>`` block never closed (the token budget ran out mid-reasoning) is kept
as raw text, as the official code keeps it: unstructured, the whole reply (stripped) is the
new knowledge; structured, its ``- EXPERIENCE ITEM:`` lines are parsed out of it. Such replies
are counted (``unterminated_reasoning`` per run and step).

Differences from the official code, on purpose: an empty final feedback adds no text
(officially ``"\\n\\n\\n\\n"``); the extractor prompt is never cut (officially it is
right-truncated at ``max_prompt_length``), so the sampler's ``max_seq_len`` must hold it plus the
new tokens (it raises otherwise).
"""

from oel_jax.experience.config import (FORMATS, POOL_ORDERS, PROMPT_VARIANTS,
                                       ExtractionConfig)
from oel_jax.experience.files import (KNOWLEDGE_FILE, MANIFEST_FILE, MANIFEST_KIND,
                                      MANIFEST_VERSION, KnowledgeSet, load_knowledge_set,
                                      load_state, save_state, write_knowledge_set)
from oel_jax.experience.run import (SNAPSHOT_DIR, STATE_FILE, Conversation, ReplyFn,
                                    extraction_step, run_extraction, sampler_generate)
from oel_jax.experience.state import (STATE_KIND, STATE_VERSION, ExtractionState, load_pool,
                                      plan_orders, pool_digest, start_extraction, step_seed)
from oel_jax.experience.text import (ITEM_PREFIX, NO_PREVIOUS, accumulate, count_tokens,
                                     drop_reasoning, extraction_prompt, format_conversation,
                                     format_game, format_trajectory, is_game, parse_extraction,
                                     parse_items, prompt_template, split_items,
                                     truncate_knowledge)

__all__ = [
    "FORMATS", "POOL_ORDERS", "PROMPT_VARIANTS", "ExtractionConfig", "KNOWLEDGE_FILE",
    "MANIFEST_FILE", "MANIFEST_KIND", "MANIFEST_VERSION", "KnowledgeSet",
    "load_knowledge_set", "load_state", "save_state", "write_knowledge_set", "SNAPSHOT_DIR",
    "STATE_FILE", "Conversation", "ReplyFn", "extraction_step", "run_extraction",
    "sampler_generate", "STATE_KIND", "STATE_VERSION", "ExtractionState", "load_pool",
    "plan_orders", "pool_digest", "start_extraction", "step_seed", "ITEM_PREFIX",
    "NO_PREVIOUS", "accumulate", "count_tokens", "drop_reasoning", "extraction_prompt",
    "format_conversation", "format_game", "format_trajectory", "is_game", "parse_extraction",
    "parse_items", "prompt_template", "split_items", "truncate_knowledge",
]
