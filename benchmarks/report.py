"""Turn a benchmark result dict into the printed/Markdown tables, the acceptance checks and the PNG plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

SERVER_ORDER = ("mmfusion", "inprocess", "naive_torch", "litserve")
SERVER_TITLES = {
    "mmfusion": "mmfusion (HTTP)",
    "inprocess": "in-process ceiling (no HTTP)",
    "naive_torch": "naive FastAPI + PyTorch eager",
    "litserve": "LitServe + same ONNX bundle",
}


def _fmt(v: Any, suffix: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.3g}{suffix}" if abs(v) < 100 else f"{v:,.0f}{suffix}"
    return f"{v}{suffix}"


def _level(levels: list[dict[str, Any]] | None, concurrency: int) -> dict[str, Any] | None:
    for lv in levels or []:
        if lv["concurrency"] == concurrency:
            return lv
    return None


def server_ratios(server: dict[str, Any]) -> list[dict[str, Any]]:
    """Per workload and concurrency: each server's throughput relative to mmfusion's (others / mmfusion)."""
    out = []
    for workload, by_server in server.get("workloads", {}).items():
        mm = by_server.get("mmfusion")
        if not mm:
            continue
        for lv in mm:
            c = lv["concurrency"]
            row: dict[str, Any] = {"workload": workload, "concurrency": c, "mmfusion_rps": lv["throughput_rps"],
                                   "mmfusion_p99_ms": lv["p99_ms"]}
            for other in ("inprocess", "naive_torch", "litserve"):
                o = _level(by_server.get(other), c)
                if o is None:
                    continue
                row[f"mmfusion_over_{other}"] = (round(lv["throughput_rps"] / o["throughput_rps"], 2)
                                                 if o["throughput_rps"] else None)
                row[f"{other}_p99_ms"] = o["p99_ms"]
            out.append(row)
    return out


def _spreads(a: dict[str, Any], b: dict[str, Any]) -> str:
    """``; windows: a-b vs c-d req/s`` when the levels are medians of several windows (``--repeats``)."""
    if not (a.get("spread_rps") and b.get("spread_rps")):
        return ""
    (a0, a1), (b0, b1) = a["spread_rps"], b["spread_rps"]
    return f"; {a.get('windows')} windows: {a0}-{a1} vs {b0}-{b1} req/s"


def acceptance(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 5's acceptance points that this benchmark measures, judged from this run's numbers only."""
    checks: list[dict[str, Any]] = []

    def add(criterion: str, value: str, ok: bool | None) -> None:
        checks.append({"criterion": criterion, "measured": value, "pass": ok})

    ml = result.get("model_level")
    if ml:
        r = next((x for x in ml["ratios"] if x["target"] == "pipeline" and x["batch"] == 1), None)
        default = ml.get("default_precision")
        v = r and r["ort_fp32_vs_eager"]
        served = r and (r.get("ort_int8_vs_eager") if default == "int8" else v)
        add("ORT pipeline vs PyTorch eager, batch 1: >= 3x per item",
            f"{_fmt(served)}x with the precision the server runs ({default}); fp32 graphs {_fmt(v)}x",
            None if served is None else served >= 3)
        i8 = next((x for x in ml["ratios"] if x["target"] == "pipeline" and x["batch"] == 1), None)
        q = result.get("bundle", {}).get("int8_quality") or {}
        agree = q.get("top1_agreement")
        if default == "int8" and i8 and i8["int8_vs_fp32_best"] is not None:
            ok = i8["int8_vs_fp32_best"] > 1.0 and agree is not None and agree >= 0.99
            add("INT8 default faster than fp32 (pipeline, batch 1, fastest calls) and within the recorded "
                "accuracy bound",
                f"default int8: {i8['int8_vs_fp32_best']}x fp32 speed (fastest calls; medians "
                f"{i8['int8_vs_fp32']}x), recorded top-1 agreement {agree}", ok)
        else:
            add("INT8 default faster than fp32 and within the recorded accuracy bound",
                f"default precision here: {default}", None if default != "int8" else False)
    sv = result.get("server_level")
    if sv:
        cls = sv.get("workloads", {}).get("classify_640x480", {})
        mm16, in16 = _level(cls.get("mmfusion"), 16), _level(cls.get("inprocess"), 16)
        nv16, ls16 = _level(cls.get("naive_torch"), 16), _level(cls.get("litserve"), 16)
        if mm16 and in16:
            v = mm16["throughput_rps"] / in16["throughput_rps"] if in16["throughput_rps"] else None
            add("mmfusion at 16 clients >= 0.8 of the in-process ceiling's throughput",
                f"{_fmt(v)} ({mm16['throughput_rps']} vs {in16['throughput_rps']} req/s)",
                None if v is None else v >= 0.8)
        if mm16 and nv16:
            v = mm16["throughput_rps"] / nv16["throughput_rps"] if nv16["throughput_rps"] else None
            add("mmfusion at 16 clients >= 5x the naive baseline",
                f"{_fmt(v)}x ({mm16['throughput_rps']} vs {nv16['throughput_rps']} req/s){_spreads(mm16, nv16)}",
                None if v is None else v >= 5)
        if mm16 and ls16:
            ok = (mm16["throughput_rps"] > ls16["throughput_rps"] and mm16["p99_ms"] is not None
                  and ls16["p99_ms"] is not None and mm16["p99_ms"] <= ls16["p99_ms"])
            add("mmfusion at 16 clients ahead of LitServe at equal or lower p99",
                f"{mm16['throughput_rps']} vs {ls16['throughput_rps']} req/s, p99 {mm16['p99_ms']} vs "
                f"{ls16['p99_ms']} ms" + _spreads(mm16, ls16), ok)
        mm1, in1 = _level(cls.get("mmfusion"), 1), _level(cls.get("inprocess"), 1)
        if mm1 and in1 and mm1["p50_ms"] and in1["p50_ms"]:
            v = mm1["p50_ms"] / in1["p50_ms"]
            add("1 client: mmfusion p50 within 1.25x of the in-process single-item latency",
                f"{v:.2f}x ({mm1['p50_ms']} vs {in1['p50_ms']} ms)", v <= 1.25)
        st = sv.get("startup_s", {}).get("mmfusion")
        if st is not None:
            add("start-up to ready < 3 s on the default bundle", f"{st:.2f} s", st < 3.0)
    venv = result.get("serving_venv")
    if venv:
        if venv.get("exists"):
            add("serving install contains no torch", f"{venv['path']}: {venv['size_mb']} MB, torch "
                f"{'present' if venv['contains_torch'] else 'absent'}", not venv["contains_torch"])
        else:
            add("serving install contains no torch", venv.get("note", "not built"), None)
    ov = result.get("overload_separate_run")
    if ov:
        add("overload at 4x capacity (no request past its timeout, 503 + Retry-After, stays up, memory returns): "
            "not part of this run",
            f"separate run of benchmarks/overload.py ({ov['file']}, {ov['when']}): issue checks passed={ov['passed']}",
            ov["passed"] if isinstance(ov["passed"], bool) else None)
    else:
        add("overload at 4x capacity for 30 s (503 + Retry-After, memory returns)",
            "not measured by this benchmark: see benchmarks/overload.py", None)
    return checks


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        f"## mmfusion benchmark ({result['mode']} mode), {result['when']}",
        "",
        f"Machine: {m['cpu_model']}, {m['cpus_usable']} usable CPUs ({', '.join(m['cpu_flags']) or 'no AVX2'}), "
        f"Python {m['python']}; 1-min load average {m['load_avg_1min_at_start']} at start, "
        f"{result.get('load_avg_1min_at_end', '-')} at end. Bundle `{result['bundle']['path']}` "
        f"({result['bundle']['name']} {result['bundle']['version']}), {result['params']['threads']} threads.",
        "",
    ]
    peak = result.get("matmul_peak")
    if peak:
        lines += [f"fp32 matmul peak ({peak['n']}^3, {peak['threads']} threads): numpy {peak['numpy_gflops']} "
                  f"GFLOP/s, ONNX Runtime {peak['onnxruntime_gflops']} GFLOP/s.", ""]
    ml = result.get("model_level")
    if ml:
        lines += [
            "### Model level (median per call; eager weights: " + str(ml["eager_source"]) + ")",
            "",
            "| target | batch | engine | ms/call | fastest ms | ms/item | items/s | GFLOP/item | GFLOP/s | % peak |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in ml["rows"]:
            lines.append(f"| {r['target']} | {r['batch']} | {r['engine']} | {_fmt(r['median_ms'])} | "
                         f"{_fmt(r.get('min_ms'))} | "
                         f"{_fmt(r['ms_per_item'])} | {_fmt(r['items_per_s'])} | {_fmt(r['gflop_per_item'])} | "
                         f"{_fmt(r['gflops'])} | {_fmt(r['pct_of_peak'])} |")
        lines += ["", "| target | batch | ORT fp32 / eager (median) | (fastest) | INT8 / fp32 (median) | (fastest) |",
                  "|---|---:|---:|---:|---:|---:|"]
        for r in ml["ratios"]:
            lines.append(f"| {r['target']} | {r['batch']} | {_fmt(r['ort_fp32_vs_eager'], 'x')} | "
                         f"{_fmt(r.get('ort_fp32_vs_eager_best'), 'x')} | {_fmt(r['int8_vs_fp32'], 'x')} | "
                         f"{_fmt(r.get('int8_vs_fp32_best'), 'x')} |")
        lines += ["", "INT8 variants: " + "; ".join(f"{k}: {v}" for k, v in ml["int8_variants"].items())
                  + f". Default precision here: {ml['default_precision']}.", ""]
    sv = result.get("server_level")
    if sv:
        plan = sv["plan"]
        st = sv.get("mmfusion_settings") or {}
        lines += ["### Server level (closed loop, real HTTP; in-process = no HTTP)", "",
                  f"{plan['warmup_s']} s warm-up + {plan['duration_s']} s window per level"
                  + (f" (median of {plan['repeats']} windows by req/s)" if plan.get("repeats", 1) > 1 else "")
                  + ", servers interleaved by "
                  f"client count; images {', '.join(f'{k} ({v:,} bytes)' for k, v in sv['images'].items())}; "
                  "mmfusion settings: " + ", ".join(f"{k}={v}" for k, v in st.items()) + "; LitServe max_batch_size="
                  f"{sv['litserve']['max_batch_size']}, batch_timeout={sv['litserve']['batch_timeout_s']} s, "
                  f"workers={sv['litserve'].get('workers', 1)}; text cache of every pipeline server: "
                  f"{sv.get('text_cache_size', 'default')}.", "",
                  "| workload | server | clients | req/s | p50 ms | p95 ms | p99 ms | errors | client CPU ms/req "
                  "| CPU steal % |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for workload, by_server in sv["workloads"].items():
            for name in SERVER_ORDER:
                for lv in by_server.get(name, []):
                    lines.append(f"| {workload} | {name} | {lv['concurrency']} | {_fmt(lv['throughput_rps'])} | "
                                 f"{_fmt(lv['p50_ms'])} | {_fmt(lv['p95_ms'])} | {_fmt(lv['p99_ms'])} | "
                                 f"{lv['errors']} | {_fmt(lv.get('client_cpu_ms_per_request'))} | "
                                 f"{_fmt(lv.get('cpu_steal_pct'))} |")
        lines += ["", "| workload | clients | mmfusion req/s | / in-process | / naive | / LitServe | "
                  "p99 mmfusion | p99 LitServe |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in sv["ratios"]:
            lines.append(f"| {r['workload']} | {r['concurrency']} | {_fmt(r['mmfusion_rps'])} | "
                         f"{_fmt(r.get('mmfusion_over_inprocess'), 'x')} | "
                         f"{_fmt(r.get('mmfusion_over_naive_torch'), 'x')} | "
                         f"{_fmt(r.get('mmfusion_over_litserve'), 'x')} | {_fmt(r['mmfusion_p99_ms'])} | "
                         f"{_fmt(r.get('litserve_p99_ms'))} |")
        lines += ["", "| server | start-up to ready (s) | RSS idle (MB) | RSS peak (MB) |", "|---|---:|---:|---:|"]
        for name in SERVER_ORDER:
            if name in sv.get("startup_s", {}):
                mem = sv["rss_mb"].get(name, {})
                lines.append(f"| {name} | {_fmt(sv['startup_s'][name])} | {_fmt(mem.get('idle'))} | "
                             f"{_fmt(mem.get('peak'))} |")
        lines.append("")
    venv = result.get("serving_venv")
    if venv:
        size = f"{venv['size_mb']} MB, torch {'present' if venv['contains_torch'] else 'absent'}" if venv.get(
            "exists") else venv.get("note", "")
        lines += [f"Serving environment `{venv['path']}`: {size}.", ""]
    idx = result.get("index_search")
    if idx:
        lines += [f"### Vector search: {idx['n']:,} x {idx['dim']} (bundle dimension), exact top-{idx['k']}", "",
                  "| query batch | median ms | p99 ms |", "|---:|---:|---:|",
                  f"| 1 | {idx['batch_1']['median_ms']} | {idx['batch_1']['p99_ms']} |",
                  f"| 32 | {idx['batch_32']['median_ms']} | {idx['batch_32']['p99_ms']} |", ""]
        if idx.get("note"):
            lines += [idx["note"], ""]
    lines += ["### Acceptance (issue 5), from this run", "", "| criterion | measured | result |", "|---|---|---|"]
    for c in result.get("acceptance", []):
        verdict = {True: "pass", False: "FAIL", None: "n/a"}[c["pass"]]
        lines.append(f"| {c['criterion']} | {c['measured']} | {verdict} |")
    if result.get("notes"):
        lines += ["", "Notes:", ""] + [f"- {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> Path | None:
    """Throughput and p50/p99 latency against concurrency, one line per server, per classify workload."""
    sv = result.get("server_level")
    if not sv:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = [w for w in sv["workloads"] if w.startswith("classify")] or list(sv["workloads"])
    fig, axes = plt.subplots(len(workloads), 2, figsize=(11, 4 * len(workloads)), squeeze=False)
    for row, workload in enumerate(workloads):
        ax_t, ax_l = axes[row]
        for i, name in enumerate(SERVER_ORDER):
            levels = sv["workloads"][workload].get(name)
            if not levels:
                continue
            color = f"C{i}"
            cs = [lv["concurrency"] for lv in levels]
            ax_t.plot(cs, [lv["throughput_rps"] for lv in levels], "o-", color=color, label=SERVER_TITLES[name])
            p50 = [lv["p50_ms"] if lv["p50_ms"] is not None else float("nan") for lv in levels]
            p99 = [lv["p99_ms"] if lv["p99_ms"] is not None else float("nan") for lv in levels]
            ax_l.plot(cs, p50, "o-", color=color, label=f"{name} p50")
            ax_l.plot(cs, p99, "s--", color=color, alpha=0.7, label=f"{name} p99")
        all_c = sorted({lv["concurrency"] for levels in sv["workloads"][workload].values() for lv in levels})
        for ax in (ax_t, ax_l):
            ax.set_xscale("log", base=2)
            ax.set_xticks(all_c, [str(c) for c in all_c])
            ax.set_xlabel("concurrent clients")
            ax.grid(True, alpha=0.3)
        ax_t.set_ylabel("requests/s")
        ax_t.set_title(f"{workload}: throughput")
        ax_l.set_yscale("log")
        ax_l.set_ylabel("latency (ms)")
        ax_l.set_title(f"{workload}: p50 (solid) / p99 (dashed)")
        ax_t.legend(fontsize=8)
        ax_l.legend(fontsize=7, ncol=2)
    m = result["machine"]
    fig.suptitle(f"mmfusion {result['mode']} benchmark, {result['when']}, {m['cpu_model']}, "
                 f"{m['cpus_usable']} CPUs", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
