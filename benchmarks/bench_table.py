"""The plain-text table of benchmarks/bench_sfl.py's records: one line per setting, each step mode's speed
relative to the loop of the same setting."""
from __future__ import annotations

from typing import Any, Sequence

from bench_data import DATA_MODE


def _cell(value: float | None, spec: str) -> str:
    """`value` formatted with `spec`, or "-" when there is none."""
    return "-" if value is None else format(value, spec)


def mode_label(record: dict[str, Any]) -> str:
    """The table's mode column: data:<loader>, vmap:<engine> or the mode, prefixed max: for a batch search."""
    if record["mode"] == DATA_MODE:
        return f"data:{record['loader']}"
    label = f"vmap:{record['engine']}" if record["engine"] else record["mode"]
    label += "+nhwc" * bool(record.get("channels_last")) + "+compile" * bool(record.get("compile"))
    return f"max:{label}" if record.get("max_batch_search") else label


def _machine(record: dict[str, Any]) -> str:
    """BUSY when other programs loaded the machine while the record was timed, idle when not, - when unknown."""
    if record.get("other_processes_cores") is None:
        return "-"
    return "BUSY" if record.get("busy_machine") else "idle"


def _spread(record: dict[str, Any]) -> str:
    """The spread of a record's repetitions, e.g. 4.2%, or - without one."""
    value = record.get("spread_pct")
    return "-" if value is None else f"{value:.1f}%"


def format_table(records: Sequence[dict[str, Any]]) -> str:
    """A plain-text table of the records, with each step mode's speed relative to the loop of the same setting."""
    loop_speed = {(r["clients"], r["cutlayer"]): r["images_per_sec"] for r in records
                  if r["mode"] == "loop" and r["images_per_sec"] is not None}
    best_loop = {clients: max(v for (c, _), v in loop_speed.items() if c == clients) for clients, _ in loop_speed}
    header = (f"{'method':<6} {'mode':<24} {'device':<6} {'clients':>7} {'pool':>5} {'batch':>5} {'global':>7} "
              f"{'cut':>3} {'amp':>3} {'img/s':>10} {'ms/step':>9} {'spread':>7} {'cpu ms':>9} {'peak MB':>9} "
              f"{'machine':>7} {'x loop':>7}")
    lines = [header, "-" * len(header)]
    for r in records:
        # The centralised step has no cut: it is compared with the fastest loop of the same client count.
        reference = (None if r["mode"] == DATA_MODE or r["images_per_sec"] is None
                     else best_loop.get(r["clients"]) if r["cutlayer"] is None
                     else loop_speed.get((r["clients"], r["cutlayer"])))
        relative = f"{r['images_per_sec'] / reference:.2f}" if reference else "-"
        cut = "-" if r["cutlayer"] is None else str(r["cutlayer"])
        lines.append(f"{r['method']:<6} {mode_label(r):<24} {r['device']:<6} {r['clients']:>7} "
                     f"{r['sampled_clients']:>5} {r['per_client_batch']:>5} "
                     f"{r['sampled_clients'] * r['per_client_batch']:>7} {cut:>3} {'yes' if r['amp'] else 'no':>3} "
                     f"{_cell(r['images_per_sec'], '.1f'):>10} {_cell(r['step_ms'], '.2f'):>9} "
                     f"{_spread(r):>7} {_cell(r['cpu_step_ms'], '.2f'):>9} {_cell(r['peak_mem_mb'], '.1f'):>9} "
                     f"{_machine(r):>7} {relative:>7}")
    return "\n".join(lines)
