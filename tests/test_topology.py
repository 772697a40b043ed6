import pytest

from copd_ray.topology import Topology


def test_pairwise_is_every_ordered_pair():
    t = Topology.pairwise(["a", "b", "c"])
    assert sorted(t.edges) == sorted([("a", "b"), ("a", "c"), ("b", "a"), ("b", "c"), ("c", "a"), ("c", "b")])
    assert sorted(t.teachers_of("a")) == ["b", "c"]


def test_hub_and_spoke_spokes_do_not_talk():
    t = Topology.hub_and_spoke("text", ["image", "video"])
    assert t.branches == ("text", "image", "video")
    assert sorted(t.teachers_of("text")) == ["image", "video"]
    assert t.teachers_of("image") == ["text"] and t.teachers_of("video") == ["text"]
    assert sorted(t.students_of("text")) == ["image", "video"]


def test_explicit_edges_and_errors():
    t = Topology.from_edges(["a", "b", "c"], [("a", "b"), ("a", "c")])
    assert t.teachers_of("b") == ["a"] and t.teachers_of("a") == []
    with pytest.raises(ValueError, match="'z' is not a branch"):
        Topology.from_edges(["a", "b"], [("z", "a")])
    with pytest.raises(ValueError, match="cannot teach itself"):
        Topology.from_edges(["a"], [("a", "a")])
    with pytest.raises(ValueError, match="also listed as a spoke"):
        Topology.hub_and_spoke("a", ["a", "b"])
    with pytest.raises(KeyError, match="'q' is not a branch"):
        t.teachers_of("q")


def test_from_config_matches_constructors():
    assert Topology.from_config("pairwise", ["a", "b"]) == Topology.pairwise(["a", "b"])
    assert Topology.from_config("hub_and_spoke", ["x", "h", "y"], hub="h").teachers_of("h") == ["x", "y"]
    assert Topology.from_config("none", ["a", "b"]).edges == () and Topology.from_config("none", ["a"]).teachers_of("a") == []
    with pytest.raises(ValueError, match="hub 'q' is not a branch"):
        Topology.from_config("hub_and_spoke", ["a", "b"], hub="q")


def test_only_branches_asked_for_log_probs_get_a_scorer():
    from copd_ray.config import load_config
    from copd_ray.topology.graph import measured_pairs, scoring_branches

    def scoring(*overrides):
        cfg = load_config(None, ["wandb.mode=disabled", *overrides])
        return scoring_branches(cfg, cfg.topology_graph().edges)

    quiet = "metrics.pair_every=0"
    assert scoring(quiet) == {"add", "mul"}  # pairwise: both teach
    assert scoring(quiet, "topology.kind=edges", "topology.edges=[[mul, add]]") == {"mul"}  # add only learns
    assert scoring(quiet, "topology.kind=none") == set()
    # Pair metrics read both sides' scorers: every measured pair's teacher and student.
    assert scoring("metrics.pair_every=5", "topology.kind=edges", "topology.edges=[[mul, add]]") == {"add", "mul"}
    assert scoring("metrics.pair_every=5", "topology.kind=none") == set()  # metrics.pairs=edges: no pair
    assert scoring("metrics.pair_every=5", "metrics.pairs=all", "topology.kind=none") == {"add", "mul"}
    assert scoring(quiet, "serve.enabled=true", "topology.kind=none") == {"add", "mul"}  # Serve answers for all
    cfg = load_config(None, ["wandb.mode=disabled", "metrics.pairs=all",
                             "branches=[{name: add}, {name: mul, init: /tmp, frozen: true}]",
                             "topology.kind=edges", "topology.edges=[[mul, add]]"])
    assert measured_pairs(cfg, [("mul", "add")]) == [("mul", "add")]  # a frozen branch is never a student
