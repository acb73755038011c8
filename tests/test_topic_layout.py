"""Which existing topic layouts a worker refuses at start (streams.topics.layout_problems)."""

from streams.topics import Topics, layout_problems, partition_layout

NAMES = Topics("acme.")
APP = "rg"


def _actual(shared: int, single: int = 1, only=None) -> dict[str, int]:
    s, one = partition_layout(NAMES, APP)
    out = {t: shared for t in s} | {t: single for t in one}
    return {t: n for t, n in out.items() if only is None or t in only}


def test_the_layout_names_every_topic_whose_count_riskgate_relies_on():
    shared, single = partition_layout(NAMES, APP)
    assert set(shared) == {"acme.impressions", "acme.watch", "acme.flags", "acme.constraints", "acme.forget",
                           "acme.safe-pools", "rg-users-changelog", "rg-partition-meta-changelog"}
    assert set(single) == {"acme.riskgate-partials", "rg-threshold-versions-changelog"}


def test_topics_that_fit_or_do_not_exist_yet_pass():
    assert layout_problems({}, NAMES, APP, 8) == []
    assert layout_problems(_actual(8), NAMES, APP, 8) == []
    assert layout_problems(_actual(8, only={"acme.watch", "acme.safe-pools"}), NAMES, APP, 8) == []
    assert layout_problems({"acme.risk-thresholds": 3, "other": 5}, NAMES, APP, 8) == []  # not relied on


def test_a_setting_that_differs_from_every_existing_topic_is_named_with_the_count_that_would_fit():
    [problem] = layout_problems(_actual(4), NAMES, APP, 8)
    assert problem.startswith("RISKGATE_TOPIC_PARTITIONS is 8, but acme.impressions has 4, acme.watch has 4")
    assert "rg-users-changelog has 4" in problem and problem.endswith("set RISKGATE_TOPIC_PARTITIONS=4 to use them "
                                                                      "as they are")


def test_topics_that_disagree_among_themselves_must_be_recreated():
    actual = _actual(8) | {"acme.safe-pools": 4}
    [problem] = layout_problems(actual, NAMES, APP, 8)
    assert "acme.safe-pools has 4 partitions" in problem and "acme.watch" not in problem
    assert problem.endswith("recreate the topics that differ")
    [problem] = layout_problems(actual, NAMES, APP, 4)  # either way: some topic differs
    assert "acme.watch has 8" in problem and problem.endswith("recreate the topics that differ")


def test_the_partials_topic_must_have_exactly_one_partition():
    problems = layout_problems(_actual(8, single=2), NAMES, APP, 8)
    assert problems == ["acme.riskgate-partials has 2 partitions; it must have exactly 1",
                        "rg-threshold-versions-changelog has 2 partitions; it must have exactly 1"]
