"""Token-level divergences for on-policy context distillation (DESIGN.md section 5.3).

Pure, jittable library functions. Shapes follow one convention throughout: logits are
`[B, T, V]` (any leading dimensions work: `[..., V]`), masks are `[B, T]` (the logits'
leading dimensions), per-token values are `[B, T]`, and means are float32 scalars. Inputs may
be any float dtype; every computation on logits runs in float32.

The divergences, per token position, with `T` the sampling temperature applied to both
models' logits and log-softmax taken over the full vocabulary:

    ls = log_softmax(student_logits / T)      lt = log_softmax(teacher_logits / T)

- `topk_reverse_kl` (OEL's consolidation loss; the official code's `kl_loss_type=full`,
  `kl_topk=256`, `on_policy_merge=True`): S = the student's top-k indices of `ls`, chosen
  under `stop_gradient`;

      D = sum_{i in S} exp(ls_i) * (ls_i - lt_i).

  Gradients flow through both `exp(ls)` and `ls`; the teacher gets none. There is no
  renormalisation over S unless `renormalize=True`, which replaces `ls` and `lt` on S by
  their log-softmax over S (both distributions renormalised to sum to one on S).
  `k=0`, or `k >= V`, is the exact full-vocabulary reverse KL.

  The truncated sum is no divergence: it can be negative, and its minimum is not at
  student == teacher (it also pushes mass into S). `tail=True` (opt-in; not the official
  loss) adds one bucket for the mass outside S, i.e. the exact KL between the two
  distributions coarse-grained to S plus a tail,

      D = sum_{i in S} p_i (ls_i - lt_i) + p_tail (log p_tail - log q_tail),

  with p = exp(ls), q = exp(lt), p_tail = 1 - sum_S p, q_tail = 1 - sum_S q: >= 0, and 0
  exactly when the coarse-grained distributions agree. The tail log-masses are log-sum-exps
  over the complement of S (never `log(1 - sum)`, which float32 rounds to log 0 when S holds
  nearly all the mass); a tail of mass 0 contributes 0. It cannot be combined with
  `renormalize` (renormalised over S there is no tail). The union form takes it too; the
  forward KL does not.
- `union_topk_reverse_kl` (the official `kl_merge_indice=True` ablation): the same sum over
  S = (student top-k) union (teacher top-k), each index counted once.
- `forward_kl` (off-policy context distillation, the paper's baseline; the official code's
  `on_policy_merge=False`): the tokens were sampled by the teacher, and per position

      D = sum_{i in S} exp(lt_i) * (lt_i - ls_i)      (KL(teacher || student))

  with S = the teacher's top-k of `lt` (`k=0` or `k >= V`: the full vocabulary). Gradient
  flows through `ls` only.

Token means (`topk_reverse_kl`, ...) are `sum(mask * D) / sum(mask)` over the whole batch
("token-mean"); an all-zero mask gives 0 (and zero gradient), not NaN.

For training at Qwen3's vocabulary (151,936) the `*_from_hidden` forms take the final hidden
states and the unembedding instead of logits and never hold `[B, T, V]` logits. The forward
pass works through the flattened tokens in chunks of `chunk_size` (each chunk's logits a
float32-accumulated matmul) and keeps only per-token residuals (the support, the gradient on
it, log-normalisers). The backward pass is a custom VJP that recomputes the student's logits
in `[chunk_size, vocab_chunk_size]` blocks, vocabulary tiles outer and token chunks inner (the
pattern of MaxText's vocabulary tiling), so that each tile of the unembedding's gradient is
accumulated in float32 over all tokens and written once. They give the same values and
gradients as the logits forms.
"""

from oel_jax.losses.checks import (DIVERGENCES, FORWARD_KL, TOPK_REVERSE_KL,
                                   UNION_TOPK_REVERSE_KL)
from oel_jax.losses.hidden import (TokenStats, per_token_divergence_from_hidden,
                                   topk_reverse_kl_from_hidden)
from oel_jax.losses.logits import (entropy_from_log_probs, entropy_from_logits, forward_kl,
                                   forward_kl_per_token, masked_mean, per_token_divergence,
                                   topk_reverse_kl, topk_reverse_kl_per_token,
                                   union_topk_reverse_kl, union_topk_reverse_kl_per_token)

__all__ = [
    "DIVERGENCES",
    "FORWARD_KL",
    "TOPK_REVERSE_KL",
    "UNION_TOPK_REVERSE_KL",
    "TokenStats",
    "entropy_from_log_probs",
    "entropy_from_logits",
    "forward_kl",
    "forward_kl_per_token",
    "masked_mean",
    "per_token_divergence",
    "per_token_divergence_from_hidden",
    "topk_reverse_kl",
    "topk_reverse_kl_from_hidden",
    "topk_reverse_kl_per_token",
    "union_topk_reverse_kl",
    "union_topk_reverse_kl_per_token",
]
