"""The demo corpus's math domain: short arithmetic and algebra problems with worked solutions.

Each family (column addition, long division, fractions, linear systems, percentages, GCD by the
Euclidean algorithm, order of operations, ...) draws its numbers from a `random.Random` and returns a
key naming the problem (family and numbers, not the wording), the question, the worked solution and
the answer. The caller decides each problem's split by its key (:mod:`btx_jax.data.demo_sources`), so
an eval problem never appears in train under another phrasing. Every step a solution states is
checked by tests/test_demo_sources.py.
"""
from __future__ import annotations

import math
import random
from fractions import Fraction
from typing import Callable

_NAMES = (
    "Ada", "Ben", "Chloe", "Dev", "Elena", "Farid", "Grace", "Hugo", "Ines", "Jonas",
    "Kira", "Liam", "Maya", "Noah", "Olga", "Priya", "Quinn", "Rosa", "Sam", "Tariq",
    "Uma", "Victor", "Wen", "Yusuf", "Zoe", "Aiko", "Bruno", "Carmen", "Diego", "Freya",
)
_ITEMS = (
    "apples", "marbles", "stickers", "pencils", "books", "stamps", "cards", "shells",
    "coins", "buttons", "beads", "cookies", "toy cars", "seeds", "bricks", "postcards",
)
_PLACES = ("ones", "tens", "hundreds", "thousands", "ten-thousands", "hundred-thousands")
_HEADERS = ("", "Problem: ", "Question: ")
_SOLUTION_HEADERS = ("Solution:", "Step by step:", "Working:", "Let's work it out.")


def _two_names(rng: random.Random) -> tuple[str, str]:
    """Two different people for a word problem."""
    first, second = rng.sample(_NAMES, 2)
    return first, second


def _number(rng: random.Random, min_digits: int, max_digits: int) -> int:
    """A number whose digit count is itself random, so short and long ones both appear."""
    digits = rng.randint(min_digits, max_digits)
    return rng.randint(10 ** (digits - 1), 10**digits - 1)


def _p(n: int | Fraction) -> str:
    """A number as an operand: negatives in parentheses so '3 - (-2)' reads right."""
    return f"({n})" if n < 0 else str(n)


def _term(coef: int, var: str) -> str:
    """'3x', '-x', 'x' for a leading linear term."""
    if coef == 1:
        return var
    if coef == -1:
        return f"-{var}"
    return f"{coef}{var}"


def _linear(terms: list[tuple[int, str]]) -> str:
    """'2x - 3y + 4' from (coefficient, variable) pairs; '' as variable is a constant."""
    out = ""
    for coef, var in terms:
        if coef == 0:
            continue
        body = str(abs(coef)) if not var or abs(coef) != 1 else ""
        if not out:
            out = ("-" if coef < 0 else "") + body + var
        else:
            out += (" - " if coef < 0 else " + ") + body + var
    return out or "0"


def _signed_sum(values: list[int]) -> str:
    """'16 - 4 + 8' for a list of terms, as a person writes a sum."""
    out = str(values[0])
    for v in values[1:]:
        out += f" - {-v}" if v < 0 else f" + {v}"
    return out


def _ordinal(n: int) -> str:
    """'1st', '2nd', '11th', '23rd'."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _euclid_lines(a: int, b: int) -> tuple[list[str], int]:
    """Euclidean algorithm steps 'a = q * b + r' for the larger number first, and the gcd."""
    a, b = max(a, b), min(a, b)
    lines = []
    while b:
        q, r = divmod(a, b)
        lines.append(f"{a} = {q} * {b} + {r}")
        a, b = b, r
    return lines, a


def _addition(rng: random.Random) -> tuple[str, str, str, str]:
    """Column addition with carries, or adding place-value parts one at a time."""
    a, b = _number(rng, 2, 5), _number(rng, 2, 5)
    n1, n2 = _two_names(rng)
    item = rng.choice(_ITEMS)
    question = rng.choice((
        f"What is {a} + {b}?",
        f"Compute {a} + {b}.",
        f"Find the sum of {a} and {b}.",
        f"Add {a} and {b}.",
        f"{n1} has {a} {item}. {n2} gives {n1} {b} more. How many {item} does {n1} have now?",
    ))
    if rng.random() < 0.6:
        steps = ["Add column by column, starting from the ones."]
        carry, da, db = 0, str(a)[::-1], str(b)[::-1]
        for i in range(max(len(da), len(db))):
            terms = [int(s[i]) for s in (da, db) if i < len(s)] + ([carry] if carry else [])
            total = sum(terms)
            place = _PLACES[i].capitalize()
            if len(terms) == 1:
                steps.append(f"{place}: bring down {total}.")
            else:
                tail = f", write {total % 10} and carry 1." if total >= 10 else f", write {total}."
                steps.append(f"{place}: {' + '.join(map(str, terms))} = {total}{tail}")
            carry = total // 10
        if carry:
            steps.append("The last carry 1 becomes the leading digit.")
    else:
        parts = _place_parts(b)
        steps = [f"Break {b} into {' + '.join(map(str, parts))} and add one part at a time."]
        acc = a
        for part in parts:
            steps.append(f"{acc} + {part} = {acc + part}.")
            acc += part
    steps.append(f"So {a} + {b} = {a + b}.")
    return f"addition:{a}:{b}", question, "\n".join(steps), str(a + b)


def _place_parts(n: int) -> list[int]:
    """925 -> [900, 20, 5]: the non-zero place-value parts of n."""
    s = str(n)
    return [int(d) * 10 ** (len(s) - i - 1) for i, d in enumerate(s) if d != "0"]


def _subtraction(rng: random.Random) -> tuple[str, str, str, str]:
    """Column subtraction with borrowing, or subtracting a round number and adjusting."""
    a = _number(rng, 3, 5)
    b = rng.randint(10, a - 1)
    n1, n2 = _two_names(rng)
    item = rng.choice(_ITEMS)
    question = rng.choice((
        f"What is {a} - {b}?",
        f"Compute {a} minus {b}.",
        f"Subtract {b} from {a}.",
        f"Find the difference between {a} and {b}.",
        f"{n1} had {a} {item} and gave {b} of them to {n2}. How many {item} does {n1} have left?",
    ))
    step = 10 ** (len(str(b)) - 1)
    rounded = -(-b // step) * step
    if rounded != b and rounded <= a and rng.random() < 0.4:
        steps = [
            f"Round {b} up to {rounded}, subtract that, then add back the extra {rounded - b}.",
            f"{a} - {rounded} = {a - rounded}.",
            f"{a - rounded} + {rounded - b} = {a - b}.",
        ]
    else:
        steps = ["Subtract column by column, starting from the ones."] + _borrow_lines(a, b)
    steps.append(f"So {a} - {b} = {a - b}.")
    return f"subtraction:{a}:{b}", question, "\n".join(steps), str(a - b)


def _borrow_lines(a: int, b: int) -> list[str]:
    """One line per column of a - b, saying when a borrow happens."""
    da, db = str(a)[::-1], str(b)[::-1]
    lines, borrow = [], 0
    for i, ch in enumerate(da):
        top, bottom = int(ch), int(db[i]) if i < len(db) else None
        place = _PLACES[i].capitalize()
        expr = str(top) + (" - 1" if borrow else "")
        have = top - borrow
        if have < (bottom or 0):
            sub = f" - {bottom}" if bottom is not None else ""
            lines.append(
                f"{place}: {expr} is too small, so borrow 1 from the {_PLACES[i + 1]}: "
                f"10 + {expr}{sub} = {10 + have - (bottom or 0)}."
            )
            borrow = 1
            continue
        if bottom is None and not borrow:
            lines.append(f"{place}: bring down {top}.")
        else:
            sub = f" - {bottom}" if bottom is not None else ""
            lines.append(f"{place}: {expr}{sub} = {have - (bottom or 0)}.")
        borrow = 0
    return lines


def _multiplication(rng: random.Random) -> tuple[str, str, str, str]:
    """Partial products over the place-value parts of one factor."""
    a, b = _number(rng, 2, 4), _number(rng, 1, 3)
    if b < 2:
        b = rng.randint(2, 9)
    n1, _ = _two_names(rng)
    item = rng.choice(_ITEMS)
    question = rng.choice((
        f"What is {a} * {b}?",
        f"Multiply {a} by {b}.",
        f"Find the product of {a} and {b}.",
        f"Compute {a} times {b}.",
        f"{n1} buys {b} boxes of {item}, with {a} {item} in each box. How many {item} is that?",
    ))
    split, other = (b, a) if len(_place_parts(b)) > 1 else (a, b)
    parts = _place_parts(split)
    if len(parts) == 1:
        steps = _round_product_lines(a, b)
    else:
        steps = [f"Split {split} into {' + '.join(map(str, parts))} and multiply each part by {other}."]
        steps += [f"{other} * {part} = {other * part}." for part in parts]
        products = " + ".join(str(other * part) for part in parts)
        steps.append(f"Add the partial products: {products} = {a * b}.")
    steps.append(f"So {a} * {b} = {a * b}.")
    return f"multiplication:{a}:{b}", question, "\n".join(steps), str(a * b)


def _round_product_lines(a: int, b: int) -> list[str]:
    """a * b for numbers like 300 and 20: multiply the leading digits, then add the zeros."""
    da, db = str(a), str(b)
    zeros = len(da) - len(da.rstrip("0")) + len(db) - len(db.rstrip("0"))
    lead = int(da.rstrip("0")) * int(db.rstrip("0"))
    noun = "zero" if zeros == 1 else "zeros"
    return [
        f"Multiply without the trailing zeros: {da.rstrip('0')} * {db.rstrip('0')} = {lead}.",
        f"Then put back the {zeros} {noun} from the factors to get {a * b}.",
    ]


def _division(rng: random.Random) -> tuple[str, str, str, str]:
    """Long division digit by digit, ending with quotient, remainder and a check."""
    d = rng.randint(3, 25)
    q = rng.randint(10, 9999 // d)
    r = rng.randint(0, d - 1)
    n = q * d + r
    if n > 9999:
        n, r = q * d, 0
    n1, _ = _two_names(rng)
    item = rng.choice(_ITEMS)
    question = rng.choice((
        f"What is {n} divided by {d}? Give the quotient and the remainder.",
        f"Divide {n} by {d}.",
        f"Use long division to find {n} / {d}.",
        f"Find the quotient and remainder when {n} is divided by {d}.",
        f"{n1} packs {n} {item} into bags of {d}. How many full bags are there, "
        f"and how many {item} are left over?",
    ))
    steps, cur, started = [], 0, False
    digits = str(n)
    for i, ch in enumerate(digits):
        cur = cur * 10 + int(ch)
        if not started and cur < d and i < len(digits) - 1:
            continue
        if started:
            steps.append(f"Bring down the {ch} to get {cur}.")
        started = True
        qd = cur // d
        if qd == 0:
            steps.append(f"{cur} is less than {d}, so the next quotient digit is 0.")
        else:
            steps.append(
                f"{cur} divided by {d} gives {qd}: {qd} * {d} = {qd * d}, "
                f"remainder {cur} - {qd * d} = {cur - qd * d}."
            )
        cur -= qd * d
    steps.append(f"The quotient is {n // d} and the remainder is {n % d}.")
    steps.append(f"Check: {d} * {n // d} + {n % d} = {n}.")
    return f"division:{n}:{d}", question, "\n".join(steps), f"{n // d} remainder {n % d}"


def _fraction_add(rng: random.Random) -> tuple[str, str, str, str]:
    """Fractions over the least common denominator, simplified with the gcd."""
    b, d = rng.randint(2, 12), rng.randint(2, 12)
    a, c = rng.randint(1, b - 1), rng.randint(1, d - 1)
    n1, _ = _two_names(rng)
    question = rng.choice((
        f"What is {a}/{b} + {c}/{d}?",
        f"Add {a}/{b} and {c}/{d}. Simplify your answer.",
        f"Find the sum of {a}/{b} and {c}/{d} in lowest terms.",
        f"{n1} walked {a}/{b} of a mile in the morning and {c}/{d} of a mile in the evening. "
        f"How many miles did {n1} walk in total?",
    ))
    g = math.gcd(b, d)
    lcd = b * d // g
    if b == d:
        steps = [f"The denominators are both {b}, so add the numerators: {a} + {c} = {a + c}."]
    else:
        x, y = a * (lcd // b), c * (lcd // d)
        steps = [
            f"The denominators are {b} and {d}. Their gcd is {g}, so the least common "
            f"denominator is {b} * {d} / {g} = {lcd}.",
            f"Multiply top and bottom of {a}/{b} by {lcd // b}: {a}/{b} = {x}/{lcd}.",
            f"Multiply top and bottom of {c}/{d} by {lcd // d}: {c}/{d} = {y}/{lcd}.",
            f"Add the numerators: {x} + {y} = {x + y}, giving {x + y}/{lcd}.",
        ]
    total = Fraction(a, b) + Fraction(c, d)
    num = a + c if b == d else a * (lcd // b) + c * (lcd // d)
    steps.append(_simplify_line(num, lcd))
    return f"fraction_add:{a}/{b}:{c}/{d}", question, "\n".join(steps), str(total)


def _simplify_line(num: int, den: int) -> str:
    """The sentence that reduces num/den to lowest terms with its gcd."""
    g = math.gcd(num, den)
    if g == 1:
        return f"The gcd of {num} and {den} is 1, so {num}/{den} is already in lowest terms."
    return (
        f"The gcd of {num} and {den} is {g}; divide top and bottom by it: "
        f"{num}/{den} = {Fraction(num, den)}."
    )


def _simplify_fraction(rng: random.Random) -> tuple[str, str, str, str]:
    """Reducing a fraction, finding the gcd with the Euclidean algorithm."""
    g = rng.randint(2, 30)
    m, n = rng.randint(1, 40), rng.randint(2, 40)
    while math.gcd(m, n) != 1 or m == n:
        m, n = rng.randint(1, 40), rng.randint(2, 40)
    a, b = g * m, g * n
    question = rng.choice((
        f"Simplify {a}/{b}.",
        f"Write {a}/{b} in lowest terms.",
        f"Reduce the fraction {a}/{b}.",
        f"What is {a}/{b} in simplest form?",
    ))
    lines, found = _euclid_lines(a, b)
    steps = [f"Find the gcd of {a} and {b} with the Euclidean algorithm:"] + lines
    steps += [
        f"The last nonzero remainder is {found}.",
        f"Divide top and bottom by {found}: {a} / {found} = {a // found} and {b} / {found} = {b // found}.",
        f"So {a}/{b} = {Fraction(a, b)}.",
    ]
    return f"simplify:{a}/{b}", question, "\n".join(steps), str(Fraction(a, b))


def _linear_steps(a: int, b: int, c: int) -> list[str]:
    """Solving ax + b = c: undo the constant, then the coefficient, then check."""
    x = (c - b) // a
    ax = _term(a, "x")
    steps = []
    if b > 0:
        steps.append(f"Subtract {b} from both sides: {ax} = {c} - {b} = {c - b}.")
    elif b < 0:
        steps.append(f"Add {-b} to both sides: {ax} = {c} + {-b} = {c - b}.")
    if a != 1:
        steps.append(f"Divide both sides by {a}: x = {c - b} / {_p(a)} = {x}.")
    sign = "+" if b >= 0 else "-"
    steps.append(f"Check: {a} * {_p(x)} {sign} {abs(b)} = {c}.")
    return steps


def _linear_equation(rng: random.Random) -> tuple[str, str, str, str]:
    """ax + b = c, sometimes with x on both sides first."""
    x, b = rng.randint(-15, 15), rng.choice([v for v in range(-40, 41) if v])
    if rng.random() < 0.6:
        a = rng.choice([v for v in range(-12, 13) if abs(v) >= 2])
        c = a * x + b
        equation = f"{_linear([(a, 'x'), (b, '')])} = {c}"
        steps = _linear_steps(a, b, c)
    else:
        q = rng.randint(1, 9)
        p = rng.randint(q + 1, q + 9)
        f = (p - q) * x + b
        equation = f"{_linear([(p, 'x'), (b, '')])} = {_linear([(q, 'x'), (f, '')])}"
        reduced = f"{_linear([(p - q, 'x'), (b, '')])} = {f}"
        steps = [f"Subtract {_term(q, 'x')} from both sides: {reduced}."]
        steps += _linear_steps(p - q, b, f)[:-1]
        steps.append(f"Check: {p} * {_p(x)} {'+' if b >= 0 else '-'} {abs(b)} = {p * x + b} "
                     f"and {q} * {_p(x)} {'+' if f >= 0 else '-'} {abs(f)} = {q * x + f}.")
    question = rng.choice((
        f"Solve for x: {equation}.",
        f"Find x if {equation}.",
        f"What value of x makes {equation} true?",
        f"Solve the equation {equation}.",
    ))
    return f"linear:{equation}", question, "\n".join(steps), f"x = {x}"


def _linear_system(rng: random.Random) -> tuple[str, str, str, str]:
    """Two equations in x and y by elimination, then back-substitution and a check."""
    coefs = [v for v in range(-6, 7) if v]
    while True:
        a1, b1, a2, b2 = (rng.choice(coefs) for _ in range(4))
        if a1 * b2 - a2 * b1:
            break
    x, y = rng.randint(-9, 9), rng.randint(-9, 9)
    c1, c2 = a1 * x + b1 * y, a2 * x + b2 * y
    e1 = f"{_linear([(a1, 'x'), (b1, 'y')])} = {c1}"
    e2 = f"{_linear([(a2, 'x'), (b2, 'y')])} = {c2}"
    question = rng.choice((
        f"Solve the system: {e1} and {e2}.",
        f"Find x and y such that {e1} and {e2}.",
        f"Solve the simultaneous equations {e1}, {e2}.",
        f"Find the solution (x, y) of {e1} and {e2}.",
    ))
    if a1 == a2:
        steps, m1, m2 = ["The x terms already match."], 1, 1
    else:
        m1, m2 = a2, a1
        steps = [
            f"Multiply the first equation by {m1} and the second by {m2}: "
            f"{_linear([(a1 * m1, 'x'), (b1 * m1, 'y')])} = {c1 * m1} and "
            f"{_linear([(a2 * m2, 'x'), (b2 * m2, 'y')])} = {c2 * m2}.",
        ]
    big_b, big_c = b1 * m1 - b2 * m2, c1 * m1 - c2 * m2
    steps.append(
        f"Subtract the second from the first. The y coefficient is {b1 * m1} - {_p(b2 * m2)} = "
        f"{big_b} and the right side is {c1 * m1} - {_p(c2 * m2)} = {big_c}, so "
        f"{_term(big_b, 'y')} = {big_c}."
    )
    if big_b != 1:
        steps.append(f"Divide by {big_b}: y = {big_c} / {_p(big_b)} = {y}.")
    rest = c1 - b1 * y
    steps.append(
        f"Put y = {y} into the first equation: {b1} * {_p(y)} = {b1 * y}, so "
        f"{_term(a1, 'x')} + {_p(b1 * y)} = {c1} and {_term(a1, 'x')} = {c1} - {_p(b1 * y)} = {rest}."
    )
    if a1 != 1:
        steps.append(f"Divide by {a1}: x = {rest} / {_p(a1)} = {x}.")
    steps.append(f"Check with the second equation: {a2} * {_p(x)} + {_p(b2)} * {_p(y)} = {c2}.")
    return f"system:{e1}:{e2}", question, "\n".join(steps), f"x = {x}, y = {y}"


def _percent_base(rng: random.Random, low: int, high: int) -> tuple[int, int]:
    """A percentage p and a whole N with p% of N a whole number."""
    p = rng.choice((5, 10, 12, 15, 20, 25, 30, 35, 40, 45, 50, 60, 64, 70, 75, 80, 90) +
                   tuple(range(1, 100, 7)))
    unit = 100 // math.gcd(p, 100)
    n = unit * rng.randint(max(1, low // unit), max(1, high // unit))
    return p, n


def _percent_of(rng: random.Random) -> tuple[str, str, str, str]:
    """p% of N, either as N * p / 100 or through the reduced fraction p/100."""
    p, n = _percent_base(rng, 20, 2000)
    n1, n2 = _two_names(rng)
    item = rng.choice(_ITEMS)
    question = rng.choice((
        f"What is {p}% of {n}?",
        f"Find {p} percent of {n}.",
        f"{n1} has {n} {item} and gives {p}% of them to {n2}. How many {item} does {n2} get?",
        f"A school has {n} students and {p}% of them walk to school. How many students walk?",
        f"Calculate {p}% of {n}.",
    ))
    result = n * p // 100
    if rng.random() < 0.5:
        steps = [
            f"{p}% means {p} out of every 100, so take {n} * {p} and divide by 100.",
            f"{n} * {p} = {n * p}, and {n * p} / 100 = {result}.",
        ]
    else:
        frac = Fraction(p, 100)
        steps = [
            f"Write {p}% as a fraction: {p}/100 = {frac}.",
            f"Then {n} * {frac.numerator} / {frac.denominator} = {result}.",
        ]
    steps.append(f"Check: {result} * 100 / {n} = {p}, so {result} is {p}% of {n}.")
    return f"percent_of:{p}:{n}", question, "\n".join(steps), str(result)


def _percent_increase(rng: random.Random) -> tuple[str, str, str, str]:
    """A quantity grown by p%: add the increase, or take (100 + p)% at once."""
    p, n = _percent_base(rng, 20, 5000)
    n1, _ = _two_names(rng)
    question = rng.choice((
        f"A town has {n} residents. Its population grows by {p}%. How many residents does it have now?",
        f"A bike costs ${n}. Next year the price rises by {p}%. What is the new price in dollars?",
        f"{n1} earns ${n} a month and gets a {p}% raise. What is the new monthly pay in dollars?",
        f"Increase {n} by {p}%.",
    ))
    inc = n * p // 100
    if rng.random() < 0.5:
        steps = [f"The increase is {n} * {p} / 100 = {inc}.", f"The new amount is {n} + {inc} = {n + inc}."]
    else:
        steps = [f"After the increase the amount is {100 + p}% of the original.",
                 f"So it is {n} * {100 + p} / 100 = {n + inc}."]
    return f"percent_increase:{p}:{n}", question, "\n".join(steps), str(n + inc)


def _percent_decrease(rng: random.Random) -> tuple[str, str, str, str]:
    """A price or amount cut by p%: subtract the discount, or take (100 - p)% at once."""
    p, n = _percent_base(rng, 20, 5000)
    n1, _ = _two_names(rng)
    item = rng.choice(_ITEMS)
    question = rng.choice((
        f"A jacket costs ${n}. It is on sale for {p}% off. What is the sale price in dollars?",
        f"The price of a laptop is ${n} and it is reduced by {p}%. What is the new price in dollars?",
        f"{n1} had {n} {item} and lost {p}% of them. How many {item} are left?",
        f"Decrease {n} by {p}%.",
    ))
    cut = n * p // 100
    if rng.random() < 0.5:
        steps = [f"The decrease is {n} * {p} / 100 = {cut}.", f"What remains is {n} - {cut} = {n - cut}."]
    else:
        steps = [f"After the decrease {100 - p}% of the original remains.",
                 f"So it is {n} * {100 - p} / 100 = {n - cut}."]
    return f"percent_decrease:{p}:{n}", question, "\n".join(steps), str(n - cut)


def _coprime_ratio(rng: random.Random) -> tuple[int, int]:
    """A ratio a:b in lowest terms with a != b."""
    while True:
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        if a != b and math.gcd(a, b) == 1:
            return a, b


def _ratio_share(rng: random.Random) -> tuple[str, str, str, str]:
    """Sharing a total in a ratio: count the parts, find one part, scale."""
    a, b = _coprime_ratio(rng)
    unit = rng.randint(2, 60)
    total = (a + b) * unit
    n1, n2 = _two_names(rng)
    item = rng.choice(_ITEMS)
    question = rng.choice((
        f"{n1} and {n2} share {total} {item} in the ratio {a}:{b}. How many does each get?",
        f"Split {total} {item} between {n1} and {n2} in the ratio {a}:{b}.",
        f"{total} {item} are divided between {n1} and {n2} so that their shares are in the "
        f"ratio {a}:{b}. Find both shares.",
    ))
    steps = [
        f"The ratio has {a} + {b} = {a + b} parts in total.",
        f"One part is {total} / {a + b} = {unit} {item}.",
        f"{n1} gets {a} * {unit} = {a * unit} and {n2} gets {b} * {unit} = {b * unit}.",
        f"Check: {a * unit} + {b * unit} = {total}.",
    ]
    return f"ratio_share:{a}:{b}:{total}", question, "\n".join(steps), f"{a * unit} and {b * unit}"


_RATIO_CONTEXTS = (
    ("a recipe", "cups of flour", "cups of sugar"),
    ("a class", "boys", "girls"),
    ("an animal shelter", "cats", "dogs"),
    ("a paint mix", "litres of blue paint", "litres of white paint"),
    ("a fruit bowl", "apples", "oranges"),
    ("a garden", "roses", "tulips"),
    ("a parking lot", "cars", "bikes"),
)


def _ratio_scale(rng: random.Random) -> tuple[str, str, str, str]:
    """Scaling a ratio from a known count to the unknown one."""
    a, b = _coprime_ratio(rng)
    unit = rng.randint(2, 40)
    known = a * unit
    place, first, second = rng.choice(_RATIO_CONTEXTS)
    question = rng.choice((
        f"In {place} the ratio of {first} to {second} is {a}:{b}. If there are {known} {first}, "
        f"how many {second} are there?",
        f"The ratio of {first} to {second} in {place} is {a}:{b}. With {known} {first}, how many "
        f"{second} are needed?",
        f"{place.capitalize()} has {first} and {second} in the ratio {a}:{b}. There are {known} "
        f"{first}. Find the number of {second}.",
    ))
    if rng.random() < 0.5:
        steps = [f"{a} parts are {known} {first}, so one part is {known} / {a} = {unit}.",
                 f"The {second} are {b} parts: {b} * {unit} = {b * unit}."]
    else:
        steps = [f"The scale factor is {known} / {a} = {unit}.",
                 f"Multiply the other side of the ratio by it: {b} * {unit} = {b * unit}."]
    return f"ratio_scale:{a}:{b}:{known}", question, "\n".join(steps), str(b * unit)


def _gcd(rng: random.Random) -> tuple[str, str, str, str]:
    """GCD by the Euclidean algorithm, every division step written out."""
    g = rng.randint(1, 40)
    m, n = rng.randint(2, 80), rng.randint(2, 80)
    a, b = g * m, g * n
    if a == b:
        b += g
    question = rng.choice((
        f"Find the greatest common divisor of {a} and {b}.",
        f"What is gcd({a}, {b})?",
        f"What is the largest number that divides both {a} and {b}?",
        f"Use the Euclidean algorithm to find the GCD of {a} and {b}.",
    ))
    lines, found = _euclid_lines(a, b)
    steps = ["Divide the larger number by the smaller and keep the remainder; repeat until it is 0."]
    steps += lines + [f"The last nonzero remainder is {found}, so the GCD is {found}."]
    return f"gcd:{a}:{b}", question, "\n".join(steps), str(found)


def _lcm(rng: random.Random) -> tuple[str, str, str, str]:
    """LCM as a * b / gcd, with the gcd found by the Euclidean algorithm."""
    a, b = rng.sample(range(4, 61), 2)
    question = rng.choice((
        f"What is the least common multiple of {a} and {b}?",
        f"Find lcm({a}, {b}).",
        f"Buses leave every {a} minutes and trains every {b} minutes. Both left the station "
        f"together just now. In how many minutes will they next leave together?",
        f"What is the smallest positive number that is a multiple of both {a} and {b}?",
    ))
    lines, g = _euclid_lines(a, b)
    steps = [f"First find the gcd of {a} and {b}:"] + lines + [
        f"So the gcd is {g}.",
        f"Then lcm = {a} * {b} / {g} = {a * b // g}.",
    ]
    return f"lcm:{min(a, b)}:{max(a, b)}", question, "\n".join(steps), str(a * b // g)


def _poly_text(coefs: list[int]) -> str:
    """'2x^3 - x^2 + 4x - 7' from coefficients, highest degree first."""
    degree = len(coefs) - 1
    terms = [(c, "x" if k == 1 else (f"x^{k}" if k else "")) for c, k in zip(coefs, range(degree, -1, -1))]
    return _linear(terms)


def _polynomial(rng: random.Random) -> tuple[str, str, str, str]:
    """Evaluating a polynomial term by term or with Horner's rule."""
    degree = rng.randint(2, 3)
    coefs = [rng.choice([v for v in range(-5, 6) if v])] + [rng.randint(-9, 9) for _ in range(degree)]
    x = rng.randint(-4, 4)
    f = rng.choice("fgpq")
    poly = _poly_text(coefs)
    value = sum(c * x ** (degree - i) for i, c in enumerate(coefs))
    question = rng.choice((
        f"Let {f}(x) = {poly}. Find {f}({x}).",
        f"Evaluate {poly} at x = {x}.",
        f"If {f}(x) = {poly}, what is {f}({x})?",
        f"What is the value of {poly} when x = {x}?",
    ))
    if rng.random() < 0.5:
        steps = _poly_terms(coefs, x, value)
    else:
        steps = [f"Use Horner's rule: start with the leading coefficient {coefs[0]}."]
        acc = coefs[0]
        for c in coefs[1:]:
            steps.append(f"Multiply by {x} and add {c}: {_p(acc)} * {_p(x)} + {_p(c)} = {acc * x + c}.")
            acc = acc * x + c
    steps.append(f"The value is {value}.")
    return f"poly:{coefs}:{x}", question, "\n".join(steps), str(value)


def _poly_terms(coefs: list[int], x: int, value: int) -> list[str]:
    """Term-by-term evaluation: each power, each term, then the sum."""
    degree = len(coefs) - 1
    steps, values = [f"Substitute x = {x} into each term."], []
    for i, c in enumerate(coefs):
        k = degree - i
        if c == 0:
            continue
        if k >= 2:
            steps.append(f"{_p(x)}^{k} = {' * '.join([_p(x)] * k)} = {x ** k}, "
                         f"and {c} * {_p(x ** k)} = {c * x ** k}.")
        elif k == 1:
            steps.append(f"The x term: {c} * {_p(x)} = {c * x}.")
        values.append(c * x**k)
    steps.append(f"Add the terms: {_signed_sum(values)} = {value}.")
    return steps


def _sequence_next(rng: random.Random) -> tuple[str, str, str, str]:
    """The next term of an arithmetic or geometric sequence, from its differences or ratios."""
    count = rng.randint(4, 6)
    if rng.random() < 0.6:
        start, d = rng.randint(-50, 100), rng.choice([v for v in range(-15, 26) if v])
        terms = [start + d * i for i in range(count + 1)]
        diffs = ", ".join(f"{t1} - {_p(t0)} = {d}" for t0, t1 in zip(terms[:3], terms[1:3]))
        steps = [f"The differences are {diffs}.",
                 f"Each term adds {d}, so the next term is {terms[-2]} + {_p(d)} = {terms[-1]}."]
    else:
        count = min(count, 5)
        start, r = rng.choice([v for v in range(-9, 10) if v]), rng.choice((2, 3, 4, 5, -2, -3))
        terms = [start * r**i for i in range(count + 1)]
        ratios = ", ".join(f"{t1} / {_p(t0)} = {r}" for t0, t1 in zip(terms[:3], terms[1:3]))
        steps = [f"The ratios are {ratios}.",
                 f"Each term is multiplied by {r}, so the next term is {terms[-2]} * {_p(r)} = {terms[-1]}."]
    shown = ", ".join(map(str, terms[:-1]))
    question = rng.choice((
        f"What is the next term in the sequence {shown}, ...?",
        f"Continue the pattern: {shown}. What comes next?",
        f"The sequence {shown} follows a simple rule. What is the next term?",
        f"Find the next number in the list {shown}.",
    ))
    return f"sequence_next:{shown}", question, "\n".join(steps), str(terms[-1])


def _sequence_nth(rng: random.Random) -> tuple[str, str, str, str]:
    """The nth term of an arithmetic sequence from first term and common difference."""
    start, d = rng.randint(-30, 60), rng.choice([v for v in range(-12, 16) if v])
    n = rng.randint(8, 60)
    shown = ", ".join(str(start + d * i) for i in range(4))
    nth = _ordinal(n)
    question = rng.choice((
        f"What is the {nth} term of the arithmetic sequence {shown}, ...?",
        f"Find the {nth} term of {shown}, ...",
        f"An arithmetic sequence begins {shown}. What is its {nth} term?",
    ))
    value = start + (n - 1) * d
    steps = [
        f"The first term is {start} and the common difference is {start + d} - {_p(start)} = {d}.",
        "The nth term is the first term plus (n - 1) times the difference.",
        f"So the {nth} term is {start} + ({n} - 1) * {_p(d)} = {start} + {n - 1} * {_p(d)} = {value}.",
    ]
    return f"sequence_nth:{shown}:{n}", question, "\n".join(steps), str(value)


_PRECEDENCE = {"+": 1, "-": 1, "*": 2}
_OP_VERBS = {"+": "Add", "-": "Subtract", "*": "Multiply"}


def _random_tree(rng: random.Random, ops: int) -> int | tuple:
    """A random expression tree with `ops` operators over small positive integers."""
    if ops == 0:
        return rng.randint(1, 12)
    left = rng.randint(0, ops - 1)
    op = rng.choice("+-**")
    return (op, _random_tree(rng, left), _random_tree(rng, ops - 1 - left))


def _render(node: int | tuple, parent: str | None = None, right: bool = False) -> str:
    """The expression with only the parentheses its meaning needs."""
    if isinstance(node, int):
        return _p(node)
    op, a, b = node
    text = f"{_render(a, op)} {op} {_render(b, op, True)}"
    return f"({text})" if _needs_parens(op, parent, right) else text


def _needs_parens(op: str, parent: str | None, right: bool) -> bool:
    """Whether a sub-expression under `parent` must be bracketed to keep its meaning."""
    if parent is None:
        return False
    if _PRECEDENCE[op] != _PRECEDENCE[parent]:
        return _PRECEDENCE[op] < _PRECEDENCE[parent]
    return right  # so the written order of evaluation is always the tree's


def _reducible(node: int | tuple, parent: str | None = None, right: bool = False,
               inside: bool = False, found: list | None = None) -> list:
    """Operations whose operands are both numbers, left to right, and whether each sits
    inside brackets."""
    found = [] if found is None else found
    if isinstance(node, tuple):
        op, a, b = node
        inside = inside or _needs_parens(op, parent, right)
        _reducible(a, op, False, inside, found)
        if isinstance(a, int) and isinstance(b, int):
            found.append((node, inside))
        _reducible(b, op, True, inside, found)
    return found


def _replace(node: int | tuple, target: tuple, value: int) -> int | tuple:
    """The tree with the `target` sub-tree (by identity) replaced by its value."""
    if node is target:
        return value
    if isinstance(node, int):
        return node
    op, a, b = node
    return (op, _replace(a, target, value), _replace(b, target, value))


def _apply(op: str, a: int, b: int) -> int:
    """One arithmetic operation."""
    return a + b if op == "+" else a - b if op == "-" else a * b


def _evaluation_order(candidate: tuple[tuple, bool]) -> tuple[bool, int]:
    """Sort key: operations in brackets first, then * before + and -; ties stay left to right."""
    (op, _, _), bracketed = candidate
    return (not bracketed, -_PRECEDENCE[op])


def _order_of_operations(rng: random.Random) -> tuple[str, str, str, str]:
    """An expression reduced one operation at a time: brackets, then *, then + and -."""
    tree = _random_tree(rng, rng.randint(2, 4))
    expression = _render(tree)
    question = rng.choice((
        f"Evaluate {expression}.",
        f"What is the value of {expression}?",
        f"Compute {expression} using the order of operations.",
        f"Simplify {expression}.",
    ))
    steps = []
    while isinstance(tree, tuple):
        candidates = _reducible(tree)
        node, bracketed = min(candidates, key=_evaluation_order)
        op, a, b = node
        value = _apply(op, a, b)
        tree = _replace(tree, node, value)
        label = "Brackets first" if bracketed else _OP_VERBS[op]
        if isinstance(tree, int):
            steps.append(f"{label}: {_p(a)} {op} {_p(b)} = {value}.")
        else:
            steps.append(f"{label}: {_p(a)} {op} {_p(b)} = {value}, so the expression becomes {_render(tree)}.")
    return f"ops:{expression}", question, "\n".join(steps), str(tree)


_GENERATORS: dict[str, Callable[[random.Random], tuple[str, str, str, str]]] = {
    "addition": _addition,
    "subtraction": _subtraction,
    "multiplication": _multiplication,
    "division": _division,
    "fraction_add": _fraction_add,
    "simplify_fraction": _simplify_fraction,
    "linear_equation": _linear_equation,
    "linear_system": _linear_system,
    "percent_of": _percent_of,
    "percent_increase": _percent_increase,
    "percent_decrease": _percent_decrease,
    "ratio_share": _ratio_share,
    "ratio_scale": _ratio_scale,
    "gcd": _gcd,
    "lcm": _lcm,
    "polynomial": _polynomial,
    "sequence_next": _sequence_next,
    "sequence_nth": _sequence_nth,
    "order_of_operations": _order_of_operations,
}

FAMILIES = tuple(_GENERATORS)


def draw(rng: random.Random) -> tuple[str, str, str, str, str]:
    """(family, key, question, solution, answer) of a problem of a random family."""
    family = rng.choice(FAMILIES)
    return (family, *_GENERATORS[family](rng))


def render(rng: random.Random, question: str, solution: str, answer: str) -> str:
    """A problem's text: a header, the question, a solution header, the worked solution and an 'Answer:' line."""
    return (f"{rng.choice(_HEADERS)}{question}\n\n{rng.choice(_SOLUTION_HEADERS)}\n"
            f"{solution}\nAnswer: {answer}")
