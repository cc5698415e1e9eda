"""Caption metrics computed with the COCO caption evaluation code (``pycocoevalcap``).

:func:`score_captions` follows the standard COCO protocol: hypotheses and references are tokenised with the
Stanford PTB tokenizer (lower-cased, punctuation removed), then scored with BLEU-1..4, METEOR 1.5, ROUGE-L and
CIDEr. Notes:

* pycocoevalcap's "CIDEr" is **CIDEr-D** (clipped n-gram counts and a Gaussian length penalty), the variant that
  papers report as CIDEr.
* CIDEr's document frequencies come from the references of the scored images only, so it needs several images:
  on a single image every n-gram has IDF 0 and CIDEr is 0.
* All metrics are reported on a 0-100 scale (CIDEr-D can exceed 100).
* The PTB tokenizer and METEOR run Java. Without ``java`` on the PATH the text is tokenised by a small Python
  approximation of the PTB tokenizer (:func:`simple_ptb_tokenize`) and METEOR is skipped; the report says so.
* SPICE is never run: it needs Stanford CoreNLP models that are downloaded at first use, which is impossible
  offline. It is always listed as unavailable.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

__all__ = [
    "METRIC_NAMES",
    "SPECIAL_TOKENS",
    "MetricReport",
    "format_table",
    "score_captions",
    "simple_ptb_tokenize",
    "strip_special_tokens",
]

METRIC_NAMES = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")
SPECIAL_TOKENS = ("[CLS]", "[SEP]", "[PAD]", "[UNK]", "[MASK]")

SPICE_UNAVAILABLE = "SPICE needs Stanford CoreNLP, downloaded at first use; not available offline"
_NO_JAVA = "java not found on PATH"

_SPECIAL_RE = re.compile("|".join(re.escape(token) for token in SPECIAL_TOKENS))

Captions = dict[str, list[str]]


@dataclass
class MetricReport:
    """Result of :func:`score_captions`.

    Attributes:
        metrics: Metric name -> score on a 0-100 scale, for the metrics that could be computed.
        unavailable: Metric (or processing step, e.g. ``"PTB-tokenizer"``) -> why it is missing or degraded.
    """

    metrics: dict[str, float] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)


def strip_special_tokens(text: str) -> str:
    """Remove ``[CLS] [SEP] [PAD] [UNK] [MASK]`` from ``text`` and collapse runs of whitespace to one space."""
    return " ".join(_SPECIAL_RE.sub(" ", text).split())


def score_captions(
    hypotheses: Mapping[str, str],
    references: Mapping[str, Sequence[str]],
    *,
    meteor: bool = True,
) -> MetricReport:
    """Score one generated caption per image against that image's reference captions.

    Args:
        hypotheses: Image key -> generated caption. Special tokens (see :func:`strip_special_tokens`) are removed.
        references: Image key -> reference captions; may hold more images than ``hypotheses`` (only the
            references of the hypothesised images are used, also for CIDEr's document frequencies).
        meteor: Compute METEOR (starts a Java process, about 5-10 s).

    Returns:
        A :class:`MetricReport` with BLEU-1..4, METEOR, ROUGE-L and CIDEr (CIDEr-D) times 100.

    Raises:
        ValueError: ``hypotheses`` is empty, has a key missing from ``references``, a non-string caption, or an
            image has no reference.
    """
    hyps, refs = _validated(hypotheses, references)
    report = MetricReport()

    has_java = shutil.which("java") is not None
    tokenize = _ptb_tokenize if has_java else _simple_tokenize
    if not has_java:
        report.unavailable["PTB-tokenizer"] = f"{_NO_JAVA}; used a Python approximation of PTB tokenisation"
    try:
        gts, res = tokenize(refs), tokenize(hyps)
    except (OSError, subprocess.SubprocessError, _TokenizerError) as error:
        report.unavailable["PTB-tokenizer"] = f"failed ({error}); used a Python approximation of PTB tokenisation"
        gts, res = _simple_tokenize(refs), _simple_tokenize(hyps)

    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    for n, value in enumerate(bleu, start=1):
        report.metrics[f"BLEU-{n}"] = 100.0 * float(value)
    if not meteor:
        report.unavailable["METEOR"] = "skipped (meteor=False)"
    elif not has_java:
        report.unavailable["METEOR"] = _NO_JAVA
    else:
        try:
            report.metrics["METEOR"] = 100.0 * _meteor_score(gts, res)
        except (OSError, ValueError, subprocess.SubprocessError) as error:
            report.unavailable["METEOR"] = f"METEOR failed: {error!r}"
    report.metrics["ROUGE-L"] = 100.0 * float(Rouge().compute_score(gts, res)[0])
    report.metrics["CIDEr"] = 100.0 * float(Cider().compute_score(gts, res)[0])
    report.unavailable["SPICE"] = SPICE_UNAVAILABLE
    report.metrics = {name: report.metrics[name] for name in METRIC_NAMES if name in report.metrics}
    return report


def format_table(report: MetricReport) -> str:
    """An aligned text table: one row per metric with its value (1 decimal), or ``-`` and the reason it is missing."""
    rows = [(name, f"{report.metrics[name]:.1f}", "") for name in METRIC_NAMES if name in report.metrics]
    rows += [(name, "-", reason) for name, reason in report.unavailable.items() if name not in report.metrics]
    name_width = max(len("metric"), *(len(name) for name, _, _ in rows))
    value_width = max(len("value"), *(len(value) for _, value, _ in rows))
    lines = [f"{'metric':<{name_width}}  {'value':>{value_width}}  note"]
    lines += [f"{name:<{name_width}}  {value:>{value_width}}  {note}".rstrip() for name, value, note in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------------------------


def _validated(hypotheses: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> tuple[Captions, Captions]:
    """Check the inputs and return ``(hypotheses, references)`` as lists per key, special tokens stripped."""
    if not hypotheses:
        raise ValueError("no hypotheses to score: the hypotheses dict is empty")
    unknown = [key for key in hypotheses if key not in references]
    if unknown:
        raise ValueError(
            f"{len(unknown)} hypothesis key(s) have no references, e.g. {unknown[:5]}; "
            "hypothesis keys must be a subset of the reference keys"
        )
    hyps: Captions = {}
    refs: Captions = {}
    for key, text in hypotheses.items():
        if not isinstance(text, str):
            raise ValueError(f"hypothesis for {key!r} must be a string, got {type(text).__name__}")
        texts = [references[key]] if isinstance(references[key], str) else list(references[key])
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"references for {key!r} must be a non-empty list of strings")
        hyps[key] = [strip_special_tokens(text)]
        refs[key] = texts
    return hyps, refs


# --------------------------------------------------------------------------------------------------------------
# Tokenisation
# --------------------------------------------------------------------------------------------------------------


class _TokenizerError(RuntimeError):
    """The PTB tokenizer returned output that does not line up with its input."""


def _ptb_tokenize(captions: Captions) -> Captions:
    """Tokenise with pycocoevalcap's PTBTokenizer (a Java subprocess): lower-cased, punctuation removed."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    # The tokenizer reads one caption a line, so any line break inside a caption would shift all later captions.
    prepared = {key: [{"caption": " ".join(text.split())} for text in texts] for key, texts in captions.items()}
    tokenized = PTBTokenizer().tokenize(prepared)
    for key, texts in captions.items():
        if len(tokenized.get(key, ())) != len(texts):
            raise _TokenizerError(f"PTB tokenizer output does not match its input (image {key!r})")
    return tokenized


#: Tokens that pycocoevalcap's PTB wrapper drops after tokenising (plus ``"``, which PTB turns into `` or '').
_PUNCTUATION = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";", '"'}
#: Brackets as the lower-casing PTB tokenizer writes them (the wrapper keeps these, as it compares upper case).
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "{": "-lcb-", "}": "-rcb-", "[": "-lsb-", "]": "-rsb-"}
_CONTRACTION_RE = re.compile(r"(?<=\w)(n't|'(?:s|re|ve|ll|d|m))\b")
_TOKEN_RE = re.compile(r"n't|'\w+|\w+(?:[-.&/]\w+)*|\S")


def simple_ptb_tokenize(text: str) -> str:
    """Approximate PTB tokenisation in Python: lower-case, split off punctuation and clitics, drop punctuation.

    Used when Java is missing. It matches the PTB tokenizer on ordinary caption text; rare cases (abbreviations
    such as ``u.s.``, unusual quotes) may differ.
    """
    text = _CONTRACTION_RE.sub(r" \1", text.lower())
    tokens = [_BRACKETS.get(token, token) for token in _TOKEN_RE.findall(text)]
    return " ".join(token for token in tokens if token not in _PUNCTUATION)


def _simple_tokenize(captions: Captions) -> Captions:
    return {key: [simple_ptb_tokenize(text) for text in texts] for key, texts in captions.items()}


# --------------------------------------------------------------------------------------------------------------
# METEOR
# --------------------------------------------------------------------------------------------------------------


def _meteor_score(gts: Captions, res: Captions) -> float:
    """Corpus METEOR (0-1) with a fresh METEOR 1.5 Java process that is always shut down afterwards."""
    from pycocoevalcap.meteor.meteor import Meteor

    scorer = Meteor()
    try:
        score, _ = scorer.compute_score(gts, res)
        return float(score)
    finally:
        _close_meteor(scorer)


def _close_meteor(scorer: object) -> None:
    """Stop a pycocoevalcap ``Meteor`` instance's Java process (``close()`` when the version provides it)."""
    close: Callable[[], None] | None = getattr(scorer, "close", None)
    if callable(close):
        close()
        return
    process: subprocess.Popen[bytes] = scorer.meteor_p  # type: ignore[attr-defined]
    for stream in (process.stdin, process.stdout, process.stderr):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()
    if process.poll() is None:
        process.kill()
    process.wait()
    # Meteor.__del__ takes this lock; a failed compute_score may have left it held, which would hang the GC.
    scorer.lock = threading.Lock()  # type: ignore[attr-defined]
