"""The demo task's generator (deterministic, varied, correct answers) and its exact-match scoring. Fast: no model."""

import datetime
import re

import pytest

from jlora import demo_task as dt

MONTH_WORD = re.compile(r"\b(" + "|".join(dt.MONTHS + dt.MONTHS_ABBR) + r")\b")


def test_deterministic_and_prefix_stable():
    a = dt.make_examples(50, seed=7)
    assert a == dt.make_examples(50, seed=7)
    assert dt.make_examples(20, seed=7) == a[:20]
    assert dt.make_examples(0, seed=7) == []
    with pytest.raises(ValueError):
        dt.make_examples(-1)


def test_seeds_give_different_sets():
    train = {e["prompt"] for e in dt.make_examples(800, seed=1)}
    held_out = {e["prompt"] for e in dt.make_examples(200, seed=2)}
    assert not train & held_out
    assert dt.make_examples(10, seed=1) != dt.make_examples(10, seed=2)


def test_variety():
    ex = dt.make_examples(600, seed=0)
    assert len({e["prompt"] for e in ex}) == len(ex)
    assert {e["format"] for e in ex} == set(dt.DATE_FORMATS)
    dates = [datetime.date.fromisoformat(e["completion"]) for e in ex]
    assert {d.month for d in dates} == set(range(1, 13))
    assert {d.day for d in dates} >= {1, 5, 9, 10, 29, 31}  # single digits (zero-padding) and month ends
    years = [d.year for d in dates]
    assert min(years) < 1960 and max(years) > 2025
    assert all(dt.YEAR_RANGE[0] <= y <= dt.YEAR_RANGE[1] for y in years)
    # Every template is used (each template has a distinct fixed prefix or suffix word sequence).
    used = sum(any(re.fullmatch(_template_regex(t), e["prompt"]) for e in ex) for t in dt.TEMPLATES)
    assert used == len(dt.TEMPLATES)


def _template_regex(template: str) -> str:
    parts = re.split(r"\{[^}]*\}", template)
    return ".+".join(re.escape(p) for p in parts)


def test_answers_are_correct():
    for e in dt.make_examples(300, seed=3):
        d = datetime.date.fromisoformat(e["completion"])
        assert e["completion"] == f"{d.year:04d}-{d.month:02d}-{d.day:02d}"
        surface = dt.DATE_FORMATS[e["format"]](d)
        assert surface in e["prompt"]  # the sentence really states this date (weekdays included)
        assert len(MONTH_WORD.findall(e["prompt"])) == 1  # and no other month


def test_messages():
    e = dt.make_examples(1, seed=0)[0]
    assert [m["role"] for m in e["messages"]] == ["system", "user", "assistant"]
    assert e["messages"][0]["content"] == dt.SYSTEM
    assert e["messages"][1]["content"] == e["prompt"]
    assert e["messages"][2]["content"] == e["completion"]
    assert dt.prompt_messages(e) == e["messages"][:2]


def test_ordinals():
    assert [dt._ordinal(n) for n in (1, 2, 3, 4, 11, 12, 13, 21, 22, 23, 31)] == \
        ["1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "23rd", "31st"]


@pytest.mark.parametrize("text, expected", [
    ("2021-03-05", "2021-03-05"),
    ("  2021-03-05\n", "2021-03-05"),
    ("2021-03-05.", "2021-03-05"),
    ('"2021-03-05"', "2021-03-05"),
    ("`2021-03-05`.", "2021-03-05"),
    ("'2021-03-05.'", "2021-03-05"),
    ("The date is 2021-03-05.", "The date is 2021-03-05"),
    ("2021-3-5", "2021-3-5"),
    ("", ""),
])
def test_normalize(text, expected):
    assert dt.normalize(text) == expected


def test_score():
    refs = ["2021-03-05", "1999-12-31", "1950-01-01", "2000-02-29"]
    assert dt.score(refs, refs) == 1.0
    preds = [" 2021-03-05.", "The date is 1999-12-31.", "1950-1-1", "2000-02-29\n"]
    assert dt.score(preds, refs) == 0.5
    assert dt.contains_answer(preds, refs) == 0.75  # lenient: the chatty answer counts, "1950-1-1" does not
    assert dt.contains_answer(["x 2021-03-051"], ["2021-03-05"]) == 0.0  # a longer number is not the date
    assert dt.score([], []) == 0.0
    with pytest.raises(ValueError):
        dt.score(["a"], [])
    with pytest.raises(ValueError):
        dt.contains_answer([], ["a"])
