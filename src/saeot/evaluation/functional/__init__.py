"""Functional evaluation of a finished run's matches on its real model (no judge needed).

For every layer pair (A, B) of a ``train.py`` run, on evaluation tokens streamed batch
by batch. **Which tokens** (``functional.split``):

* ``fresh`` (default): contexts packed from the run's own text source *after* the
  run's last context (same tokenizer, context length and BOS), as many as the run's
  held-out split. No stage of the run saw them: not the SAE training and profiling
  (``profile`` split), not the reference-space fit nor the activation correlations
  that the ``activation_correlation`` matcher matches on (``heldout`` split). If the
  source has no text left (``data.max_contexts=null``, or a short corpus), the
  evaluation falls back to ``heldout`` and says so (``split_note`` in the metrics);
* ``heldout``: the run's held-out split (in-sample for ``activation_correlation``
  and for the reference space of semantic OT / mean embedding);
* ``profile``: for debugging only.

Computed:

**Layer substitution** (SAE Match, Eq. 5). With ``f^A(h^A) [F_a]`` the codes of A's SAE
and the run's matching made one-to-one (below) as a partial permutation
``P [F_b, F_a]`` (``P[j, i] = 1`` iff i -> j),

    h_B_hat = W_dec^B' P f^A'(h^A) + b_dec^B

in *folded* parameters (``code_scale=fold``, the paper's choice): ``f' = f / s`` and
``W_dec' = diag(s) W_dec`` with the per-feature folding scale ``s`` of
:func:`saeot.saes.fold_scale` (JumpReLU threshold; ``1/||W_dec[i]||``
for ReLU; one shared scale for plain TopK), i.e. the code of A's feature i enters B's
decoder as ``f_i^A * s^B_j / s^A_i``. ``code_scale=none`` uses the raw codes. Reported:

* ``explained_variance`` of ``h^B``: ``1 - sum ||h^B - h_B_hat||^2 / sum ||h^B - mean(h^B)||^2``
  over the evaluation positions (BOS excluded; the mean is over the same tokens);
* ``delta_ce``: the increase of the next-token cross-entropy (nats per token, mean
  over the evaluation positions after BOS) when ``h^B`` is replaced by ``h_B_hat`` at
  hook B at every position but BOS (which keeps its clean state) and the rest of the
  model runs on it, against the clean forward pass.

and the same two numbers for the baselines, on the same tokens:

* ``sae``: B's own SAE reconstruction ``decode_B(encode_B(h^B))`` -- the ceiling of any
  substitution through B's dictionary (the identity matching of B onto itself
  gives exactly this);
* ``bias``: zero-ablation of the substituted part, i.e. every code zero:
  ``h_B_hat = b_dec^B`` -- "no feature carried over";
* ``mean``: mean-ablation, ``h^B`` replaced by its mean over the evaluation tokens (one vector).

``ce_recovered = (CE_mean - CE_sub) / (CE_mean - CE_sae)``: the fraction of the loss gap
between mean-ablation and B's own reconstruction that the substitution closes (1 =
as good as B's SAE, 0 = no better than the mean; ``bias`` stands in if ``mean`` is not
computed; NaN unless B's SAE is better than the ablation by more than 1e-6 nats).

**One-to-one.** Substitution needs a partial permutation. Only rows with
``matched == 1`` enter; where the run's matching is many-to-one, each feature of B
keeps the A feature with the lowest distance (ties: lowest index). The number of
pairs dropped this way is reported (``n_dropped_many_to_one``).

**Co-activation** of the matched pairs (all ``matched`` rows, many-to-one kept) on the
same evaluation tokens, streamed: per pair, ``precision = P(B fires | A fires)``,
``recall = P(A fires | B fires)`` (the fraction of B's firings that A's firing
covers) and the Pearson correlation of the two activations (all tokens, zeros
included); summarised as the mean over pairs where each is defined (A fires / B fires
/ both vary) and pooled (``micro_precision = sum n_AB / sum n_A``). ``chance_*`` is the
same for each A feature paired with a random feature of B (seeded): the level a
matcher must beat.

**Coverage**: fraction of A's features matched, fraction called "no match",
fraction of B's features that receive a match, and the fraction of A's *alive*
features (fired during the run's profiling) that are matched.

Runs that share model, data, SAEs and layers (a matcher sweep) are evaluated in one
streaming pass: the clean forward pass, the SAE codes and the baselines are
computed once per batch and shared. Memory is one batch of activations (plus, per
pair, a few ``[n_pairs]`` accumulators); nothing grows with the number of tokens.

Entry point: :func:`evaluate_runs` (``python evaluate.py run_dir=... | 'run_dirs=[...]'``),
which reads each run with :class:`saeot.pipeline.rundir.RunDir` and never retrains.

**Equal coverage** (``functional.coverage``, default on): the coverage above rewards a
lenient null (unmatched features are dropped from the substitution). So every matcher
is also compared at the same coverage: its full one-to-one assignment with the null off
(SAE Match's Eq. 5 protocol: every feature of A assigned, the cost decides the order,
not membership) is computed from the run's directory, its pairs ranked by the
matcher's own cost, and substitution EV / ΔCE and co-activation correlation measured
for the best fraction ``f`` of A on ``functional.coverage_grid``, all levels in the same
streaming pass; the area under each curve summarises it, with a 95% interval from a
bootstrap over the evaluation contexts (``functional.bootstrap``; paired across matchers:
the same replicate weights for every run). Output: ``equal_coverage``
per layer pair in the metrics, ``equal_coverage.md`` / ``.csv`` and
``plots/equal_coverage.png`` in the evaluation dir.

Modules: ``_settings`` (the ``functional:`` settings), ``_matchings`` (a run's matches as
index arrays, the one-to-one subset), ``_substitution`` (Eq. 5 and its accumulator),
``_coactivation`` (the co-activation accumulator), ``_batch`` (what the pass hands extra
consumers), ``_pass`` (the one streaming pass), ``_coverage`` (full assignments, ranked),
``_curves`` (the equal-coverage curves), ``_bootstrap`` (their intervals over contexts),
``_equal_coverage`` (their table and plot),
``_runs`` (run dirs -> grouped passes -> metrics, reports), ``_tables`` (the tables).
"""

from saeot.evaluation.functional._coactivation import CoactivationAccumulator
from saeot.evaluation.functional._batch import PassBatch, PassConsumer, PassTotals
from saeot.evaluation.functional._bootstrap import (
    CurveSums, bootstrap_result, paired_difference, percentile_ci, replicate_weights,
)
from saeot.evaluation.functional._coverage import (
    RankedPairs, assign_run, full_assignment, full_matcher, rank_pairs,
)
from saeot.evaluation.functional._curves import CURVE_METRICS, CoverageCurves, PairCurve, curve_auc
from saeot.evaluation.functional._equal_coverage import (
    add_paired_differences, coverage_rows, format_coverage_markdown, plot_equal_coverage, write_coverage_table,
)
from saeot.evaluation.functional._matchings import (
    ONE_TO_ONE_DOC, PairMatching, identity_matching, matchings_from_rows, one_to_one, pair_matching,
)
from saeot.evaluation.functional._pass import evaluate_functional
from saeot.evaluation.functional._runs import EvaluationData, evaluate_runs, evaluation_data, label_runs
from saeot.evaluation.functional._settings import BASELINE_DOC, BASELINES, FunctionalSettings
from saeot.evaluation.functional._substitution import (
    SubstitutionAccumulator, code_ratio, next_token_ce, run_from_hook, substitute_codes,
)
from saeot.evaluation.functional._tables import (
    TABLE_COLUMNS, format_judge_markdown, format_markdown, judge_row, table_rows, write_table,
)

__all__ = [
    "FunctionalSettings", "BASELINES", "BASELINE_DOC",
    "PairMatching", "ONE_TO_ONE_DOC", "one_to_one", "pair_matching", "identity_matching", "matchings_from_rows",
    "code_ratio", "substitute_codes", "run_from_hook", "next_token_ce", "SubstitutionAccumulator",
    "CoactivationAccumulator",
    "PassBatch", "PassConsumer", "PassTotals",
    "RankedPairs", "rank_pairs", "full_matcher", "full_assignment", "assign_run",
    "CURVE_METRICS", "curve_auc", "PairCurve", "CoverageCurves",
    "CurveSums", "replicate_weights", "percentile_ci", "paired_difference", "bootstrap_result",
    "coverage_rows", "add_paired_differences", "format_coverage_markdown", "write_coverage_table",
    "plot_equal_coverage",
    "evaluate_functional",
    "EvaluationData", "evaluation_data", "label_runs", "evaluate_runs",
    "TABLE_COLUMNS", "table_rows", "judge_row", "format_markdown", "format_judge_markdown", "write_table",
]
