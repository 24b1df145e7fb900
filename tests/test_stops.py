"""StopMatcher on every way of splitting a text into deltas, against a one-character-at-a-time reference."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from onebit.stops import StopMatcher


def reference(text: str, stops: list[str]) -> tuple[str, bool]:
    """The text a client should see: cut before the first stop string to complete (ties: earliest start)."""
    for end in range(1, len(text) + 1):
        starts = [end - len(s) for s in stops if text[:end].endswith(s)]
        if starts:
            return text[:min(starts)], True
    return text, False


def stream(stops: list[str], deltas: list[str]) -> tuple[str, bool]:
    """Push every delta, checking each emission keeps the output a prefix of the final answer."""
    m = StopMatcher(stops)
    out, stopped = "", False
    want, _ = reference("".join(deltas), stops)
    for d in deltas:
        text, stopped = m.push(d)
        out += text
        assert want.startswith(out), (deltas, out)  # nothing of a stop string ever leaks
        if stopped:
            break
    out += m.flush()
    return out, stopped


def all_splits(text: str):
    """Every way to cut ``text`` into non-empty deltas (2^(n-1) of them)."""
    for cuts in itertools.product([False, True], repeat=len(text) - 1):
        parts, start = [], 0
        for i, cut in enumerate(cuts, 1):
            if cut:
                parts.append(text[start:i])
                start = i
        yield parts + [text[start:]]


CASES = [
    ("abXYZcd", ["XYZ"]),
    ("XYZabc", ["XYZ"]),                # stop at the very start
    ("abcXY", ["XYZ"]),                 # ends on a partial stop: flushed, no stop
    ("abcd", ["abcd", "bc"]),           # "bc" completes first although "abcd" starts first
    ("xabcd", ["bcd", "abc"]),          # overlapping: "abc" completes first
    ("aaab", ["aab", "ab"]),            # same end: the longer (earlier start) wins
    ("ababa", ["aba", "bab"]),
    ("abab", ["abab", "ba"]),
    ("xxabxab", ["xab"]),               # earliest occurrence of a repeated stop
    ("hello", ["lo", "hello", "z"]),
    ("héllo→end", ["→e", "end"]),        # unicode
    ("日本語です", ["本語", "す"]),
    ("a😀b😀", ["😀b"]),
    ("plain text", ["STOP", "xyz"]),    # no stop at all
]


@pytest.mark.parametrize("text, stops", CASES)
def test_every_split_matches_reference(text, stops):
    want = reference(text, stops)
    for deltas in all_splits(text):
        assert stream(stops, deltas) == want, deltas


def test_random_texts_and_stops():
    rng = np.random.default_rng()
    for _ in range(300):
        alphabet = "ab" if rng.random() < 0.5 else "abcé"
        text = "".join(rng.choice(list(alphabet), size=int(rng.integers(0, 16))))
        stops = ["".join(rng.choice(list(alphabet), size=int(rng.integers(1, 5))))
                 for _ in range(int(rng.integers(1, 4)))]
        cuts = sorted(set(rng.integers(0, len(text) + 1, size=int(rng.integers(0, 6))).tolist()))
        deltas = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        assert stream(stops, deltas) == reference(text, stops), (text, stops, deltas)


def test_no_stop_round_trips_and_holds_back_only_prefixes():
    m = StopMatcher(["</s>", "STOP"])
    assert m.push("hello <") == ("hello ", False)
    assert m.push("/") == ("", False)
    assert m.push("x") == ("</x", False)        # the prefix broke: released
    assert m.push(" ST") == (" ", False)
    assert m.flush() == "ST"
    assert m.flush() == ""


def test_after_stop_nothing_more():
    m = StopMatcher(["END"])
    assert m.push("aEN") == ("a", False)
    assert m.push("Dzz") == ("", True)
    assert m.push("more") == ("", True)
    assert m.flush() == ""
    assert m.stopped


def test_empty_delta_and_no_stop_strings():
    m = StopMatcher([])
    assert m.push("") == ("", False)
    assert m.push("abc") == ("abc", False)
    assert m.flush() == ""


@pytest.mark.parametrize("stops", [[""], ["ok", ""]])
def test_empty_stop_string_rejected(stops):
    with pytest.raises(ValueError, match="non-empty"):
        StopMatcher(stops)


def test_single_string_is_one_stop():
    m = StopMatcher("ab")
    assert m.push("xaby") == ("x", True)
