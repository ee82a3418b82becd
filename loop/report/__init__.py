"""The diversity-collapse report: load one loop from MLflow and draw the figures of
notebooks/diversity_collapse.ipynb.

RL-style self-improvement tends to sharpen the policy around answers it already finds: pass@1 goes up
while pass@k at large k, the set of problems the model can solve at all, stays flat or shrinks
(Yue et al. 2025, "Does Reinforcement Learning Really Incentivize Reasoning Capacity in LLMs Beyond
the Base Model?"). The figures here show that from what the loop logs: the parent run's metric
histories (one step per round) and each round's eval_per_prompt.jsonl / eval_samples.jsonl artifacts.

Each plot function takes a LoopData and returns a matplotlib Figure; `save_figure` writes it as PNG. Every
accuracy drawn carries its 95% interval (bands or error bars), and every difference to round 0 its paired 95%
interval, recomputed with loop/evaluation/stats.py from the per-problem rows (so loops logged before the statistics
existed get them too; `cross_check` compares them with the logged ones where those exist).

load.py reads a loop from MLflow (a LoopData), tables.py computes the tables and intervals, plots.py draws; the
names the notebook uses are imported here, so `from loop import report` gives them all.
"""
from loop.report.load import LoopData, find_loop_run, load_loop, load_loops
from loop.report.plots import (MIN_BOX, plot_breakdown, plot_coverage, plot_diversity, plot_headline, plot_options,
                               plot_pass_at_k, save_figure)
from loop.report.tables import (breakdown, change_table, coverage, cross_check, crossover_k, group_field,
                                pass_at_k_table, pass_at_k_verdicts, round_stats, solved_matrix, summary_table,
                                top_answer_share)

__all__ = ["LoopData", "find_loop_run", "load_loop", "load_loops",
           "breakdown", "change_table", "coverage", "cross_check", "crossover_k", "group_field", "pass_at_k_table",
           "pass_at_k_verdicts",
           "round_stats", "solved_matrix", "summary_table", "top_answer_share",
           "MIN_BOX", "plot_breakdown", "plot_coverage", "plot_diversity", "plot_headline", "plot_options",
           "plot_pass_at_k", "save_figure"]
