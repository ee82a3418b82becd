"""Recompute a committed run's held-out change from its per-problem files: pass@k of each round with its 95%
interval and the paired change over the same problems (clustered by template, as the loop logs them).

    .venv/bin/python bench/results/paired_change.py bench/results/<run>/round-00/eval_per_prompt.jsonl \
        bench/results/<run>/round-NN/eval_per_prompt.jsonl
"""
import json
import sys

from loop.evaluation.stats import paired_difference, pass_at_k_interval


def rows(path: str) -> dict[str, dict]:
    with open(path) as f:
        return {r["task_id"]: r for r in map(json.loads, f)}


def main(path_a: str, path_b: str) -> None:
    a, b = rows(path_a), rows(path_b)
    if a.keys() != b.keys():
        sys.exit(f"the two files hold different problems ({len(a)} and {len(b)}): a paired change needs the same ones")
    ids = sorted(a)
    n = a[ids[0]]["n"]
    clusters = [a[i]["cluster"] for i in ids]
    ca, cb = [a[i]["correct"] for i in ids], [b[i]["correct"] for i in ids]
    print(f"{len(ids)} problems in {len(set(clusters))} clusters x {n} samples")
    for k in range(1, n + 1):
        m0, l0, h0 = pass_at_k_interval(ca, n, k, clusters=clusters)
        m1, l1, h1 = pass_at_k_interval(cb, n, k, clusters=clusters)
        d, lo, hi, p = paired_difference(ca, cb, n, k, clusters=clusters)
        verdict = "within noise" if lo <= 0 <= hi else ("up" if lo > 0 else "down")
        print(f"pass@{k}: {m0:.3f} [{l0:.3f}, {h0:.3f}] -> {m1:.3f} [{l1:.3f}, {h1:.3f}]; "
              f"change {d:+.3f} [{lo:+.3f}, {hi:+.3f}], p {p:.2g}, {verdict}")
    for key in ("cutoff_frac", "response_tokens"):
        print(f"{key}: {sum(a[i][key] for i in ids) / len(ids):.3f} -> {sum(b[i][key] for i in ids) / len(ids):.3f}")
    finished = [sum(r[i]["finished_correct"] for i in ids) / sum(r[i]["finished"] for i in ids) for r in (a, b)]
    print(f"accuracy of the samples that finished: {finished[0]:.3f} -> {finished[1]:.3f}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
