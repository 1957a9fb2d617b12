"""Names for apps created without one, shaped like Flynn's `animal-verb-town`
(e.g. `otter-dances-lisbon`): random words, seeded per cluster by `NAME_SEED` so two clusters
do not hand out the same sequence."""

from __future__ import annotations

import hashlib
import secrets

ANIMALS = [
    "otter",
    "badger",
    "heron",
    "lynx",
    "marten",
    "puffin",
    "walrus",
    "bison",
    "ibex",
    "gecko",
    "tapir",
    "koala",
    "lemur",
    "narwhal",
    "ocelot",
    "panda",
    "quokka",
    "raven",
    "stoat",
    "toucan",
    "vole",
    "wombat",
    "yak",
    "zebra",
    "falcon",
    "moose",
    "beaver",
    "camel",
    "dingo",
    "egret",
    "ferret",
    "gibbon",
    "hyena",
    "jackal",
    "kiwi",
    "llama",
    "magpie",
    "newt",
    "osprey",
]
VERBS = [
    "dances",
    "sings",
    "jumps",
    "runs",
    "swims",
    "reads",
    "paints",
    "builds",
    "climbs",
    "dreams",
    "sails",
    "writes",
    "wanders",
    "hums",
    "bakes",
    "knits",
    "skates",
    "juggles",
    "rows",
    "hikes",
    "naps",
    "cooks",
    "whistles",
    "plays",
]
TOWNS = [
    "lisbon",
    "oslo",
    "quito",
    "lagos",
    "lima",
    "hanoi",
    "dakar",
    "sofia",
    "tunis",
    "perth",
    "cairo",
    "porto",
    "turku",
    "bergen",
    "ghent",
    "kyoto",
    "leeds",
    "malmo",
    "nantes",
    "riga",
    "siena",
    "tartu",
    "utrecht",
    "vigo",
    "zadar",
]


def generate(seed: str = "") -> str:
    """A random `animal-verb-town` name; the seed mixes into the randomness."""
    digest = hashlib.sha256(seed.encode() + secrets.token_bytes(16)).digest()
    n = int.from_bytes(digest, "big")
    animal = ANIMALS[n % len(ANIMALS)]
    n //= len(ANIMALS)
    verb = VERBS[n % len(VERBS)]
    n //= len(VERBS)
    town = TOWNS[n % len(TOWNS)]
    return f"{animal}-{verb}-{town}"
