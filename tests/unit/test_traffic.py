"""The traffic rules: who takes the project endpoint's requests, canary splits, `--to` values."""

from __future__ import annotations

import pytest

from mlserve.errors import UsageError
from mlserve.traffic import Traffic, apportion, most_traffic, parse_shares, percents, weights, with_canary


def test_equal_turns_weigh_versions_by_their_ready_jobs():
    assert weights(Traffic(), {1: 2, 2: 1, 3: 0}) == {1: 2, 2: 1}


def test_shares_go_only_to_versions_with_a_ready_job():
    traffic = Traffic({1: 90, 2: 10})
    assert weights(traffic, {1: 1, 2: 3}) == {1: 90, 2: 10}
    assert weights(traffic, {1: 0, 2: 3}) == {2: 10}  # version 1's share goes to the others
    assert weights(traffic, {2: 0, 3: 5}) == {3: 5}  # no version with a share can answer: the others do
    assert weights(traffic, {1: 0, 3: 0}) == {}  # no primary at all: the fallback's turn
    assert percents(weights(traffic, {1: 0, 2: 3})) == {2: 100.0}


def test_parse_shares():
    assert parse_shares(["3=90", " 4=10"], [3, 4, 5]) == {3: 90, 4: 10}
    assert parse_shares(["5=100", "3=0"], [3, 5]) == {5: 100, 3: 0}


@pytest.mark.parametrize("values, message", [
    (["3"], "VERSION=PERCENT"),
    (["3=ninety"], "VERSION=PERCENT"),
    (["-3=100"], "VERSION=PERCENT"),
    (["9=100"], "no version 9"),
    (["3=50", "3=50"], "twice"),
    (["3=101"], "0 to 100"),
    (["3=60", "4=30"], "add up to 90%"),
    ([], "add up to 0%"),
])
def test_parse_shares_refuses(values, message):
    with pytest.raises(UsageError, match=message):
        parse_shares(values, [3, 4])


def test_split_keeps_whole_percents_that_sum_up():
    assert apportion(90, {1: 1, 2: 1, 3: 1}) == {1: 30, 2: 30, 3: 30}
    shares = apportion(90, {1: 1, 2: 2})
    assert shares == {1: 30, 2: 60} and sum(shares.values()) == 90
    assert sum(apportion(100, {1: 1, 2: 1, 3: 1}).values()) == 100
    assert apportion(50, {}) == {}


def test_a_canary_keeps_the_others_proportions():
    # Equal turns per job: version 1 has 3 jobs, version 2 one.
    assert with_canary(Traffic(), {1: 3, 2: 1}, 3, 20).shares == {1: 60, 2: 20, 3: 20}
    assert with_canary(Traffic({1: 50, 2: 50}, sticky=True), {1: 1, 2: 1}, 3, 10) == Traffic({1: 45, 2: 45, 3: 10}, True)
    # A share of a version without a job is dropped: the canary must not take its part too.
    assert with_canary(Traffic({1: 50, 2: 50}), {1: 1}, 3, 10).shares == {1: 90, 3: 10}
    assert with_canary(Traffic({3: 100}), {5: 1}, 6, 10).shares == {5: 90, 6: 10}
    assert with_canary(Traffic({1: 100}), {1: 1}, 2, 100).shares == {2: 100}
    assert with_canary(Traffic({1: 100}), {1: 1}, 2, 0).shares == {1: 100, 2: 0}


def test_scale_copies_the_version_with_the_most_traffic():
    assert most_traffic(Traffic(), {1: 2, 2: 1}) == 1
    assert most_traffic(Traffic(), {1: 1, 2: 1}) == 2  # a tie: the newest
    assert most_traffic(Traffic({1: 10, 2: 90}), {1: 3, 2: 1}) == 2
    assert most_traffic(Traffic({3: 100}), {1: 3, 2: 1}) == 1  # the share's version has no job: by jobs
    assert most_traffic(Traffic(), {}) is None
