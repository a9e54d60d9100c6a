"""Run a search: enumerate, drop the invalid, screen in closed form, simulate the best fully.

Outputs in the search folder: ``search.csv`` (one row per valid layout, best first: every knob,
screened and simulated figures, the ``simulated`` flag), ``top/NN-<layout>.yaml`` (the best
layouts as runnable scenarios), ``simulated.jsonl`` (finished simulations, one line each: what
``--resume`` reuses), ``search.json`` (counts, drop reasons, the scenario's own rank, wall time)
and ``summary.txt`` (the printed table).
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import yaml

from moesim.errors import MoESimError, OutOfMemory, ScenarioError
from moesim.layout import Layout
from moesim.pricing.context import scenario_topology
from moesim.results import check_output_dir, discard_output_dir, write_text_atomic
from moesim.search.screen import screen_layout
from moesim.search.serving import (
    RequestShape,
    check_kv,
    decode_scenario,
    decode_tokens_per_step,
    decode_workload,
    kv_max_batch,
    pareto_front,
    prefill_scenario,
    prefill_workload,
    serving_metrics,
)
from moesim.search.space import (
    Candidate,
    SearchSpec,
    candidate_overrides,
    candidate_scenario,
    enumerate_layouts,
    own_candidate,
)
from moesim.spec.fields import relative_file
from moesim.spec.scenario import apply_overrides
from moesim.sweep.executors import run_tasks
from moesim.sweep.runner import PointTask, simulate_point
from moesim.sweep.spec import point_key

__all__ = ["SearchOutcome", "run_search", "request_shape", "OBJECTIVES"]

CSV_NAME, JSONL_NAME, MANIFEST = "search.csv", "simulated.jsonl", "search.json"
OBJECTIVES = ("throughput", "latency")


@dataclass
class SearchOutcome:
    """What a search found: rows best first and its bookkeeping."""

    rows: list[dict[str, Any]]
    considered: int                     # layouts enumerated (before dropping)
    dropped: Counter                    # reason -> layouts
    capped: bool
    simulated: int
    reused: int                         # simulations found in simulated.jsonl (resume)
    own_rank: int | None                # 1-based rank of the scenario's own layout
    own_label: str
    wall_seconds: float
    serving: bool
    files: list[Path] = field(default_factory=list)
    screen_seconds: float = 0.0         # enumeration and screen, before the simulations


def request_shape(spec: SearchSpec) -> RequestShape:
    """The serving request shape: the ``search:`` options, else the workload's own lengths."""
    wl, o = spec.scenario.workload, spec.options
    own_input = wl.context_len if wl.mode == "decode" else wl.seq_len
    return RequestShape(o.get("input_len") or own_input, o.get("output_len") or 256,
                        o.get("prefill_batch") or 1)


def _knob_row(cand: Candidate) -> dict[str, Any]:
    """The layout's label and every knob (dp included) under its field path."""
    return {"layout": cand.label(), **dict(cand.values)}


def _screen(spec: SearchSpec, cands: list[Candidate], dropped: Counter, progress: TextIO | None
            ) -> list[tuple[Candidate, dict[str, Any]]]:
    topology = scenario_topology(spec.scenario)
    cache: dict = {}
    kv_cache: dict = {}
    shape = request_shape(spec) if spec.serving else None
    kept = []
    start, step = time.monotonic(), max(1, len(cands) // 10)
    for i, cand in enumerate(cands):
        if progress is not None and i and i % step == 0:
            rate = i / (time.monotonic() - start)
            progress.write(f"screened {i}/{len(cands)} layouts, ETA "
                           f"{(len(cands) - i) / rate:.0f} s\n")
            progress.flush()
        s = candidate_scenario(spec, cand)
        try:
            layout = Layout.for_scenario(s)
            if any(not any(len(c) for c in chunks) for chunks in layout.chunk_layers()):
                dropped["a pipeline stage gets no layers"] += 1
                continue
            row = _knob_row(cand)
            if shape is None:
                r = screen_layout(s, topology, cache)
                row.update(screened_step_time_s=r.step_time,
                           screened_tokens_per_s_per_gpu=r.tokens_per_s_per_device,
                           screened_mfu=r.mfu, memory_bytes=r.memory_bytes,
                           memory_capacity_bytes=r.memory_capacity)
            else:
                batch = cand.get("workload.micro_batch")
                check_kv(s, shape, batch)
                decode = decode_scenario(s, shape, batch)
                dec = screen_layout(decode, topology, cache)
                pre = screen_layout(prefill_scenario(s, shape), topology, cache)
                metrics = serving_metrics(dec.step_time, pre.step_time, batch,
                                          s.parallelism.dp, s.num_devices,
                                          decode_tokens_per_step(decode))
                key = (s.parallelism.tp, s.parallelism.pp, s.parallelism.ep)
                if key not in kv_cache:
                    kv_cache[key] = kv_max_batch(s, shape)
                row.update({f"screened_{k}": v for k, v in metrics.items()})
                row.update(batch_per_replica=batch, kv_max_batch=kv_cache[key],
                           memory_bytes=dec.memory_bytes,
                           memory_capacity_bytes=dec.memory_capacity)
        except OutOfMemory:
            dropped["out of memory"] += 1
            continue
        except ScenarioError as exc:
            dropped[str(exc).split(": ")[-1][:60]] += 1
            continue
        kept.append((cand, row))
    return kept


def _score(row: dict[str, Any], serving: bool, objective: str, prefix: str) -> float | None:
    """Larger is better; None if the row lacks the figure."""
    if not serving:
        value = row.get(f"{prefix}tokens_per_s_per_gpu")
    else:
        name = "tokens_per_s_per_gpu" if objective == "throughput" else "tokens_per_s_per_user"
        value = row.get(f"{prefix}{name}")
    return None if value in (None, "") else float(value)


def _passes(row: dict[str, Any], max_tpot: float | None, max_ttft: float | None,
            prefix: str) -> bool:
    if max_tpot is not None and row.get(f"{prefix}tpot_s", 0.0) > max_tpot:
        return False
    return not (max_ttft is not None and row.get(f"{prefix}ttft_s", 0.0) > max_ttft)


def _tasks(spec: SearchSpec, cand: Candidate, serving: bool, shape: RequestShape | None
           ) -> list[tuple[str, PointTask]]:
    base = candidate_overrides(spec, cand)
    if not serving:
        return [("train", PointTask(spec.base, spec.base_dir, spec.source, base))]
    assert shape is not None
    v = dict(cand.values)
    dp, batch = v["parallelism.dp"], v["workload.micro_batch"]
    dec = (*base, *(f"workload.{k}={x}" for k, x in decode_workload(shape, batch, dp).items()))
    pre = (*base, *(f"workload.{k}={x}" for k, x in prefill_workload(shape, dp).items()))
    return [("decode", PointTask(spec.base, spec.base_dir, spec.source, dec)),
            ("prefill", PointTask(spec.base, spec.base_dir, spec.source, pre))]


def _read_done(path: Path) -> dict[str, dict]:
    done: dict[str, dict] = {}
    if not path.exists():
        return done
    for line in path.read_text().splitlines():
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            continue        # a line cut by a kill
        done[item["key"]] = item["metrics"]
    return done


def run_search(spec: SearchSpec, out_dir: str | Path, *, top: int | None = None, jobs: int = 1,
               executor: str = "local", address: str | None = None, objective: str = "throughput",
               max_tpot: float | None = None, max_ttft: float | None = None,
               resume: bool = False, progress: TextIO | None = None) -> SearchOutcome:
    """Search ``spec``'s layouts; write the outputs to ``out_dir`` (see the module doc).

    Raises
    ------
    MoESimError
        An unknown objective, jobs < 1, no valid layout at all, a non-empty folder without
        ``resume``. Nothing is left in ``out_dir`` when it fails before a simulation ends.
    """
    wall = time.monotonic()
    if objective not in OBJECTIVES:
        raise MoESimError(f"--objective {objective!r} is not one of {', '.join(OBJECTIVES)}")
    if jobs < 1:
        raise MoESimError(f"-j/--jobs {jobs} must be >= 1")
    out, created = check_output_dir(out_dir, what="search output folder")
    jsonl = out / JSONL_NAME
    if jsonl.exists() and jsonl.stat().st_size and not resume:
        raise MoESimError(f"{out}: holds an earlier search ({JSONL_NAME}); pass --resume to "
                          "reuse its simulations or choose another -o folder")
    fresh = not jsonl.exists()
    try:
        return _search(spec, out, jsonl, wall, top=top, jobs=jobs, executor=executor,
                       address=address, objective=objective, max_tpot=max_tpot,
                       max_ttft=max_ttft, resume=resume, progress=progress)
    except BaseException:   # nothing half-written: what this call made and left empty goes
        if fresh and jsonl.exists() and not jsonl.stat().st_size:
            jsonl.unlink()
        discard_output_dir(out, created)
        raise


def _search(spec: SearchSpec, out: Path, jsonl: Path, wall: float, *, top: int | None,
            jobs: int, executor: str, address: str | None, objective: str,
            max_tpot: float | None, max_ttft: float | None, resume: bool,
            progress: TextIO | None) -> SearchOutcome:
    serving = spec.serving
    shape = request_shape(spec) if serving else None
    top = top or spec.options.get("top", 8)
    cands, dropped, capped = enumerate_layouts(spec)
    considered = len(cands) + sum(dropped.values())
    kept = _screen(spec, cands, dropped, progress)
    screen_seconds = time.monotonic() - wall
    if not kept:
        reasons = ", ".join(f"{n} {why}" for why, n in dropped.most_common())
        raise MoESimError(f"{spec.source}: no valid layout on {spec.devices} devices ({reasons})")
    own = own_candidate(spec)
    rows = {cand.values: row for cand, row in kept}
    by_values = {cand.values: cand for cand, _ in kept}
    ok = [c for c, row in kept if _passes(row, max_tpot, max_ttft, "screened_")]
    ok.sort(key=lambda c: -(_score(rows[c.values], serving, objective, "screened_") or 0.0))
    chosen = ok[:top]
    if own.values in rows and by_values[own.values] not in chosen:
        chosen.append(by_values[own.values])
    done = _read_done(jsonl) if resume else {}
    reused = 0
    jobs_list: list[tuple[Candidate, str, str, PointTask]] = []
    results: dict[tuple, dict[str, dict]] = {}
    for cand in chosen:
        for kind, task in _tasks(spec, cand, serving, shape):
            key = point_key(task.overrides)
            if key in done:
                results.setdefault(cand.values, {})[kind] = done[key]
                reused += 1
            else:
                jobs_list.append((cand, kind, key, task))
    start = time.monotonic()
    with open(jsonl, "a") as handle:
        for n, (i, metrics) in enumerate(run_tasks(simulate_point, [j[3] for j in jobs_list],
                                                   executor=executor, jobs=jobs,
                                                   address=address), 1):
            cand, kind, key, _ = jobs_list[i]
            results.setdefault(cand.values, {})[kind] = metrics
            handle.write(json.dumps({"key": key, "metrics": metrics}, default=str) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
            if progress is not None:
                elapsed = time.monotonic() - start
                eta = elapsed / n * (len(jobs_list) - n)
                progress.write(f"simulated {n}/{len(jobs_list)} ({cand.label()} {kind}), "
                               f"{elapsed:.0f} s elapsed, ETA {eta:.0f} s"
                               + (f"  error: {metrics['error']}" if metrics.get("error")
                                  else "") + "\n")
                progress.flush()
    for values, kinds in results.items():
        _merge(rows[values], kinds, serving, decode_tokens_per_step(spec.scenario))
    table = _rank(list(rows.values()), serving, objective, max_tpot, max_ttft)
    own_rank = next((r["rank"] for r in table if own.values in rows
                     and r is rows[own.values]), None)
    outcome = SearchOutcome(table, considered, dropped, capped, len(jobs_list), reused, own_rank,
                            own.label(), time.monotonic() - wall, serving)
    outcome.screen_seconds = screen_seconds
    outcome.files = _write(spec, out, outcome, by_values, rows, top, shape)
    return outcome


def _merge(row: dict[str, Any], kinds: dict[str, dict], serving: bool,
           tokens_per_step: float) -> None:
    errors = [m["error"] for m in kinds.values() if m.get("error")]
    row["simulated"] = not errors
    row["error"] = "; ".join(errors)
    if errors:
        return
    if not serving:
        m = kinds["train"]
        row.update(step_time_s=m["step_time_s"], tokens_per_s_per_gpu=m["tokens_per_s_per_device"],
                   mfu=m["mfu"], memory_bytes=m["memory_peak_bytes"])
        row.update({k: v for k, v in m.items() if k.startswith("breakdown_")})
        return
    dec, pre = kinds["decode"], kinds["prefill"]
    row.update(serving_metrics(dec["step_time_s"], pre["step_time_s"], row["batch_per_replica"],
                               row["parallelism.dp"], dec["devices"], tokens_per_step))
    row["memory_bytes"] = dec["memory_peak_bytes"]


def _rank(rows: list[dict[str, Any]], serving: bool, objective: str,
          max_tpot: float | None, max_ttft: float | None) -> list[dict[str, Any]]:
    """Simulated rows first (by their simulated objective), then screened ones; serving rows
    that break a latency limit last. Adds ``rank``, ``meets_limits`` and (serving) ``pareto``."""
    for row in rows:
        row.setdefault("simulated", False)
        row.setdefault("error", "")
        prefix = "" if row["simulated"] else "screened_"
        row["meets_limits"] = _passes(row, max_tpot, max_ttft, prefix)
        row["_score"] = _score(row, serving, objective, prefix) or 0.0
    rows.sort(key=lambda r: (not r["meets_limits"], not r["simulated"], -r["_score"],
                             r["layout"]))
    if serving:
        ok = [r for r in rows if r["meets_limits"]]
        pts = [(r.get("tokens_per_s_per_gpu") or r["screened_tokens_per_s_per_gpu"],
                r.get("tokens_per_s_per_user") or r["screened_tokens_per_s_per_user"])
               for r in ok]
        for r, front in zip(ok, pareto_front(pts), strict=True):
            r["pareto"] = front
    for i, row in enumerate(rows, 1):
        row["rank"] = i
        del row["_score"]
        row.setdefault("pareto", False) if serving else None
    return rows


def _write(spec: SearchSpec, out: Path, o: SearchOutcome, by_values: dict,
           rows: dict, top: int, shape: RequestShape | None) -> list[Path]:
    first = ["rank", "layout", "simulated", "meets_limits"]
    columns = first + sorted({k for r in o.rows for k in r} - set(first))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for r in o.rows:
        writer.writerow(["" if r.get(c) is None else r.get(c) for c in columns])
    files = [out / CSV_NAME]
    write_text_atomic(files[-1], buffer.getvalue())
    reverse = {id(row): values for values, row in rows.items()}
    (out / "top").mkdir(exist_ok=True)
    for r in [r for r in o.rows if r["simulated"]][:top]:
        cand = by_values[reverse[id(r)]]
        data = apply_overrides(spec.base, list(candidate_overrides(spec, cand)),
                               source=spec.source)
        data["name"] = f"{spec.scenario.name}-search-{r['rank']:02d}"
        data["description"] = f"moesim search rank {r['rank']}: {r['layout']}"
        _absolute_paths(data, Path(spec.base_dir))
        name = f"{r['rank']:02d}-{r['layout'].replace(' ', '-').lower()}.yaml"
        files.append(out / "top" / name)
        write_text_atomic(files[-1], yaml.safe_dump(data, sort_keys=False))
    text = summary(o, spec, shape)
    files.append(out / "summary.txt")
    write_text_atomic(files[-1], text + "\n")
    manifest = {"source": spec.source, "devices": spec.devices, "considered": o.considered,
                "dropped": dict(o.dropped), "valid": len(o.rows), "capped": o.capped,
                "simulated": o.simulated, "reused": o.reused, "own_layout": o.own_label,
                "own_rank": o.own_rank, "wall_seconds": o.wall_seconds,
                "screen_seconds": o.screen_seconds, "serving": o.serving,
                **({"request": vars(shape)} if shape is not None else {})}
    files.append(out / MANIFEST)
    write_text_atomic(files[-1], json.dumps(manifest, indent=2) + "\n")
    return files


def _absolute_paths(data: dict, base: Path) -> None:
    """Files named relative to the scenario (a model YAML, a trace, a plan) made absolute, so
    the written scenario runs from the search folder; found as the loader finds them
    (:func:`moesim.spec.fields.relative_file`)."""
    for section, key in (("routing", "trace"), ("placement", "file"), ("cluster", "hardware")):
        value = (data.get(section) or {}).get(key) if isinstance(data.get(section), dict) else None
        if isinstance(value, str) and value.endswith((".yaml", ".yml", ".npz", ".csv", ".json")):
            data[section][key] = str(relative_file(value, base).resolve())
    if isinstance(data.get("model"), str) and data["model"].endswith((".yaml", ".yml")):
        data["model"] = str(relative_file(data["model"], base).resolve())


def summary(o: SearchOutcome, spec: SearchSpec, shape: RequestShape | None, n: int = 12) -> str:
    """The printed report: counts, drop reasons, the top table, the own layout's rank."""
    lines = [f"{spec.source}: {o.considered:,} layouts on {spec.devices} devices considered"
             + (" (capped at search.max_layouts)" if o.capped else "")
             + f", {len(o.rows):,} valid, {o.simulated + o.reused} simulated fully"
             + f" in {o.wall_seconds:.1f} s ({o.screen_seconds:.1f} s enumerating and "
             "screening)"]
    for why, count in o.dropped.most_common():
        lines.append(f"  dropped {count:>7,}  {why}")
    if shape is not None:
        lines.append(f"  request: {shape.input_len} input tokens, {shape.output_len} output, "
                     f"prefill batch {shape.prefill_batch} per replica")
    show = [r for r in o.rows[:n]]
    own = next((r for r in o.rows if r["rank"] == o.own_rank), None)
    if own is not None and own not in show:
        show.append(own)
    if not o.serving:
        head = (f"{'rank':>4} {'layout':<26} {'mb':>3} {'zero':>4} {'recompute':<9} "
                f"{'overlap':<9} {'alltoall':<13} {'screen s':>9} {'sim s':>8} {'tok/s/GPU':>10}"
                f" {'MFU':>6} {'mem GiB':>7} {'bubble s':>8} {'a2a s':>7}")
        lines.append(head)
        for r in show:
            sim = r.get("step_time_s")
            lines.append(
                f"{r['rank']:>4} {r['layout']:<26} {r['workload.micro_batch']:>3} "
                f"{r['parallelism.zero_stage']:>4} {r['memory.recompute']:<9} "
                f"{r['communication.overlap']:<9} {r['communication.alltoall']:<13} "
                f"{r['screened_step_time_s']:>9.2f} "
                + (f"{sim:>8.2f} " if sim is not None else f"{'-':>8} ")
                + f"{r.get('tokens_per_s_per_gpu', r['screened_tokens_per_s_per_gpu']):>10,.0f} "
                f"{100 * r.get('mfu', r['screened_mfu']):>5.1f}% "
                f"{r['memory_bytes'] / 2**30:>7.1f} "
                + (f"{r['breakdown_pipeline_bubble_s']:>8.2f} "
                   f"{r['breakdown_exposed_alltoall_s']:>7.2f}"
                   if "breakdown_pipeline_bubble_s" in r else f"{'':>8} {'':>7}"))
    else:
        head = (f"{'rank':>4} {'layout':<22} {'batch':>5} {'kvmax':>5} {'overlap':<9} "
                f"{'alltoall':<13} {'TTFT ms':>8} {'TPOT ms':>8} {'tok/s/GPU':>10} "
                f"{'tok/s/user':>10} {'sim':>3} {'ok':>3} {'pareto':>6}")
        lines.append(head)
        for r in show:
            sim = r["simulated"]
            lines.append(
                f"{r['rank']:>4} {r['layout']:<22} {r['batch_per_replica']:>5} "
                f"{r['kv_max_batch']:>5} {r['communication.overlap']:<9} "
                f"{r['communication.alltoall']:<13} {1e3 * _pick(r, 'ttft_s'):>8.1f} "
                f"{1e3 * _pick(r, 'tpot_s'):>8.2f} {_pick(r, 'tokens_per_s_per_gpu'):>10,.0f} "
                f"{_pick(r, 'tokens_per_s_per_user'):>10,.1f} {'yes' if sim else 'no':>3} "
                f"{'yes' if r['meets_limits'] else 'no':>3} "
                f"{'yes' if r.get('pareto') else '':>6}")
        front = [r for r in o.rows if r.get("pareto")]
        lines.append(f"Pareto frontier (tokens/s/GPU vs tokens/s/user, within the limits): "
                     f"{len(front)} layouts: " + "; ".join(
                         f"#{r['rank']} {r['layout']} b{r['batch_per_replica']}"
                         for r in front[:10]) + (" ..." if len(front) > 10 else ""))
    lines.append(f"the scenario's own layout ({o.own_label}) ranks "
                 + (f"{o.own_rank} of {len(o.rows)}" if o.own_rank else
                    "nowhere: it is not valid (see the drop reasons)"))
    return "\n".join(lines)


def _pick(row: dict[str, Any], name: str) -> float:
    """The simulated figure of a simulated row, else the screened one."""
    return row[name] if row["simulated"] else row[f"screened_{name}"]
