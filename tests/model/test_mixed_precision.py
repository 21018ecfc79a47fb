"""The per-block float fallback of the INT8 search: scopes read from node names, greedy choice by sensitivity."""

from __future__ import annotations

import onnx
import pytest
from onnx import helper

from model.mixed_precision import greedy_keep_float, module_scopes, nodes_in, scope_of


def test_scope_is_the_path_up_to_the_first_numbered_child() -> None:
    assert scope_of("/image_encoder/_blocks.3/_depthwise_conv/Conv") == "/image_encoder/_blocks.3"
    assert scope_of("/image_encoder/_conv_stem/Conv") == "/image_encoder/_conv_stem"
    assert scope_of("/encoder/layer.0/attention/self/query/MatMul") == "/encoder/layer.0"
    assert scope_of("/region_pool/key/MatMul") == "/region_pool/key"
    assert scope_of("/Concat") == ""  # no module path: never a scope
    assert scope_of("Conv_12") == ""


def _graph(names_ops: list[tuple[str, str]]) -> onnx.GraphProto:
    nodes = [helper.make_node(op, [f"x{i}"], [f"x{i + 1}"], name=name) for i, (name, op) in enumerate(names_ops)]
    return helper.make_graph(nodes, "g", [], [])


def test_only_scopes_with_a_compute_op_are_offered_and_keep_their_activations() -> None:
    graph = _graph([("/enc/_conv_stem/Conv", "Conv"), ("/enc/_swish/Clip", "Clip"),
                    ("/enc/_blocks.0/_depthwise_conv/Conv", "Conv"), ("/enc/_blocks.0/Clip", "Clip"),
                    ("/enc/_blocks.0/Add", "Add"), ("/head/Reshape", "Reshape")])
    scopes = module_scopes(graph)
    assert scopes == {"/enc/_conv_stem": ["/enc/_conv_stem/Conv"],
                      "/enc/_blocks.0": ["/enc/_blocks.0/_depthwise_conv/Conv", "/enc/_blocks.0/Clip",
                                         "/enc/_blocks.0/Add"]}
    assert nodes_in(scopes, ["/enc/_blocks.0"])[-1] == "/enc/_blocks.0/Add"


def test_an_unknown_scope_is_refused_not_silently_quantized() -> None:
    with pytest.raises(ValueError, match=r"no module scope '/enc/_blocks\.9'"):
        nodes_in({"/enc/_blocks.0": ["a"]}, ["/enc/_blocks.9"])


def _measure(gains: dict[str, float], base: float, overlap: float = 0.0, errors: dict[str, float] | None = None):
    """A fake fidelity: additive margin gains, minus ``overlap`` per extra scope (gains do not add up), and
    an error score lowered by ``errors``."""
    calls: list[tuple[str, ...]] = []

    def measure(keep: tuple[str, ...]) -> tuple[float, float]:
        calls.append(keep)
        margin = base + sum(gains[s] for s in keep) - overlap * max(0, len(keep) - 1)
        return margin, -sum((errors or {}).get(s, 0.0) for s in keep)

    return measure, calls


def test_greedy_adds_the_most_sensitive_scopes_first_and_stops_at_the_gate() -> None:
    gains = {"a": 0.001, "b": 0.05, "c": 0.02, "d": 0.0, "e": 0.015}
    measure, calls = _measure(gains, base=-0.08, overlap=0.002)
    keep, log = greedy_keep_float(list(gains), measure)
    assert keep == ("b", "c", "e")  # 0.05 + 0.02 + 0.015 - 0.004 = 0.081 >= 0.08; "a" never needed
    assert log.gains["b"] == pytest.approx(0.05) and log.base_margin == pytest.approx(-0.08)
    assert [s["keep_float"] for s in log.steps] == [[], ["b"], ["b", "c"], ["b", "c", "e"]]
    assert log.steps[-1]["margin"] >= 0 > log.steps[-2]["margin"]
    assert len(calls) == 1 + len(gains) + 3  # base, one run per scope, one per greedy step


def test_when_the_full_check_fails_the_rest_is_reranked_by_answer_divergence_not_margin() -> None:
    """The default bundle's case: the embedding's margin passed, the answers did not, and the block that
    fixed the answers lowered the margin (round 1 would never pick it)."""
    measure, _ = _measure({"a": 0.05, "b": 0.02, "c": -0.001, "d": 0.001}, base=-0.04,
                          errors={"c": 0.5, "d": 0.1})
    checked: list[tuple[str, ...]] = []

    def passes(keep: tuple[str, ...]) -> tuple[bool, str]:
        checked.append(keep)
        return "c" in keep, "agreement " + ("ok" if "c" in keep else "low")

    passes_shown: list[tuple[list[str], str]] = []

    def track(items: list[str], desc: str) -> list[str]:
        passes_shown.append((list(items), desc))
        return items

    keep, log = greedy_keep_float(["a", "b", "c", "d"], measure, passes=passes, track=track)
    assert keep == ("a", "c")
    assert passes_shown == [(["a", "b", "c", "d"], "ranking blocks by gate margin"),
                            (["b", "c", "d"], "ranking blocks by answer divergence")]  # one progress bar per pass
    assert checked == [("a",), ("a", "c")]  # the full check only once the margin passed
    assert log.divergence_gains["c"] == pytest.approx(0.5) and "c" not in [s for s, g in log.gains.items() if g > 0]
    assert log.steps[-1]["check"] == "agreement ok"


def test_greedy_gives_up_beyond_its_float_budget_and_ignores_useless_scopes() -> None:
    measure, _ = _measure({"a": 0.01, "b": 0.02, "c": 0.0}, base=-0.5)
    keep, log = greedy_keep_float(["a", "b", "c"], measure, max_float=8)
    # "c" buys nothing: never tried
    assert keep is None and [s["keep_float"] for s in log.steps] == [[], ["b"], ["b", "a"]]
    keep, log = greedy_keep_float(["a", "b"], _measure({"a": 0.3, "b": 0.3}, base=-0.5)[0], max_float=1)
    assert keep is None and "up to 1" in log.outcome


def test_a_base_that_already_passes_needs_no_search() -> None:
    measure, calls = _measure({"a": 0.1}, base=0.0)
    keep, _ = greedy_keep_float(["a"], measure, passes=lambda k: (True, "ok"))
    assert keep == () and calls == [()]
