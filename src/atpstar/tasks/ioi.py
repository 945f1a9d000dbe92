"""Indirect object identification (IOI) prompt pairs, after Wang et al. 2022 ("Interpretability in the Wild").

Clean prompt: two names in the first clause, the subject repeated in the second, e.g.
"When Mary and John went to the store, John gave a drink to" -> " Mary" (the indirect object, IO),
in ABBA order (IO first) or BABA order (subject first). Noise prompt: the same template, place and
object with three distinct other names (the "ABC" distribution), so the repeated-name cue is gone.
Metric: logit difference IO minus subject at the last position.

Every name, place and object is used with a leading space and kept only if that form is one token
for the tokenizer, so all prompts of one template have the same token length.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

from ..errors import InputError
from ..pairs import PromptPairs
from ._common import check_count, check_seed, single_token_words

# Slots: {A} and {B} are the two names of the first clause (IO then subject in ABBA order, subject then
# IO in BABA order), {S2} the repeated subject, {PLACE} and {OBJECT}. Prompts stop before the IO.
TEMPLATES: tuple[str, ...] = (
    "When {A} and {B} went to the {PLACE}, {S2} gave a {OBJECT} to",
    "Then, {A} and {B} went to the {PLACE}. {S2} gave a {OBJECT} to",
    "While {A} and {B} were working at the {PLACE}, {S2} gave a {OBJECT} to",
    "While {A} and {B} were commuting to the {PLACE}, {S2} gave a {OBJECT} to",
    "After the lunch, {A} and {B} went to the {PLACE}. {S2} gave a {OBJECT} to",
    "Afterwards, {A} and {B} went to the {PLACE}. {S2} gave a {OBJECT} to",
    "When {A} and {B} got a {OBJECT} at the {PLACE}, {S2} decided to give it to",
    "When {A} and {B} got a {OBJECT} at the {PLACE}, {S2} decided to give the {OBJECT} to",
)

PLACES: tuple[str, ...] = (
    "store",
    "garden",
    "restaurant",
    "school",
    "hospital",
    "office",
    "house",
    "station",
    "park",
    "market",
)

OBJECTS: tuple[str, ...] = (
    "ring",
    "kiss",
    "bone",
    "basketball",
    "computer",
    "necklace",
    "drink",
    "snack",
    "book",
    "letter",
)

# Common English first names; the ones that are not a single token for a tokenizer are dropped.
NAMES: tuple[str, ...] = (
    "Mary",
    "John",
    "Tom",
    "James",
    "Dan",
    "Sid",
    "Martin",
    "Amy",
    "Paul",
    "Anna",
    "Kate",
    "Mark",
    "David",
    "Sarah",
    "Michael",
    "Lisa",
    "Peter",
    "Emma",
    "George",
    "Laura",
    "Jack",
    "Alice",
    "Robert",
    "Rachel",
    "Steve",
    "Helen",
    "Chris",
    "Susan",
    "Brian",
    "Karen",
    "Kevin",
    "Linda",
    "Eric",
    "Julia",
    "Adam",
    "Grace",
    "Ryan",
    "Emily",
    "Scott",
    "Jane",
    "Frank",
    "Anne",
    "Henry",
    "Ruth",
    "Sam",
    "Rose",
    "Joe",
    "Claire",
    "Matt",
    "Lucy",
    "Tim",
    "Maria",
    "Andrew",
    "Diana",
    "Ben",
    "Sophie",
    "Luke",
    "Sara",
    "Josh",
    "Jessica",
)

MIN_NAMES = 5  # two clean names + three distinct noise names


def ioi(
    tokenizer: Any,
    n: int,
    seed: int = 0,
    template: int | None = None,
    order: str = "mixed",
    names: tuple[str, ...] = NAMES,
) -> PromptPairs:
    """IOI prompt pairs with ABC noise and the logit-difference metric.

    All pairs in one ``PromptPairs`` must have one token length. Rule: with ``template=None`` each
    pair draws a template from those whose prompt has the most common token length for this
    tokenizer (ties go to the earliest template); with ``template=i`` every pair uses ``TEMPLATES[i]``.
    For IOI-PP (one pair at a time) take ``pairs.subset([i])``.

    Args:
        tokenizer: a Hugging Face tokenizer (``encode(text, add_special_tokens=False)``).
        n: number of pairs.
        seed: seed of the draw; the same arguments give the same pairs.
        template: index into ``TEMPLATES``, or None for the most-common-length set.
        order: ``"ABBA"`` (IO first), ``"BABA"`` (subject first) or ``"mixed"`` (each with probability 1/2).
        names: candidate names (without leading space).

    Returns:
        ``PromptPairs`` with answer = IO, distractor = subject, metric ``"logit_diff"``.

    Raises:
        InputError: ``n < 1``, a bad template index or order, or too few single-token names.

    Example:
        >>> pairs = ioi(tokenizer, 8)  # doctest: +SKIP
    """
    check_count("n", n)
    check_seed(seed)
    if order not in ("ABBA", "BABA", "mixed"):
        raise InputError(f"unknown IOI order {order!r}; choose one of ['ABBA', 'BABA', 'mixed']")
    if template is not None and not (isinstance(template, int) and 0 <= template < len(TEMPLATES)):
        raise InputError(f"template must be None or an index in [0, {len(TEMPLATES)}); got {template!r}")
    usable_names = single_token_words(tokenizer, names, "names", MIN_NAMES)
    places = single_token_words(tokenizer, PLACES, "places", 1)
    objects = single_token_words(tokenizer, OBJECTS, "objects", 1)
    if template is not None:
        templates = [TEMPLATES[template]]
    else:
        templates = _same_length_templates(tokenizer, usable_names[:2], places[0], objects[0])

    rng = random.Random(seed)
    clean, noise, answer, distractor = [], [], [], []
    for _ in range(n):
        text = rng.choice(templates)
        place, obj = rng.choice(places), rng.choice(objects)
        io, subject, noise_a, noise_b, noise_s2 = rng.sample(usable_names, 5)
        abba = rng.random() < 0.5 if order == "mixed" else order == "ABBA"
        first, second = (io, subject) if abba else (subject, io)
        clean.append(_fill(text, first, second, subject, place, obj))
        noise.append(_fill(text, noise_a, noise_b, noise_s2, place, obj))
        answer.append(" " + io)
        distractor.append(" " + subject)
    return PromptPairs.from_text(tokenizer, clean, noise, answer, distractor, metric="logit_diff")


def _fill(text: str, a: str, b: str, s2: str, place: str, obj: str) -> str:
    return text.format(A=a, B=b, S2=s2, PLACE=place, OBJECT=obj)


def _same_length_templates(tokenizer: Any, two_names: list[str], place: str, obj: str) -> list[str]:
    """Templates whose prompt has the most common token length (slots are single tokens, so one probe each)."""
    first, second = two_names
    lengths = [
        len(tokenizer.encode(_fill(text, first, second, second, place, obj), add_special_tokens=False))
        for text in TEMPLATES
    ]
    counts = Counter(lengths)
    best = max(counts.values())
    # Ties go to the length of the earliest template, so the rule does not depend on dict order.
    length = next(length for length in lengths if counts[length] == best)
    return [text for text, size in zip(TEMPLATES, lengths) if size == length]
