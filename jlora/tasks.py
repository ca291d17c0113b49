"""Tasks that ship with jlora, for `jlora compare` (and the demo): generated here, deterministic from a seed,
nothing downloaded, scored by exact match on held-out items.

* ``dates`` — the demo's date extraction (`jlora.demo_task`): a *format* skill (find the date among other
  numbers, answer ``YYYY-MM-DD``) that a handful of LoRA steps teach. Held-out items are new sentences.
* ``facts`` — new *knowledge*: a generated world of fictional people, each with a home town, a profession and a
  birth year. Training asks about every fact in two phrasings; held-out items ask about the same facts in a third
  phrasing never trained on, so a model must have stored the fact, not the string. Capacity matters here (the
  number of facts grows with the training set), which is where "LoRA may not match full fine-tuning on complex
  tasks" can show or be refuted.

Every task gives chat examples ``{"prompt", "completion", "messages"}`` (as `jlora.demo_task`) through
`Task.splits`, and `Task.score` is exact match after `jlora.demo_task.normalize`.

Example:
  >>> train, val, test = get("facts").splits(n_train=60, n_eval=10, seed=0)
  >>> len(train), len(val), len(test), test[0]["messages"][-1]["role"]
  (60, 10, 10, 'assistant')
  >>> sorted(TASKS)
  ['dates', 'facts']
"""

from __future__ import annotations

import dataclasses
import random
from typing import Callable, Dict, List, Sequence, Tuple

from jlora import demo_task


@dataclasses.dataclass(frozen=True)
class Task:
    """A generated task.

    Attributes:
      name: the name `jlora compare --task` takes.
      description: one line for reports and ``--help``.
      make_splits: ``(n_train, n_eval, seed) -> (train, val, test)`` lists of examples; ``val`` chooses the
        learning rate, ``test`` is scored once.
      max_new_tokens: generation budget of an answer.
    """

    name: str
    description: str
    make_splits: Callable[[int, int, int], Tuple[List[Dict], List[Dict], List[Dict]]]
    max_new_tokens: int = 16

    def splits(self, n_train: int, n_eval: int, seed: int = 0):
        """(train, val, test): ``n_train`` training examples and ``n_eval`` validation and test examples each."""
        if n_train < 1 or n_eval < 1:
            raise ValueError(f"task {self.name}: n_train and n_eval must be >= 1, got {n_train}, {n_eval}")
        return self.make_splits(n_train, n_eval, seed)

    @staticmethod
    def score(predictions: Sequence[str], references: Sequence[str]) -> float:
        """Exact-match accuracy after `jlora.demo_task.normalize`."""
        return demo_task.score(predictions, references)


def _date_splits(n_train, n_eval, seed):
    train = demo_task.make_examples(n_train, seed=1000 * seed + 1)
    held = demo_task.make_examples(2 * n_eval, seed=1000 * seed + 2)
    return train, held[:n_eval], held[n_eval:]


# ----------------------------------------------------------------------------------------------------------
# facts: a fictional world

_SYLLABLES = ["ka", "lo", "mi", "ren", "tu", "vas", "zel", "qui", "dor", "fen", "gal", "hir", "jun", "bra", "sto",
              "nel", "pax", "wyn", "ori", "sel", "tam", "ulo", "yen", "cor"]
_TOWNS = ["Arvandel", "Brisk Hollow", "Cairnmoor", "Dunwick", "Elmstead", "Farrowgate", "Glenharrow", "Hollin Bay",
          "Ivory Ford", "Juniper Vale", "Kestrel Point", "Larkspur", "Millbrook", "Northwold", "Oakhurst",
          "Pellworth", "Quarry End", "Ravensmere", "Saltcombe", "Thornbury"]
_JOBS = ["baker", "cartographer", "glassblower", "beekeeper", "clockmaker", "ferryman", "herbalist", "locksmith",
         "potter", "stonemason", "tailor", "weaver", "astronomer", "bookbinder", "shipwright", "falconer"]
SYSTEM_FACTS = "Answer with the single word, name or number asked for, nothing else."
# (attribute, training phrasings, held-out phrasing); {p} is the person
_QUESTIONS = [
    ("town", ["Where does {p} live?", "Which town is {p}'s home?"], "In which town can {p} be found at home?"),
    ("job", ["What is {p}'s profession?", "What does {p} do for a living?"], "Which trade does {p} work in?"),
    ("year", ["In which year was {p} born?", "What is {p}'s birth year?"], "{p} was born in which year?"),
]


def _people(n: int, rng: random.Random) -> List[Dict]:
    seen, out = set(), []
    while len(out) < n:
        first = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()
        last = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()
        name = f"{first} {last}"
        if name in seen:
            continue
        seen.add(name)
        out.append({"name": name, "town": rng.choice(_TOWNS), "job": rng.choice(_JOBS),
                    "year": str(rng.randint(1900, 1999))})
    return out


def _qa(question: str, answer: str) -> Dict:
    return {"prompt": question, "completion": answer,
            "messages": [{"role": "system", "content": SYSTEM_FACTS}, {"role": "user", "content": question},
                         {"role": "assistant", "content": answer}]}


def _fact_splits(n_train, n_eval, seed):
    """Every person's facts are trained in both phrasings: the training set is ``n_train // 6`` people's 6
    items (rounded down to a multiple of 6), and the held-out questions (3 per person) ask about those people."""
    per_person = 2 * len(_QUESTIONS)
    n_people = n_train // per_person
    if n_people == 0 or 2 * n_eval > n_people * len(_QUESTIONS):
        raise ValueError(f"task facts: n_train={n_train} gives {n_people} people ({per_person} training items "
                         f"each) and {n_people * len(_QUESTIONS)} held-out questions, fewer than the 2 x "
                         f"n_eval={2 * n_eval} needed for validation and test; raise n_train to at least "
                         f"{per_person * max(1, -(-2 * n_eval // len(_QUESTIONS)))}")
    rng = random.Random(f"jlora-facts-{seed}")
    people = _people(n_people, rng)
    train = [_qa(q.format(p=p["name"]), p[attr]) for p in people for attr, qs, _ in _QUESTIONS for q in qs]
    rng.shuffle(train)
    held = [_qa(h.format(p=p["name"]), p[attr]) for p in people for attr, _, h in _QUESTIONS]
    random.Random(f"jlora-facts-held-{seed}").shuffle(held)
    return train, held[:n_eval], held[n_eval:2 * n_eval]


TASKS: Dict[str, Task] = {
    "dates": Task("dates", "extract the date from a sentence, answer YYYY-MM-DD (format learning)", _date_splits, 16),
    "facts": Task("facts", "answer questions about generated fictional people, asked in an unseen phrasing "
                           "(knowledge, capacity)", _fact_splits, 12),
}


def get(name: str) -> Task:
    """The task called ``name``; an unknown name raises ValueError listing the known ones."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name]
