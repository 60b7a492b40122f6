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
    proposer = NgramProposer()
    assert proposer.propose([1, 2, 1, 2], 10).tokens == [1, 2]
    assert proposer.propose([1, 2, 1, 2], 0).tokens == []
