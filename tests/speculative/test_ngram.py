"""Prompt lookup proposals."""

from __future__ import annotations

from edgekit.speculative.ngram import NgramProposer


def test_proposes_what_followed_the_latest_match_longest_ngram_first():
    proposer = NgramProposer(max_ngram=3)
    #          0  1  2  3  4  5  6  7  8  9
    context = [7, 1, 2, 3, 9, 8, 1, 2, 3, 4, 5, 1, 2, 3]
    assert proposer.propose(context, 3).tokens == [4, 5, 1]  # latest "1 2 3" is followed by 4 5 1


def test_falls_back_to_shorter_ngrams_and_to_nothing():
    proposer = NgramProposer(max_ngram=3)
    assert proposer.propose([5, 6, 9, 6], 2).tokens == [9, 6]  # only "6" matches
    assert proposer.propose([1, 2, 3], 4).tokens == []
    assert proposer.propose([4], 4).tokens == []


def test_proposes_at_most_k_and_what_exists():
    proposer = NgramProposer(overlap=False)
    assert proposer.propose([1, 2, 1, 2], 10).tokens == [1, 2]
    assert proposer.propose([1, 2, 1, 2], 0).tokens == []


def test_a_match_at_the_end_continues_as_a_copy_of_itself():
    """The latest "1 2" ends two tokens before the text does: the period-2 text goes on repeating."""
    proposer = NgramProposer()
    assert proposer.propose([1, 2, 1, 2], 7).tokens == [1, 2, 1, 2, 1, 2, 1]
    assert proposer.propose([9, 5, 5, 5], 4).tokens == [5, 5, 5, 5]  # "5 5" ends one before: period 1
    #                        0  1  2  3  4  5  6: "3 4" at 2..3 is followed by 5 6 3 4, then as it began
    assert proposer.propose([1, 2, 3, 4, 5, 6, 3, 4], 6).tokens == [5, 6, 3, 4, 5, 6]
    assert proposer.propose([7, 1, 2, 3, 9, 8, 1, 2, 3, 4], 3).tokens == []  # no earlier "3 4", "4": nothing
