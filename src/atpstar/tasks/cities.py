"""City -> country factual recall pairs (the paper's CITY-PP family).

Clean prompt "Paris is a city in the country of" -> " France"; noise prompt: a city of another
country, e.g. "Tokyo is a city in the country of". Answer = the clean city's country, distractor =
the noise city's country; metric: logit difference at the last position.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

from ..errors import InputError
from ..pairs import PromptPairs
from ._common import check_count, check_seed, is_single_token

TEMPLATE = "{city} is a city in the country of"

# Well-known (city, country) facts; the country is the answer token, so prefer one-word names.
CITY_COUNTRY: tuple[tuple[str, str], ...] = (
    ("Paris", "France"),
    ("Lyon", "France"),
    ("Marseille", "France"),
    ("Nice", "France"),
    ("Berlin", "Germany"),
    ("Munich", "Germany"),
    ("Hamburg", "Germany"),
    ("Frankfurt", "Germany"),
    ("Rome", "Italy"),
    ("Milan", "Italy"),
    ("Naples", "Italy"),
    ("Venice", "Italy"),
    ("Florence", "Italy"),
    ("Madrid", "Spain"),
    ("Barcelona", "Spain"),
    ("Seville", "Spain"),
    ("Valencia", "Spain"),
    ("Tokyo", "Japan"),
    ("Osaka", "Japan"),
    ("Kyoto", "Japan"),
    ("Beijing", "China"),
    ("Shanghai", "China"),
    ("Shenzhen", "China"),
    ("Delhi", "India"),
    ("Mumbai", "India"),
    ("Bangalore", "India"),
    ("Chennai", "India"),
    ("Moscow", "Russia"),
    ("Petersburg", "Russia"),
    ("Toronto", "Canada"),
    ("Vancouver", "Canada"),
    ("Montreal", "Canada"),
    ("Sydney", "Australia"),
    ("Melbourne", "Australia"),
    ("Brisbane", "Australia"),
    ("Perth", "Australia"),
    ("Cairo", "Egypt"),
    ("Alexandria", "Egypt"),
    ("London", "England"),
    ("Manchester", "England"),
    ("Liverpool", "England"),
    ("Birmingham", "England"),
    ("Dublin", "Ireland"),
    ("Edinburgh", "Scotland"),
    ("Glasgow", "Scotland"),
    ("Amsterdam", "Netherlands"),
    ("Rotterdam", "Netherlands"),
    ("Brussels", "Belgium"),
    ("Vienna", "Austria"),
    ("Zurich", "Switzerland"),
    ("Geneva", "Switzerland"),
    ("Stockholm", "Sweden"),
    ("Oslo", "Norway"),
    ("Copenhagen", "Denmark"),
    ("Helsinki", "Finland"),
    ("Warsaw", "Poland"),
    ("Krakow", "Poland"),
    ("Prague", "Czech"),
    ("Budapest", "Hungary"),
    ("Athens", "Greece"),
    ("Lisbon", "Portugal"),
    ("Porto", "Portugal"),
    ("Istanbul", "Turkey"),
    ("Ankara", "Turkey"),
    ("Seoul", "Korea"),
    ("Bangkok", "Thailand"),
    ("Jakarta", "Indonesia"),
    ("Manila", "Philippines"),
    ("Hanoi", "Vietnam"),
    ("Karachi", "Pakistan"),
    ("Lahore", "Pakistan"),
    ("Tehran", "Iran"),
    ("Baghdad", "Iraq"),
    ("Nairobi", "Kenya"),
    ("Lagos", "Nigeria"),
    ("Casablanca", "Morocco"),
    ("Lima", "Peru"),
    ("Santiago", "Chile"),
    ("Bogota", "Colombia"),
    ("Caracas", "Venezuela"),
    ("Havana", "Cuba"),
    ("Rio", "Brazil"),
    ("Brasilia", "Brazil"),
    ("Cordoba", "Argentina"),
    ("Chicago", "America"),
    ("Boston", "America"),
    ("Houston", "America"),
    ("Seattle", "America"),
    ("Guadalajara", "Mexico"),
    ("Monterrey", "Mexico"),
)

MIN_COUNTRIES = 2


def cities(tokenizer: Any, n: int, seed: int = 0) -> PromptPairs:
    """City -> country prompt pairs with the logit-difference metric.

    Filtering rule, per tokenizer: a fact is kept if its country with a leading space is one known
    token, its prompt has no unknown token, and its prompt has the most common token length among
    those facts (ties: the shorter), so all prompts share one length. For SmolLM2 that keeps 44 of
    88 facts (cities of two tokens at the start of a sentence). Each pair draws a clean fact and
    a noise fact of a different country, uniformly.

    Args:
        tokenizer: a Hugging Face tokenizer (``encode(text, add_special_tokens=False)``).
        n: number of pairs.
        seed: seed of the draw; the same arguments give the same pairs.

    Returns:
        ``PromptPairs`` with answer = clean country, distractor = noise country, metric ``"logit_diff"``.

    Raises:
        InputError: ``n < 1``, or fewer than two countries survive the filter for this tokenizer.
    """
    check_count("n", n)
    check_seed(seed)
    facts = usable_facts(tokenizer)
    rng = random.Random(seed)
    clean, noise, answer, distractor = [], [], [], []
    for _ in range(n):
        city, country = rng.choice(facts)
        other_city, other_country = rng.choice([fact for fact in facts if fact[1] != country])
        clean.append(TEMPLATE.format(city=city))
        noise.append(TEMPLATE.format(city=other_city))
        answer.append(" " + country)
        distractor.append(" " + other_country)
    return PromptPairs.from_text(tokenizer, clean, noise, answer, distractor, metric="logit_diff")


def usable_facts(tokenizer: Any) -> list[tuple[str, str]]:
    """The (city, country) facts kept for this tokenizer by the rule in ``cities``."""
    if tokenizer is None or not hasattr(tokenizer, "encode"):
        raise InputError(f"a tokenizer with .encode is needed to build prompts; got {type(tokenizer).__name__}")
    facts = [(city, country) for city, country in CITY_COUNTRY if is_single_token(tokenizer, country)]
    unk = getattr(tokenizer, "unk_token_id", None)
    encoded = {city: tokenizer.encode(TEMPLATE.format(city=city), add_special_tokens=False) for city, _ in facts}
    facts = [(city, country) for city, country in facts if unk is None or unk not in encoded[city]]
    # The most common prompt length keeps the most facts (ties: the shorter, fewer nodes to attribute). At the
    # start of a sentence BPE tokenizers split most city names in two, so this is rarely the shortest length.
    counts = Counter(len(encoded[city]) for city, _ in facts)
    if counts:
        length = min(counts, key=lambda size: (-counts[size], size))
        facts = [(city, country) for city, country in facts if len(encoded[city]) == length]
    n_countries = len({country for _, country in facts})
    if n_countries < MIN_COUNTRIES:
        raise InputError(
            f"only {n_countries} countries have usable facts for this tokenizer (country one token with a leading "
            f"space, city prompts of the most common length); at least {MIN_COUNTRIES} are needed. Use a tokenizer "
            "with a natural-language vocabulary (e.g. SmolLM2's)."
        )
    return facts
