"""Per-block mixed precision for static INT8: which module blocks to leave in float, chosen by sensitivity.

Why: for a CNN such as EfficientNet-Lite0 the INT8 error is not spread evenly. On the default bundle's
image encoder (AVX2 CPU, 7-bit weights so the integer kernels cannot saturate; 2026-11-29) the
attention-pooled embedding sat at cosine 0.898 to fp32 with every block quantized, and leaving a single
block in float moved it by +0.054 (the first MBConv block), +0.022, +0.015, +0.014 (three more) and
< 0.005 (the other 15). The first three together reached 0.980 and four 0.987, while the graph stayed
about 1.3-1.4x faster than fp32. Quantizing everything or nothing misses that; ranking the blocks by
what leaving each one in float buys and adding them greedily finds it in a few dozen quantize runs.

The search works on *module scopes* read from the exporter's node names
(``/image_encoder/_blocks.3/_depthwise_conv/Conv`` -> ``/image_encoder/_blocks.3``), so a block's convs,
activations and residual add stay together: leaving only a convolution in float while its fused
activation is quantized puts a Q/DQ pair on the un-clipped convolution output, which was measured much
worse than either (embedding 0.68 vs 0.97).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import onnx

COMPUTE_OPS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm"})
"""Ops whose quantization is where the time is saved (and the error made); a scope without one of
them is never a candidate to leave in float."""

_NUMBERED = re.compile(r"\.\d+$")


def scope_of(node_name: str) -> str:
    """The module scope a node belongs to: its path up to the first numbered child (``_blocks.3``,
    ``layers.0``), else its first two path components; "" for names that carry no path."""
    parts = [p for p in node_name.split("/") if p][:-1]  # the last part names the op itself
    for i, part in enumerate(parts):
        if _NUMBERED.search(part):
            return "/" + "/".join(parts[: i + 1])
    return "/" + "/".join(parts[:2]) if parts else ""


def module_scopes(graph: onnx.GraphProto) -> dict[str, list[str]]:
    """Scope -> node names, in graph order, for the scopes that hold at least one compute op."""
    scopes: dict[str, list[str]] = {}
    compute: set[str] = set()
    for node in graph.node:
        scope = scope_of(node.name)
        if not scope:
            continue
        scopes.setdefault(scope, []).append(node.name)
        if node.op_type in COMPUTE_OPS:
            compute.add(scope)
    return {s: names for s, names in scopes.items() if s in compute}


def nodes_in(scopes: Mapping[str, list[str]], keep_float: Iterable[str]) -> list[str]:
    """The node names to exclude from quantization for these scopes; unknown scopes fail loudly, since a
    silently ignored name would quietly quantize what the plan meant to keep in float."""
    names: list[str] = []
    for scope in keep_float:
        if scope not in scopes:
            raise ValueError(f"no module scope {scope!r} with a Conv/MatMul/Gemm in this graph "
                             f"(scopes: {', '.join(sorted(scopes)[:8])}{', ...' if len(scopes) > 8 else ''})")
        names.extend(scopes[scope])
    return names


@dataclass
class SearchLog:
    """What the search measured, written into ``quantization.json`` so a reader can see why."""

    base_margin: float
    gains: dict[str, float] = field(default_factory=dict)
    """Round 1: scope -> how much leaving it in float (on top of the start) raised the gate margin."""
    divergence_gains: dict[str, float] = field(default_factory=dict)
    """Round 2, when it ran: scope -> how much it lowered the answer divergence on top of round 1's choice."""
    steps: list[dict] = field(default_factory=list)
    """Each greedy step: the scopes kept in float, the margin it reached and, once the margin passed,
    the verdict of the full check (``passes``)."""
    outcome: str = ""


Fidelity = tuple[float, float]
"""(gate margin, answer divergence) of one quantize run: the margin is how far the worst judged output's
mean cosine is above its gate (>= 0 passes); the divergence is how far the classifier's answers move from
fp32's (mean KL divergence of its probabilities), which sees what the answers hinge on and no cosine does."""


def greedy_keep_float(
    scopes: Iterable[str],
    measure: Callable[[tuple[str, ...]], Fidelity],
    *,
    passes: Callable[[tuple[str, ...]], tuple[bool, str]] | None = None,
    start: tuple[str, ...] = (),
    max_float: int = 8,
    track: Callable[[list[str], str], Iterable[str]] = lambda items, desc: items,
) -> tuple[tuple[str, ...] | None, SearchLog]:
    """The fewest scopes to keep in float for the candidate to pass, chosen greedily in two rounds.

    ``measure(keep_float)`` quantizes with those scopes in float and judges a few inputs: cheap, so it
    ranks. Round 1 measures each scope alone on top of ``start`` and adds them in order of what they raise
    the gate margin, re-measuring the combination each time (the gains do not add up: three blocks worth
    +0.09 alone reached +0.08 together), until the margin passes. Then ``passes(keep_float)`` makes the
    expensive check (every validation input, and the answers end to end). If that fails, round 2 ranks the
    remaining scopes again on top of what is kept, this time by how much they lower the answer divergence,
    and adds them until it holds. Measured on the default bundle: the margin (the retrieval embedding)
    passed with 4 blocks in float while the classifier, which reads the region features, still changed
    1.6 % of its answers; the block that fixed most of that (answers 0.984 -> 0.991) *lowered* the
    embedding's cosine, so no ranking by the margin would ever have picked it, and a ranking by the sum of
    the outputs' log(1 - cosine) missed it too once bias correction had raised every cosine to 0.995.
    Returns None when ``max_float`` scopes do not pass. ``track(items, description)`` wraps each
    ranking pass (a progress bar: one pass is a quantize run per scope, minutes on a large CNN).
    """

    def full(keep: tuple[str, ...], fid: Fidelity) -> bool:
        step: dict = {"keep_float": list(keep), "margin": fid[0], "divergence": fid[1]}
        log.steps.append(step)
        if fid[0] < 0:
            return False
        ok, step["check"] = passes(keep) if passes is not None else (True, "")
        return ok

    def rank(keep: tuple[str, ...], base: Fidelity, by: int) -> list[str]:
        """Remaining scopes with a positive gain on top of ``keep``, best first (by 0: margin, 1: divergence)."""
        gains = {}
        todo = [s for s in scopes_list if s not in keep]
        for scope in track(todo, "ranking blocks by " + ("gate margin" if by == 0 else "answer divergence")):
            fid = measure((*keep, scope))
            gains[scope] = fid[0] - base[0] if by == 0 else base[1] - fid[1]
        (log.gains if by == 0 else log.divergence_gains).update(gains)
        return sorted((s for s, g in gains.items() if g > 0), key=lambda s: -gains[s])

    scopes_list = list(scopes)
    log = SearchLog(base_margin=float("nan"))
    base = measure(start)
    log.base_margin = base[0]
    if full(start, base):
        log.outcome = "passes without more float scopes"
        return start, log
    keep, fid = start, base
    for by in (0, 1):
        if by == 0 and fid[0] >= 0:
            continue  # the start already passes the gates and fails only the full check: straight to round 2
        if by == 1 and fid[0] < 0:
            break  # round 1 ran out of scopes that raise the margin
        for scope in rank(keep, fid, by):
            if len(keep) >= max_float:
                log.outcome = f"no pass with up to {max_float} scope(s) in float"
                return None, log
            keep = (*keep, scope)
            fid = measure(keep)
            if full(keep, fid):
                log.outcome = f"passes with {len(keep)} scope(s) in float"
                return keep, log
            if by == 0 and fid[0] >= 0:
                break  # the margin passed but the full check did not: re-rank on top of this (round 2)
    log.outcome = f"no pass with up to {max_float} scope(s) in float" if len(keep) >= max_float else \
        "no scope left in float improves it further"
    return None, log
