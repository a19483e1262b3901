"""Synthetic multi-turn chat corpus for the embedded demo.

Four task families whose assistant replies follow fixed, step-by-step templates: arithmetic,
unit conversion, list manipulation and made-up facts. Replies are predictable given the prompt
(a small target learns them on CPU in minutes), and that predictability is exactly what makes a
draft model's guesses get accepted. Follow-up turns ("now double it", "what about 12?") refer to
the previous exchange, so the target has to read the history, not just the last message.

Every row is built from its own RNG seeded by (namespace, seed, index): generate_conversations(n)
is a prefix of generate_conversations(n + k), shards are stable, and output is byte-identical
across runs and machines (string seeds go through sha512, not Python's salted hash()).
"""

import json
import random
from pathlib import Path

FAMILIES = ("arithmetic", "units", "lists", "facts")

SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a patient tutor. Show each step of your reasoning.",
    "You are a concise assistant. Answer precisely.",
    "You are a friendly helper for a small demo.",
)
P_SYSTEM = 0.3
# Probability of 2 and 3 exchanges; the rest are single-turn.
P_TWO_TURNS, P_THREE_TURNS = 0.35, 0.15

# ---------------------------------------------------------------------------------------------
# arithmetic: column-wise worked solutions, so every step is a one-digit fact the model can learn


def _digits(n: int) -> list[int]:
    """Digits of n, ones first."""
    return [int(c) for c in reversed(str(n))]


_PLACES = ("ones", "tens", "hundreds", "thousands")


def _join(steps: list[str]) -> str:
    """The first step continues the 'For a + b,' clause; later ones start a sentence."""
    return " ".join([steps[0]] + [s[0].upper() + s[1:] for s in steps[1:]])


# Each solution restates the problem first: later steps then copy digits from a fixed offset in
# the reply itself, which a small model learns much sooner than finding them in free-form prompts.


def _column_add(a: int, b: int) -> str:
    """'For 47 + 38, add the ones: 7 + 8 = 15, write 5, carry 1. Add the tens: ... So 47 + 38 = 85.'"""
    da, db = _digits(a), _digits(b)
    width = max(len(da), len(db))
    da += [0] * (width - len(da))
    db += [0] * (width - len(db))
    steps, carry = [], 0
    for i in range(width):
        terms = f"{da[i]} + {db[i]}" + (f" + {carry}" if carry else "")
        s = da[i] + db[i] + carry
        if i < width - 1 and s >= 10:
            steps.append(f"add the {_PLACES[i]}: {terms} = {s}, write {s % 10}, carry 1.")
        else:
            steps.append(f"add the {_PLACES[i]}: {terms} = {s}.")
        carry = s // 10
    return f"For {a} + {b}, {_join(steps)} So {a} + {b} = {a + b}."


def _column_sub(a: int, b: int) -> str:
    """a >= b. Borrowing is spelled out so each step is a one-digit fact."""
    da, db = _digits(a), _digits(b)
    db += [0] * (len(da) - len(db))
    steps, borrow = [], 0
    for i in range(len(da)):
        top = da[i] - borrow
        terms = f"{da[i]} - {db[i]}" + (f" - {borrow}" if borrow else "")
        if top < db[i]:
            steps.append(f"subtract the {_PLACES[i]}: {terms} needs a borrow, "
                         f"so {top + 10} - {db[i]} = {top + 10 - db[i]}.")
            borrow = 1
        else:
            steps.append(f"subtract the {_PLACES[i]}: {terms} = {top - db[i]}.")
            borrow = 0
    return f"For {a} - {b}, {_join(steps)} So {a} - {b} = {a - b}."


def _column_mul(a: int, m: int) -> str:
    """Two-digit a times one-digit m."""
    ones, tens = a % 10, a // 10
    p1 = ones * m
    p2 = tens * m
    first = f"For {a} × {m}, multiply the ones: {ones} × {m} = {p1}"
    first += f", write {p1 % 10}, carry {p1 // 10}." if p1 >= 10 else "."
    second = f"Multiply the tens: {tens} × {m} = {p2}"
    second += f", plus {p1 // 10} is {p2 + p1 // 10}." if p1 >= 10 else "."
    return f"{first} {second} So {a} × {m} = {a * m}."


def _parity(n: int) -> str:
    return f"The last digit of {n} is {n % 10}, so {n} is {'even' if n % 2 == 0 else 'odd'}."


_ASK_ADD = ("What is {a} + {b}?", "Compute {a} + {b}.", "Please add {a} and {b}.",
            "Can you work out {a} plus {b}?")
_ASK_SUB = ("What is {a} - {b}?", "Compute {a} - {b}.", "Please subtract {b} from {a}.",
            "Can you work out {a} minus {b}?")
_ASK_MUL = ("What is {a} × {b}?", "Compute {a} × {b}.", "Please multiply {a} by {b}.",
            "Can you work out {a} times {b}?")
_ASK_DOUBLE = ("Now double it.", "Can you double that?", "What is twice that number?")
_ASK_PARITY = ("Is that number even or odd?", "Is the result even or odd?", "Even or odd?")


def _arithmetic(rng: random.Random, turns: int) -> list[tuple[str, str]]:
    op = rng.choice(("add", "sub", "mul"))
    if op == "add":
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        result, ask, reply = a + b, _ASK_ADD, _column_add(a, b)
    elif op == "sub":
        a = rng.randint(10, 99)
        b = rng.randint(10, a)
        result, ask, reply = a - b, _ASK_SUB, _column_sub(a, b)
    else:
        a, b = rng.randint(10, 99), rng.randint(2, 9)
        result, ask, reply = a * b, _ASK_MUL, _column_mul(a, b)
    exchanges = [(rng.choice(ask).format(a=a, b=b), reply)]
    while len(exchanges) < turns:
        # Follow-ups act on the previous result; doubling only while it stays two columns wide.
        if result < 100 and rng.random() < 0.6:
            exchanges.append((rng.choice(_ASK_DOUBLE), _column_add(result, result)))
            result *= 2
        else:
            exchanges.append((rng.choice(_ASK_PARITY), _parity(result)))
    return exchanges


# ---------------------------------------------------------------------------------------------
# unit conversion: one formula per pair, spelled out the same way every time

# (big unit, small unit, factor, value range of the big unit)
_UNITS = (
    (("kilometre", "kilometres", "km"), ("metre", "metres", "m"), 1000, (1, 99)),
    (("kilogram", "kilograms", "kg"), ("gram", "grams", "g"), 1000, (1, 99)),
    (("hour", "hours", "h"), ("minute", "minutes", "min"), 60, (1, 24)),
)
_ASK_CONVERT = ("Convert {v} {u} to {w}.", "How many {w} are in {v} {u}?",
                "What is {v} {u} in {w}?", "Please change {v} {u} into {w}.")
_ASK_AGAIN = ("What about {v}?", "And {v}?", "Now do the same for {v}.")
_ASK_BACK = ("Now convert that back.", "And back again?", "Can you convert the answer back?")


def _quantity(v: int, unit: tuple[str, str, str]) -> str:
    return f"{v} {unit[0] if v == 1 else unit[1]}"


def _convert(v: int, big: tuple, small: tuple, factor: int, to_small: bool) -> str:
    article = "an" if big[0][0] in "aeiouh" else "a"  # "an hour", "a kilometre"
    head = f"There are {factor} {small[1]} in {article} {big[0]}, so "
    if to_small:
        return (head + f"multiply by {factor}: {v} × {factor} = {v * factor}. "
                f"So {_quantity(v, big)} is {_quantity(v * factor, small)}.")
    return (head + f"divide by {factor}: {v} / {factor} = {v // factor}. "
            f"So {_quantity(v, small)} is {_quantity(v // factor, big)}.")


def _units(rng: random.Random, turns: int) -> list[tuple[str, str]]:
    big, small, factor, (lo, hi) = rng.choice(_UNITS)
    to_small = rng.random() < 0.6
    n = rng.randint(lo, hi)
    v = n if to_small else n * factor
    src, dst = (big, small) if to_small else (small, big)
    exchanges = [(rng.choice(_ASK_CONVERT).format(v=v, u=src[1] if v != 1 else src[0], w=dst[1]),
                  _convert(v, big, small, factor, to_small))]
    while len(exchanges) < turns:
        if rng.random() < 0.5:
            # Convert the previous answer the other way round.
            v = v * factor if to_small else v // factor
            to_small = not to_small
            exchanges.append((rng.choice(_ASK_BACK), _convert(v, big, small, factor, to_small)))
        else:
            n = rng.randint(lo, hi)
            v = n if to_small else n * factor
            exchanges.append((rng.choice(_ASK_AGAIN).format(v=v),
                              _convert(v, big, small, factor, to_small)))
    return exchanges


# ---------------------------------------------------------------------------------------------
# list manipulation: short lists of small numbers, answers restate the input then the result


def _fmt(xs: list[int]) -> str:
    return "[" + ", ".join(str(x) for x in xs) + "]"


def _list_op(op: str, xs: list[int]) -> tuple[str, list[int] | None]:
    """Reply text and the list a follow-up should act on (None when the answer is a number).

    Replies write the result once, plus fixed sentences: every number in them is one token picked
    from the prompt (numbers up to 99 are single tokens), which a small model learns quickly.
    """
    n = len(xs)
    if op in ("sort", "sort_desc"):
        ys = sorted(xs, reverse=op == "sort_desc")
        a, b = ("smallest", "largest") if op == "sort" else ("largest", "smallest")
        return f"From {a} to {b}, the {n} numbers are {_fmt(ys)}. The first one is the {a}.", ys
    if op == "reverse":
        ys = xs[::-1]
        return (f"Read from the end to the start, the list becomes {_fmt(ys)}. "
                "The last number now comes first."), ys
    if op in ("max", "min"):
        v = max(xs) if op == "max" else min(xs)
        which, than = ("largest", "bigger") if op == "max" else ("smallest", "smaller")
        return f"The {which} number in the list is {v}. No other number in it is {than} than {v}.", None
    if op == "count":
        return f"The list has {n} numbers in it, so its length is {n}.", None
    # sum: a running total, each step one small addition
    total, steps = xs[0], []
    for x in xs[1:]:
        steps.append(f"{total} + {x} = {total + x}")
        total += x
    return f"Adding the numbers in order: {', then '.join(steps)}. The sum is {total}.", None


_ASK_LIST = {
    "sort": ("Sort {l} in ascending order.", "Please sort this list: {l}",
             "Can you put {l} in order from smallest to largest?"),
    "sort_desc": ("Sort {l} in descending order.", "Order {l} from largest to smallest.",
                  "Please sort this list from biggest to smallest: {l}"),
    "reverse": ("Reverse the list {l}.", "What is {l} reversed?", "Please reverse {l}."),
    "max": ("What is the largest number in {l}?", "Find the maximum of {l}.",
            "Which number in {l} is the biggest?"),
    "min": ("What is the smallest number in {l}?", "Find the minimum of {l}.",
            "Which number in {l} is the smallest?"),
    "sum": ("What is the sum of {l}?", "Add up the numbers in {l}.", "Please total {l}."),
}
_ASK_LIST_FOLLOW = {
    "reverse": ("Now reverse it.", "Can you reverse that list?"),
    "max": ("What is the largest number in it?", "Which one is the biggest?"),
    "min": ("What is the smallest number in it?", "Which one is the smallest?"),
    "count": ("How many numbers are in it?", "How long is that list?"),
    "sum": ("What do they add up to?", "Now add them all up."),
}


def _lists(rng: random.Random, turns: int) -> list[tuple[str, str]]:
    op = rng.choice(tuple(_ASK_LIST))
    # Short lists of distinct numbers: each element is its own token, so picking and ordering
    # them is unambiguous; sums use one-digit numbers so each step is a small addition.
    hi = 9 if op == "sum" else 20
    xs = rng.sample(range(1, hi + 1), rng.randint(3, 4))
    reply, current = _list_op(op, xs)
    exchanges = [(rng.choice(_ASK_LIST[op]).format(l=_fmt(xs)), reply)]
    current = current or xs
    while len(exchanges) < turns:
        choices = [k for k in _ASK_LIST_FOLLOW if k != "sum" or max(current) <= 9]
        op = rng.choice(choices)
        reply, ys = _list_op(op, current)
        exchanges.append((rng.choice(_ASK_LIST_FOLLOW[op]), reply))
        current = ys or current
    return exchanges


# ---------------------------------------------------------------------------------------------
# facts: a small made-up world, so answers can only come from the corpus, never from priors

# name: (colour, home, food)
CREATURES = {
    "zorbel": ("blue", "the Misty Hills", "moon berries"),
    "plinket": ("amber", "the Salt Marsh", "river snails"),
    "mossrat": ("green", "the Copper Caves", "pine seeds"),
    "glimmerfox": ("silver", "the Pine Valley", "honey moss"),
    "toadkin": ("violet", "the Glass Lake", "star beetles"),
    "brambler": ("crimson", "the Thorn Woods", "red clover"),
    "quillhog": ("golden", "the Dust Plains", "sand crickets"),
    "fennix": ("white", "the Frost Peaks", "ice lichen"),
    "dunmole": ("grey", "the Deep Burrows", "root bulbs"),
    "wispowl": ("teal", "the Silent Forest", "night moths"),
    "marrowcat": ("black", "the Old Ruins", "cave fish"),
    "pebblin": ("orange", "the Stone Coast", "sea grapes"),
}
# name: (capital, famous for)
LANDS = {
    "Veloria": ("Marenth", "glass bridges"),
    "Tarnwick": ("Oslund", "copper bells"),
    "Quenmoor": ("Falbrook", "floating gardens"),
    "Drisk": ("Helvane", "salt mines"),
    "Ambervale": ("Korrin", "silk kites"),
    "Nythra": ("Sellow", "singing caves"),
    "Pell": ("Virenth", "tall lighthouses"),
    "Ostmark": ("Brennan", "winter markets"),
}
_ASK_CREATURE = {
    "colour": ("What colour is a {c}?", "What colour is the {c}?",
               "Tell me the colour of a {c}."),
    "home": ("Where does the {c} live?", "Where can I find a {c}?",
             "What is the home of the {c}?"),
    "food": ("What does a {c} eat?", "What does the {c} like to eat?",
             "What is the food of the {c}?"),
}
_ANSWER_CREATURE = {
    "colour": "A {c} is always {colour}. You can spot a {c} by its {colour} fur.",
    "home": "The {c} lives in {home}. A {c} rarely leaves {home}.",
    "food": "The {c} eats {food}. A hungry {c} looks for {food} first.",
}
_ASK_CREATURE_FOLLOW = {
    "colour": ("And what colour is it?",),
    "home": ("And where does it live?",),
    "food": ("And what does it eat?",),
}
_ASK_LAND = {
    "capital": ("What is the capital of {l}?", "Which city is the capital of {l}?",
                "Name the capital of {l}."),
    "famous": ("What is {l} famous for?", "What is {l} known for?",
               "Why do people visit {l}?"),
}
_ANSWER_LAND = {
    "capital": "The capital of {l} is {capital}. {capital} is the largest city in {l}.",
    "famous": "{l} is famous for its {thing}. Visitors come to {l} to see the {thing}.",
}
_ASK_LAND_FOLLOW = {"capital": ("And what is its capital?",),
                    "famous": ("And what is it famous for?",)}
_ASK_ABOUT = ("What about the {x}?", "And the {x}?")
_ASK_ABOUT_LAND = ("What about {x}?", "And {x}?")


def _creature_answer(attr: str, c: str) -> str:
    colour, home, food = CREATURES[c]
    return _ANSWER_CREATURE[attr].format(c=c, colour=colour, home=home, food=food)


def _land_answer(attr: str, land: str) -> str:
    capital, thing = LANDS[land]
    return _ANSWER_LAND[attr].format(l=land, capital=capital, thing=thing)


def _facts(rng: random.Random, turns: int) -> list[tuple[str, str]]:
    creature = rng.random() < 0.6
    table, asks, follow, about, answer = (
        (CREATURES, _ASK_CREATURE, _ASK_CREATURE_FOLLOW, _ASK_ABOUT, _creature_answer)
        if creature else (LANDS, _ASK_LAND, _ASK_LAND_FOLLOW, _ASK_ABOUT_LAND, _land_answer))
    key = "c" if creature else "l"
    name = rng.choice(sorted(table))
    attr = rng.choice(sorted(asks))
    exchanges = [(rng.choice(asks[attr]).format(**{key: name}), answer(attr, name))]
    while len(exchanges) < turns:
        if rng.random() < 0.5:
            # Same subject, another attribute: the answer needs the subject from the history.
            attr = rng.choice([a for a in sorted(asks) if a != attr])
            exchanges.append((rng.choice(follow[attr]), answer(attr, name)))
        else:
            # Same attribute, another subject.
            name = rng.choice([n for n in sorted(table) if n != name])
            exchanges.append((rng.choice(about).format(x=name), answer(attr, name)))
    return exchanges


_BUILDERS = {"arithmetic": _arithmetic, "units": _units, "lists": _lists, "facts": _facts}

# ---------------------------------------------------------------------------------------------


def _conversation(namespace: str, seed: int, index: int) -> dict:
    rng = random.Random(f"specdraft-demo:{namespace}:{seed}:{index}")
    family = FAMILIES[index % len(FAMILIES)]  # round-robin: every family in every small slice
    r = rng.random()
    turns = 3 if r < P_THREE_TURNS else 2 if r < P_THREE_TURNS + P_TWO_TURNS else 1
    messages = []
    if rng.random() < P_SYSTEM:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    for user, assistant in _BUILDERS[family](rng, turns):
        messages.append({"role": "user", "content": user})
        messages.append({"role": "assistant", "content": assistant})
    prefix = "demo" if namespace == "train" else namespace
    return {"id": f"{prefix}-s{seed}-{index:06d}", "messages": messages, "source": f"demo/{family}"}


def generate_conversations(n: int, seed: int) -> list[dict]:
    """n training-namespace conversations; a prefix of any longer call with the same seed."""
    return [_conversation("train", seed, i) for i in range(n)]


HELDOUT_SEED = 10_007


def heldout_conversations(n: int = 64) -> list[dict]:
    """Evaluation conversations from a separate RNG namespace; ids start with 'heldout-'."""
    return [_conversation("heldout", HELDOUT_SEED, i) for i in range(n)]


def write_demo_corpus(out_dir: str | Path, n_shards: int = 4, rows_per_shard: int = 400,
                      seed: int = 0) -> list[Path]:
    """Write demo-00000.jsonl ... (the file stem is the shard key). Same args, same bytes.

    Each file is written to a temporary name and renamed, so a reader never sees half a shard.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = generate_conversations(n_shards * rows_per_shard, seed)
    paths = []
    for s in range(n_shards):
        path = out / f"demo-{s:05d}.jsonl"
        chunk = rows[s * rows_per_shard:(s + 1) * rows_per_shard]
        data = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in chunk)
        data_bytes = data.encode("utf-8")
        if not (path.exists() and path.read_bytes() == data_bytes):
            tmp = path.with_suffix(".jsonl.tmp")
            tmp.write_bytes(data_bytes)
            tmp.replace(path)
        paths.append(path)
    return paths
