"""Tests for diffcap.metrics: parity with pycocoevalcap's own scorers, token stripping and the no-Java fallback."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator

import pytest

from diffcap import metrics
from diffcap.metrics import (
    METRIC_NAMES,
    MetricReport,
    format_table,
    score_captions,
    simple_ptb_tokenize,
    strip_special_tokens,
)

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="java is not installed")

REFERENCES = {
    "img1": [
        "A dog runs across the green grass .",
        "A brown dog is running on grass .",
        "The dog plays outside in a field .",
        "A dog running .",
        "A puppy runs on the lawn .",
    ],
    "img2": ["Two children play soccer in a park .", "Kids kicking a ball on the grass ."],
    "img3": [
        "A man rides a bicycle down a city street .",
        "A cyclist on a busy road .",
        "A person riding a bike in traffic .",
    ],
    "unused": ["References may cover more images than the hypotheses ."],
}
HYPOTHESES = {
    "img1": "a dog runs on the grass",
    "img2": "children play with a ball in a park",
    "img3": "a man riding a bike on the street",
}
HYPOTHESES_WITH_SPECIALS = {
    "img1": "[CLS] a dog runs on the grass [SEP] [PAD] [PAD]",
    "img2": "[CLS] children play with a [UNK] [MASK] ball in a park [SEP]",
    "img3": "a man riding a bike on the street [SEP]",
}


def pycocoevalcap_scores(hypotheses: dict[str, str], references: dict[str, list[str]]) -> dict[str, float]:
    """The expected side: pycocoevalcap's scorers called directly, after its PTB tokenizer, times 100."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({k: [{"caption": c} for c in references[k]] for k in hypotheses})
    res = tokenizer.tokenize({k: [{"caption": c}] for k, c in hypotheses.items()})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    meteor = Meteor()
    meteor_score, _ = meteor.compute_score(gts, res)
    del meteor
    expected = {f"BLEU-{n}": 100 * b for n, b in enumerate(bleu, start=1)}
    expected["METEOR"] = 100 * meteor_score
    expected["ROUGE-L"] = 100 * float(Rouge().compute_score(gts, res)[0])
    expected["CIDEr"] = 100 * float(Cider().compute_score(gts, res)[0])
    return expected


@pytest.fixture(scope="module")
def expected() -> dict[str, float]:
    if shutil.which("java") is None:
        pytest.skip("java is not installed")
    return pycocoevalcap_scores(HYPOTHESES, REFERENCES)


@pytest.fixture(scope="module")
def scored() -> Iterator[tuple[MetricReport, list[object]]]:
    """One full scoring run (with METEOR) shared by several tests, recording the METEOR scorers it closed."""
    if shutil.which("java") is None:
        pytest.skip("java is not installed")
    closed: list[object] = []
    close = metrics._close_meteor

    def recording_close(scorer: object) -> None:
        close(scorer)
        closed.append(scorer)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(metrics, "_close_meteor", recording_close)
        report = score_captions(HYPOTHESES_WITH_SPECIALS, REFERENCES)
    yield report, closed


@pytest.fixture(scope="module")
def perfect() -> MetricReport:
    """Every hypothesis equals the first reference of its image."""
    if shutil.which("java") is None:
        pytest.skip("java is not installed")
    return score_captions({k: REFERENCES[k][0] for k in HYPOTHESES}, REFERENCES)


# ----------------------------------------------------------------------------------------------------------------


def test_strip_special_tokens() -> None:
    assert strip_special_tokens("[CLS] a dog runs [SEP] [PAD]") == "a dog runs"
    assert strip_special_tokens("  a [UNK]  dog[MASK]runs\t[PAD][PAD] ") == "a dog runs"
    assert strip_special_tokens("[SEP]") == ""
    assert strip_special_tokens("keep [brackets] and [cls]") == "keep [brackets] and [cls]"


def test_scores_match_pycocoevalcap(scored: tuple[MetricReport, list[object]], expected: dict[str, float]) -> None:
    report, _ = scored
    assert list(report.metrics) == list(METRIC_NAMES)
    for name in METRIC_NAMES:
        assert report.metrics[name] == pytest.approx(expected[name], rel=1e-9, abs=1e-9), name
    assert 0 < report.metrics["BLEU-4"] < report.metrics["BLEU-1"] < 100
    assert report.unavailable == {"SPICE": metrics.SPICE_UNAVAILABLE}
    assert all(isinstance(value, float) for value in report.metrics.values())


def test_meteor_process_is_shut_down(scored: tuple[MetricReport, list[object]]) -> None:
    _, closed = scored
    assert len(closed) == 1
    assert closed[0].meteor_p.poll() is not None  # type: ignore[attr-defined]


@needs_java
def test_special_tokens_do_not_change_scores() -> None:
    with_specials = score_captions({"img1": "[CLS] a dog runs [SEP] [PAD]", "img3": "[CLS] a man"}, REFERENCES, meteor=False)
    clean = score_captions({"img1": "a dog runs", "img3": "a man"}, REFERENCES, meteor=False)
    assert with_specials.metrics == clean.metrics
    assert with_specials.unavailable["METEOR"] == "skipped (meteor=False)"


def test_perfect_hypotheses(perfect: MetricReport, scored: tuple[MetricReport, list[object]]) -> None:
    for name in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L"):
        assert perfect.metrics[name] == pytest.approx(100.0, abs=1e-4), name
    # METEOR's fragmentation penalty keeps an exact match just below 100; CIDEr-D is not bounded by 100.
    assert 90.0 < perfect.metrics["METEOR"] <= 100.0
    assert perfect.metrics["CIDEr"] > scored[0].metrics["CIDEr"]


def test_without_java_meteor_is_unavailable_and_tokenisation_falls_back(
    monkeypatch: pytest.MonkeyPatch, expected: dict[str, float]
) -> None:
    monkeypatch.setattr(shutil, "which", lambda *args, **kwargs: None)

    def no_subprocess(*args: object, **kwargs: object) -> None:
        raise AssertionError("no subprocess may be started without java")

    monkeypatch.setattr(subprocess, "Popen", no_subprocess)
    report = score_captions(HYPOTHESES, REFERENCES)
    assert "METEOR" not in report.metrics
    assert "java" in report.unavailable["METEOR"]
    assert "PTB-tokenizer" in report.unavailable and "SPICE" in report.unavailable
    # On these plain sentences the Python tokenisation equals PTB's, so the other metrics are unchanged.
    for name in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"):
        assert report.metrics[name] == pytest.approx(expected[name], rel=1e-9), name


def test_failing_ptb_tokenizer_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(captions: object) -> None:
        raise PermissionError("read-only site-packages")

    monkeypatch.setattr(metrics, "_ptb_tokenize", broken)
    report = score_captions(HYPOTHESES, REFERENCES, meteor=False)
    assert "read-only site-packages" in report.unavailable["PTB-tokenizer"]
    assert report.metrics["BLEU-1"] > 0


def test_failing_meteor_is_reported_and_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    import pycocoevalcap.meteor.meteor as meteor_module

    closed: list[bool] = []

    class BrokenMeteor:
        def compute_score(self, gts: object, res: object) -> None:
            raise ValueError("could not convert string to float: ''")

        def close(self) -> None:
            closed.append(True)

    monkeypatch.setattr(shutil, "which", lambda *args, **kwargs: "/usr/bin/java")
    monkeypatch.setattr(metrics, "_ptb_tokenize", metrics._simple_tokenize)
    monkeypatch.setattr(meteor_module, "Meteor", BrokenMeteor)
    report = score_captions(HYPOTHESES, REFERENCES)
    assert "METEOR failed" in report.unavailable["METEOR"]
    assert closed == [True]
    assert "ROUGE-L" in report.metrics


def test_invalid_inputs() -> None:
    with pytest.raises(ValueError, match="empty"):
        score_captions({}, REFERENCES)
    with pytest.raises(ValueError, match="subset"):
        score_captions({"img1": "a dog", "nope": "a cat"}, REFERENCES)
    with pytest.raises(ValueError, match="non-empty list"):
        score_captions({"img1": "a dog"}, {"img1": []})


@needs_java
def test_simple_tokenizer_matches_ptb_on_plain_captions() -> None:
    sentences = [
        "A child in a pink dress is climbing up a set of stairs in an entry way .",
        "The dog's ball isn't red-and-white, is it?",
        'A man (in a T-shirt) says "hello" ... ok; fine: yes!',
        "A boy jumps off a 3.5 m wall",
        "I'm sure they're fine and we'll see",
    ]
    tokenized = metrics._ptb_tokenize({str(i): [s] for i, s in enumerate(sentences)})
    for i, sentence in enumerate(sentences):
        assert simple_ptb_tokenize(sentence) == tokenized[str(i)][0]


@needs_java
def test_ptb_tokenize_keeps_captions_aligned_despite_line_breaks() -> None:
    tokenized = metrics._ptb_tokenize({"a": ["one\rtwo", "three\u2028four"], "b": ["", "Five ."]})
    assert tokenized == {"a": ["one two", "three four"], "b": ["", "five"]}


def test_format_table() -> None:
    report = MetricReport(
        metrics={"BLEU-1": 71.234, "CIDEr": 105.06},
        unavailable={"METEOR": "java not found on PATH", "SPICE": metrics.SPICE_UNAVAILABLE},
    )
    lines = format_table(report).splitlines()
    assert lines[0].split() == ["metric", "value", "note"]
    assert lines[1].split() == ["BLEU-1", "71.2"]
    assert lines[2].split() == ["CIDEr", "105.1"]
    assert lines[3].startswith("METEOR") and lines[3].endswith("-  java not found on PATH")
    assert lines[4].endswith(metrics.SPICE_UNAVAILABLE)
    column = lines[0].index("value") + len("value")  # values are right-aligned under the header
    assert all(line[column - 1] != " " and line[column : column + 2] in ("", "  ") for line in lines)
