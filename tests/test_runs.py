"""Consecutive runs under a byte limit."""

from hfp8._runs import runs_within


def test_runs_fill_up_to_the_limit_in_order():
    assert list(runs_within([3, 4, 2, 5, 1], lambda n: n, 7)) == [[3, 4], [2, 5], [1]]


def test_an_item_over_the_limit_gets_a_run_of_its_own():
    assert list(runs_within([2, 9, 1, 1], lambda n: n, 5)) == [[2], [9], [1, 1]]


def test_a_limit_below_every_item_gives_one_run_each_and_nothing_gives_no_run():
    assert list(runs_within("abc", lambda _: 10, 1)) == [["a"], ["b"], ["c"]]
    assert list(runs_within([], lambda n: n, 5)) == []
