"""A loop's rounds as table cells: each accuracy as mean ± standard error per round, then each later round's paired
changes against round 0 and the previous evaluated round, with the run's primary comparison (eval.primary, last
evaluated round against round 0) marked and the other changes descriptive. The CLI renders the cells with rich, the
Prefect artifact as markdown; both show the same figures. A round the evaluation schedule skipped shows '-'."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from loop.evaluation.stats import format_change, format_estimate

OTHER = ("eval/distinct_answers", "eval/cutoff_frac", "train_samples/correct_frac", "pairs/pairs", "train/loss",
         "train/chosen_logp_shift", "time/stages_s")
CHANGE_HEADER = ["round", "metric", "vs round 0", "p", "vs previous round", "p"]
PRIMARY_NOTE = ("the primary comparison is marked (primary); every other change is descriptive: among this many "
                "paired tests one or two fall below p 0.05 by chance")


def accuracies(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """greedy_acc, pass@k (each k) and the largest maj@k the rows carry under eval/ (the smaller maj@k are in
    MLflow; a table of all of them is too wide for a terminal)."""
    def ks(prefix: str) -> list[int]:
        return sorted({int(k[len(prefix):]) for r in rows for k in r if k.startswith(prefix) and k[len(prefix):].isdigit()})

    majs = ks("eval/maj@")
    return ((["greedy_acc"] if any("eval/greedy_acc" in r for r in rows) else [])
            + [f"pass@{k}" for k in ks("eval/pass@")] + ([f"maj@{majs[-1]}"] if majs else []))


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return str(int(v)) if v.is_integer() else f"{v:.3f}"
    return str(v)


def round_cells(rows: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and one row of cells per round: the accuracies as 'mean ± SE', then pairs, loss, stage time."""
    acc, other = accuracies(rows), [c for c in OTHER if any(c in r for r in rows)]
    header = ["round"] + acc + [c.split("/", 1)[1] for c in other]
    body = [[str(r["round"])] + [format_estimate(r.get(f"eval/{n}"), r.get(f"eval/{n}_se")) for n in acc]
            + [fmt(r.get(c)) for c in other] for r in rows]
    return header, body


def _primary_round(rows: Sequence[Mapping[str, Any]], primary: str | None) -> Any:
    """The round of the primary comparison: the last one with a change against round 0 in `primary`."""
    if primary is None:
        return None
    return next((r["round"] for r in reversed(rows) if f"vs_round0/{primary}" in r), None)


def change_cells(rows: Sequence[Mapping[str, Any]], primary: str | None = None) -> list[list[str]]:
    """Per later round and accuracy (CHANGE_HEADER): the paired change with its 95% interval and p-value against
    round 0 and the previous evaluated round; empty when no round has one. The primary comparison's metric reads
    '<metric> (primary)'."""
    out = []
    marked = _primary_round(rows, primary)
    for r in rows:
        for n in accuracies(rows):
            if f"vs_round0/{n}" not in r and f"vs_prev/{n}" not in r:
                continue
            cells = [str(r["round"]), f"{n} (primary)" if (r["round"], n) == (marked, primary) else n]
            for vs in ("vs_round0", "vs_prev"):
                p = r.get(f"{vs}/{n}_p")
                cells += [format_change(r.get(f"{vs}/{n}"), r.get(f"{vs}/{n}_low"), r.get(f"{vs}/{n}_high")),
                          "-" if p is None else f"{p:.2g}"]
            out.append(cells)
    return out


def primary_line(rows: Sequence[Mapping[str, Any]], primary: str) -> str | None:
    """One line with the run's verdict: the primary metric, last evaluated round against round 0, with its interval
    and p-value; None before any round has been compared."""
    r = _primary_round(rows, primary)
    if r is None:
        return None
    row = next(x for x in rows if x["round"] == r)
    k = f"vs_round0/{primary}"
    return (f"primary comparison: {primary}, round {r} against round 0: "
            f"{format_change(row[k], row.get(f'{k}_low'), row.get(f'{k}_high'), row.get(f'{k}_p'))}")


def markdown(rows: Sequence[Mapping[str, Any]], primary: str | None = None) -> str:
    """Both tables in markdown (the Prefect artifacts)."""
    def table(header: list[str], body: list[list[str]]) -> str:
        lines = [header, ["---"] * len(header), *body]
        return "".join("| " + " | ".join(cells) + " |\n" for cells in lines)

    header, body = round_cells(rows)
    out = "Held-out accuracies: mean ± standard error over problems.\n\n" + table(header, body)
    if changes := change_cells(rows, primary):
        out += ("\nPaired changes over the same problems (95% interval; 'within noise' when it holds 0)"
                + (f"; {PRIMARY_NOTE}" if _primary_round(rows, primary) is not None else "") + ":\n\n"
                + table(CHANGE_HEADER, changes))
    return out
