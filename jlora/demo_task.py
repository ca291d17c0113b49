"""The demo task: extract the date from an English sentence and answer in ISO ``YYYY-MM-DD``.

Each example is a one-sentence message that mentions exactly one calendar date, written the way people write
dates ("March 5th, 2021", "the 5th of March 2021", "Fri, 5 Mar 2021", "5.3.2021" is *not* used: numeric
day/month orders are ambiguous), among distractor numbers (times, prices, counts, order numbers). The answer is
the date in ISO form, e.g. ``2021-03-05``, and nothing else.

Why this task: it is generated here (deterministic from a seed, nothing downloaded), scored by exact match, and
it is a real skill — find the date among other numbers, map month names to numbers, zero-pad — that
SmolLM2-135M-Instruct does poorly out of the box (it echoes the sentence or restates the date in its original
form) and that less than a hundred LoRA steps on a CPU teach it; the hard part to learn is zero-padding
single-digit days ("2 Jan 2029" -> "2029-01-02", not "2029-01-2" or "2029-01-22"). Answers are short (10
digit/dash tokens + end of turn with SmolLM2's tokenizer, which splits digits) and the instruction is one short
system message (`SYSTEM`), so a whole chat fits in 80 tokens and CPU steps are cheap.

Measured base rates (SmolLM2-135M-Instruct, greedy, held-out seed 2): with this system-message prompt, exact
match 0/100 (the date appears somewhere in 6%); with the instruction in the user turn instead (the default
system prompt), 3/64 exact, 30% somewhere. See bench/demo_prototype.py for the after-training numbers.

Answer normalisation (the rule `normalize` implements, applied to predictions and references alike): strip
surrounding whitespace, then any surrounding quotes or backticks, then one trailing period, then whitespace
again. Nothing else is forgiven: "2021-03-05" matches, "The date is 2021-03-05." or "2021-3-5" do not. The
instruction asks for the date only, so a chatty answer is a wrong answer; `contains_answer` is a lenient
secondary metric (the reference appears anywhere in the prediction) for reporting how much of a gain is format
versus content.

Example:
  >>> ex = make_examples(2, seed=0)
  >>> ex[0]["messages"][1]["content"], ex[0]["completion"]     # the sentence and its ISO date
  ('Please note that the contract expires on the 3rd of October, 1972, not in 17 weeks.', '1972-10-03')
  >>> score(["2021-03-05", "March 5"], ["2021-03-05", "2021-03-05"])
  0.5
"""

from __future__ import annotations

import calendar
import datetime as _dt
import random
import re
from typing import Dict, List, Sequence

SYSTEM = "Extract the date. Answer in ISO format YYYY-MM-DD only."

MONTHS = [calendar.month_name[m] for m in range(1, 13)]
MONTHS_ABBR = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
WEEKDAYS = [calendar.day_name[d] for d in range(7)]  # Monday first, as datetime.weekday()
WEEKDAYS_ABBR = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]

YEAR_RANGE = (1950, 2035)  # inclusive

NAMES = ["Alice", "Bob", "Carlos", "Dana", "Emeka", "Fatima", "George", "Hana", "Ivan", "Julia", "Kenji", "Lena",
         "Mateo", "Nadia", "Omar", "Priya", "Quentin", "Rosa", "Sven", "Tara", "Uma", "Victor", "Wei", "Yusuf",
         "Zoe", "Mr. Patel", "Dr. Okafor", "Ms. Novak"]
CITIES = ["Lisbon", "Nairobi", "Osaka", "Denver", "Krakow", "Lima", "Oslo", "Cairo", "Hanoi", "Dublin", "Quito",
          "Perth", "Tunis", "Seville", "Montreal", "Bergen", "Pune", "Tallinn"]
THINGS = ["invoice", "contract", "lease", "report", "permit", "warranty", "ticket", "policy"]


def _ordinal(n: int) -> str:
    suffix = "th" if 11 <= n % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


# Surface forms of a date. Each takes (datetime.date) and returns text; all name the month in words so the
# reading is unambiguous.
DATE_FORMATS = {
    "month_d_y": lambda d: f"{MONTHS[d.month - 1]} {d.day}, {d.year}",
    "month_ord_y": lambda d: f"{MONTHS[d.month - 1]} {_ordinal(d.day)}, {d.year}",
    "d_month_y": lambda d: f"{d.day} {MONTHS[d.month - 1]} {d.year}",
    "the_ord_of_month": lambda d: f"the {_ordinal(d.day)} of {MONTHS[d.month - 1]}, {d.year}",
    "abbr_d_y": lambda d: f"{MONTHS_ABBR[d.month - 1]} {d.day}, {d.year}",
    "d_abbr_y": lambda d: f"{d.day} {MONTHS_ABBR[d.month - 1]} {d.year}",
    "weekday_month_d_y": lambda d: f"{WEEKDAYS[d.weekday()]}, {MONTHS[d.month - 1]} {d.day}, {d.year}",
    "wd_abbr_d_abbr_y": lambda d: f"{WEEKDAYS_ABBR[d.weekday()]}, {d.day} {MONTHS_ABBR[d.month - 1]} {d.year}",
}

# Sentence templates: {date} is the date; the other fields are distractors (several are numbers).
TEMPLATES = [
    "{name} flew to {city} on {date} with {k} suitcases.",
    "The {thing} for ${amount} was signed on {date}.",
    "On {date}, {name} paid ${amount} for {k} tickets.",
    "Order #{num} shipped on {date} at {hour}:{minute:02d}.",
    "{name} was born in {city} on {date}.",
    "Please note that the {thing} expires on {date}, not in {k} weeks.",
    "We met {name} on {date}; it rained for {k} hours.",
    "The {thing} filed on {date} lists {k} items worth ${amount}.",
    "After {k} years abroad, {name} moved back to {city} on {date}.",
    "Room {num} is booked from {date} for {k} nights.",
    "{name} finished {ordk} in the race in {city} on {date}.",
    "The museum in {city} reopened on {date} after a ${amount} renovation.",
    "Flight {code}{num} departs at {hour}:{minute:02d} on {date}.",
    "According to the {thing} dated {date}, {k} of {n} units failed.",
    "{name} turned {age} on {date} and celebrated in {city}.",
    "The meeting moved from room {k} to room {num} on {date}.",
]


def _example(rng: random.Random) -> Dict:
    year = rng.randint(*YEAR_RANGE)
    month = rng.randint(1, 12)
    day = rng.randint(1, calendar.monthrange(year, month)[1])
    date = _dt.date(year, month, day)
    fmt = rng.choice(sorted(DATE_FORMATS))
    template = rng.choice(TEMPLATES)
    k = rng.randint(2, 30)
    fields = dict(
        date=DATE_FORMATS[fmt](date), name=rng.choice(NAMES), city=rng.choice(CITIES), thing=rng.choice(THINGS),
        k=k, n=k + rng.randint(1, 70), ordk=_ordinal(rng.randint(1, 12)), amount=f"{rng.randint(5, 9999):,}",
        num=rng.randint(100, 9999), hour=rng.randint(0, 23), minute=rng.choice(range(0, 60, 5)),
        age=rng.randint(18, 99), code=rng.choice(["BA", "LH", "AF", "KL", "TP", "QR"]),
    )
    sentence = template.format(**fields)
    answer = date.isoformat()
    return {
        "prompt": sentence,
        "completion": answer,
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": sentence},
                     {"role": "assistant", "content": answer}],
        "format": fmt,
    }


def make_examples(n: int, seed: int = 0) -> List[Dict]:
    """Generates ``n`` date-extraction examples, deterministically from ``seed``.

    Different seeds give (practically) disjoint sets; use one seed for training and another for evaluation.

    Args:
      n: number of examples.
      seed: the random seed (an int); the same ``(n, seed)`` always gives the same list, and a longer list with
        the same seed starts with the shorter one.

    Returns:
      a list of dicts with keys ``"prompt"`` (the user's sentence), ``"completion"`` (the ISO date, the target),
      ``"messages"`` (the full chat: system instruction `SYSTEM`, user sentence, assistant answer; drop the
      last message to get the generation prompt) and ``"format"`` (which surface form the date was written in).

    Example:
      >>> make_examples(1, seed=3)[0]["completion"]
      '1991-02-18'
    """
    if n < 0:
        raise ValueError(f"make_examples: n must be >= 0, got {n}")
    rng = random.Random(f"jlora-demo-dates-{seed}")
    return [_example(rng) for _ in range(n)]


def prompt_messages(example: Dict) -> List[Dict]:
    """The chat to generate an answer from: the example's messages without the assistant's answer.

    Args:
      example: one item of `make_examples`.

    Returns:
      ``[{"role": "system", ...}, {"role": "user", ...}]``.
    """
    return [m for m in example["messages"] if m["role"] != "assistant"]


_STRIP_QUOTES = "\"'`"


def normalize(text: str) -> str:
    """The answer normalisation rule: trim whitespace, surrounding quotes/backticks and one final period.

    Args:
      text: a decoded model answer (special tokens already removed) or a reference.

    Returns:
      the normalised string; exact match is string equality of normalised prediction and reference.

    Example:
      >>> normalize(' "2021-03-05". ')
      '2021-03-05'
    """
    s = text.strip()
    s = s.strip(_STRIP_QUOTES).strip()
    if s.endswith("."):
        s = s[:-1]
    return s.strip(_STRIP_QUOTES).strip()


def score(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Exact-match accuracy after `normalize`.

    Args:
      predictions: decoded model answers.
      references: the gold answers (``example["completion"]``), same length.

    Returns:
      the fraction in [0, 1] of predictions equal to their reference after normalisation (0.0 if empty).

    Example:
      >>> score(["2021-03-05.", "2021-3-5"], ["2021-03-05", "2021-03-05"])
      0.5
    """
    if len(predictions) != len(references):
        raise ValueError(f"score: {len(predictions)} predictions for {len(references)} references")
    if not references:
        return 0.0
    return sum(normalize(p) == normalize(r) for p, r in zip(predictions, references)) / len(references)


_ISO = re.compile(r"(?<!\d)\d{4}-\d{2}-\d{2}(?!\d)")


def contains_answer(predictions: Sequence[str], references: Sequence[str]) -> float:
    """A lenient secondary metric: the fraction of predictions in which the reference date appears anywhere.

    Args:
      predictions: decoded model answers.
      references: the gold ISO dates, same length.

    Returns:
      the fraction in [0, 1] (0.0 if empty).
    """
    if len(predictions) != len(references):
        raise ValueError(f"contains_answer: {len(predictions)} predictions for {len(references)} references")
    if not references:
        return 0.0
    return sum(normalize(r) in _ISO.findall(p) for p, r in zip(predictions, references)) / len(references)
