"""The study's arithmetic: gains over seeds, and time-to-accuracy against TRL's GRPO on the same seeds.

Each arm's runs are paired with GRPO's run on the same seed (same warm model, same prompts). Two ways of asking
"when does the arm reach GRPO's final sampled accuracy": per seed (noisy: a seed whose GRPO run ends lucky may never
be reached), and on the mean curves over seeds (runs evaluate at the same steps, so their points average step by
step), which is the study's headline.
"""

from __future__ import annotations

import math
import statistics

from .settings import ARM_LABELS

# The study's goal for TreePO against GRPO (issue 19): GRPO's final held-out sampled accuracy at no more than these
# shares of GRPO's decoded tokens and wall time, with greedy accuracy falling by no more than GREEDY_TOLERANCE.
TOKEN_SHARE_GOAL, WALL_SHARE_GOAL, GREEDY_TOLERANCE = 0.8, 1.0, 0.02


def mean_and_se(values: list[float]) -> tuple[float, float]:
    mean = statistics.mean(values)
    return mean, (statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan"))


def quarter_gain(rewards: list[float]) -> float:
    quarter = max(len(rewards) // 4, 1)
    return statistics.mean(rewards[-quarter:]) - statistics.mean(rewards[:quarter])


def cost_to_reach(curve: list[dict], key: str, target: float, cost: str = "decoded_tokens") -> float | None:
    """The cost (`decoded_tokens` or `wall_s`) at which `curve[key]` first reaches `target`, interpolated between
    measurements; 0 if the curve starts there, None if it never gets there."""
    if curve and curve[0][key] >= target:
        return 0.0
    for before, after in zip(curve, curve[1:]):
        if before[key] < target <= after[key]:
            share = (target - before[key]) / (after[key] - before[key])
            return before[cost] + share * (after[cost] - before[cost])
    return None


def value_at(curve: list[dict], key: str, spent: float, cost: str = "decoded_tokens") -> float | None:
    """`curve[key]` once `spent` of `cost` (`decoded_tokens` or `wall_s`) is spent, interpolated between measurements
    (None past the curve)."""
    for before, after in zip(curve, curve[1:]):
        if before[cost] <= spent <= after[cost]:
            share = (spent - before[cost]) / max(after[cost] - before[cost], 1e-9)
            return before[key] + share * (after[key] - before[key])
    return None


def difference_at_equal_cost(curve: list[dict], base: list[dict], cost: str, key: str = "sampled") -> float | None:
    """`curve[key] − base[key]` where both have spent as much `cost` as the one that spent less: time-to-accuracy's
    reading at an equal budget, on each run's own curve."""
    spent = min(curve[-1][cost], base[-1][cost])
    mine, theirs = value_at(curve, key, spent, cost), value_at(base, key, spent, cost)
    if spent == 0 or mine is None or theirs is None:
        return None
    return mine - theirs


def mean_curve(runs: list[dict]) -> list[dict]:
    """The runs' curves averaged point by point (they evaluate at the same steps)."""
    length = min(len(run["curve"]) for run in runs)
    keys = ("step", "decoded_tokens", "wall_s", "sampled", "greedy")
    return [{key: statistics.mean(run["curve"][i][key] for run in runs) for key in keys} for i in range(length)]


def _versus_grpo(row: dict, arm_runs: list[dict], grpo: dict[int, dict]) -> None:
    """The arm against GRPO on the same seeds: at equal decoded tokens, and the cost to reach GRPO's final."""
    paired = [(run, grpo[run["seed"]]) for run in arm_runs if run["seed"] in grpo]
    if not paired:
        return
    differences, wall_differences, token_shares, wall_shares = [], [], [], []
    for run, base in paired:
        base_final = base["curve"][-1]
        for cost, found in (("decoded_tokens", differences), ("wall_s", wall_differences)):
            difference = difference_at_equal_cost(run["curve"], base["curve"], cost)
            if difference is not None:
                found.append(difference)
        tokens = cost_to_reach(run["curve"], "sampled", base_final["sampled"])
        if tokens is not None:
            token_shares.append(tokens / base_final["decoded_tokens"])
            wall_shares.append(cost_to_reach(run["curve"], "sampled", base_final["sampled"], "wall_s") / base_final["wall_s"])
    row["sampled_vs_grpo_at_equal_tokens"], row["sampled_vs_grpo_at_equal_tokens_se"] = (
        mean_and_se(differences) if differences else (None, None)
    )
    row["sampled_vs_grpo_at_equal_wall"], row["sampled_vs_grpo_at_equal_wall_se"] = (
        mean_and_se(wall_differences) if wall_differences else (None, None)
    )
    mine_greedy = [difference_at_equal_cost(run["curve"], base["curve"], "decoded_tokens", "greedy") for run, base in paired]
    mine_greedy = [value for value in mine_greedy if value is not None]
    row["greedy_vs_grpo_at_equal_tokens"], row["greedy_vs_grpo_at_equal_tokens_se"] = (
        mean_and_se(mine_greedy) if mine_greedy else (None, None)
    )
    row["paired_seeds"], row["seeds_reaching_grpo_final"] = len(paired), len(token_shares)
    row["token_share_per_seed"], row["wall_share_per_seed"] = token_shares, wall_shares
    mine, theirs = mean_curve([run for run, _ in paired]), mean_curve([base for _, base in paired])
    target = theirs[-1]["sampled"]
    tokens, wall = cost_to_reach(mine, "sampled", target), cost_to_reach(mine, "sampled", target, "wall_s")
    row["mean_curve_token_share"] = None if tokens is None else tokens / theirs[-1]["decoded_tokens"]
    row["mean_curve_wall_share"] = None if wall is None else wall / theirs[-1]["wall_s"]


def summarize(runs: list[dict]) -> dict:
    """Per arm over seeds: held-out gains with standard errors, the reward gain, costs, and the comparison with GRPO
    on the same seeds (`_versus_grpo`)."""
    by_arm: dict[str, list[dict]] = {}
    for run in runs:
        by_arm.setdefault(run["arm"], []).append(run)
    grpo = {run["seed"]: run for run in by_arm.get("grpo", [])}
    summary = {}
    for arm, arm_runs in by_arm.items():
        row = {"seeds": len(arm_runs)}
        for key in ("greedy", "sampled"):
            gains = [run["curve"][-1][key] - run["curve"][0][key] for run in arm_runs]
            row[f"{key}_before"] = statistics.mean(run["curve"][0][key] for run in arm_runs)
            row[f"{key}_after"] = statistics.mean(run["curve"][-1][key] for run in arm_runs)
            row[f"{key}_gain"], row[f"{key}_gain_se"] = mean_and_se(gains)
        row["reward_gain"], row["reward_gain_se"] = mean_and_se([quarter_gain(run["rewards"]) for run in arm_runs])
        row["decoded_tokens"] = statistics.mean(sum(run["decoded_tokens"]) for run in arm_runs)
        row["leaf_tokens"] = statistics.mean(sum(run["leaf_tokens"]) for run in arm_runs)
        row["wall_s"] = statistics.mean(run["curve"][-1]["wall_s"] for run in arm_runs)
        steps = [step for run in arm_runs for step in run.get("phases", [])[1:]]  # the first step warms up
        if steps:
            row["phases"] = {phase: statistics.median(step[phase] for step in steps) for phase in steps[0]}
        if arm != "grpo":
            _versus_grpo(row, arm_runs, grpo)
        summary[arm] = row
    return summary


def verdict(summary: dict, arm: str = "treepo") -> dict:
    """The study's headline for `arm` against GRPO: each part of the goal, and whether all of it holds.

    Reaching GRPO's final accuracy only means something when GRPO learned: its mean sampled gain must exceed twice
    its standard error over seeds (`grpo_learns`), or the comparison is void.
    """
    row, grpo = summary.get(arm, {}), summary.get("grpo", {})
    token_share, wall_share = row.get("mean_curve_token_share"), row.get("mean_curve_wall_share")
    grpo_gain, grpo_se = grpo.get("sampled_gain"), grpo.get("sampled_gain_se")
    parts = {
        "grpo_learns": grpo_gain is not None and grpo_se == grpo_se and grpo_gain > 2 * grpo_se,
        "paired_seeds": row.get("paired_seeds", 0),
        "token_share": token_share,
        "wall_share": wall_share,
        "greedy_gain": row.get("greedy_gain"),
        "reaches_grpo_final": token_share is not None,
        "tokens_within_goal": token_share is not None and token_share <= TOKEN_SHARE_GOAL,
        "wall_within_goal": wall_share is not None and wall_share <= WALL_SHARE_GOAL,
        "greedy_holds": row.get("greedy_gain") is not None and row["greedy_gain"] >= -GREEDY_TOLERANCE,
    }
    parts["met"] = parts["paired_seeds"] >= 5 and all(
        parts[key] for key in ("grpo_learns", "tokens_within_goal", "wall_within_goal", "greedy_holds")
    )
    return parts


def _gain(value: float, se: float, form: str = ".1%") -> str:
    """A mean gain with its standard error over seeds, or a single seed's gain said as such."""
    return f"{value:+{form}} ± {se:{form}}" if se == se else f"{value:+{form}}, one seed"


def _share(value) -> str:
    return "not reached" if value is None else f"{value:.2f}"


def summary_table(summary: dict) -> str:
    lines = [
        "| arm | seeds | sampled accuracy, before → after (gain ± SE) | greedy accuracy, before → after (gain ± SE) "
        "| training reward gain ± SE | decoded tokens | wall time (s) | sampled − GRPO's at equal decoded tokens "
        "| to reach GRPO's final sampled accuracy (mean curves): decoded tokens ÷ GRPO's, wall time ÷ GRPO's "
        "| seeds reaching it |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, row in summary.items():
        versus = reach = seeds = "—"
        if row.get("sampled_vs_grpo_at_equal_tokens") is not None:
            versus = _gain(row["sampled_vs_grpo_at_equal_tokens"], row["sampled_vs_grpo_at_equal_tokens_se"])
        if "paired_seeds" in row:
            reach = f"{_share(row['mean_curve_token_share'])}, {_share(row['mean_curve_wall_share'])}"
            seeds = f"{row['seeds_reaching_grpo_final']}/{row['paired_seeds']}"
        lines.append(
            f"| {ARM_LABELS.get(arm, arm)} | {row['seeds']} | {row['sampled_before']:.1%} → {row['sampled_after']:.1%} "
            f"({_gain(row['sampled_gain'], row['sampled_gain_se'])}) | {row['greedy_before']:.1%} → "
            f"{row['greedy_after']:.1%} ({_gain(row['greedy_gain'], row['greedy_gain_se'])}) | "
            f"{_gain(row['reward_gain'], row['reward_gain_se'], '.3f')} | {row['decoded_tokens']:,.0f} | "
            f"{row['wall_s']:,.0f} | {versus} | {reach} | {seeds} |"
        )
    return "\n".join(lines)


def phase_table(summary: dict) -> str:
    """Median seconds per training step, by phase (`benchmark.training.PHASES`), one column per arm."""
    arms = [arm for arm, row in summary.items() if "phases" in row]
    if not arms:
        return ""
    phases = list(summary[arms[0]]["phases"])
    lines = ["| phase (s per step) | " + " | ".join(ARM_LABELS.get(arm, arm) for arm in arms) + " |",
             "|---|" + "---|" * len(arms)]  # fmt: skip
    for phase in phases:
        lines.append(f"| {phase} | " + " | ".join(f"{summary[arm]['phases'][phase]:.2f}" for arm in arms) + " |")
    return "\n".join(lines)


def plot_curves(runs: list[dict], x_key: str, x_label: str, path, arms) -> None:
    """Held-out accuracy (sampled and greedy) of every run against `x_key`, one line per seed, the mean curve bold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    palette = ("tab:green", "tab:blue", "tab:orange", "tab:purple", "tab:red", "tab:brown", "tab:pink", "tab:gray")
    scale = 1000 if x_key == "decoded_tokens" else 60
    for axis, key in zip(axes, ("sampled", "greedy")):
        for color, arm in zip(palette, arms):
            arm_runs = [run for run in runs if run["arm"] == arm]
            if not arm_runs:
                continue
            for run in arm_runs:
                axis.plot([p[x_key] / scale for p in run["curve"]], [p[key] for p in run["curve"]], color=color,
                          alpha=0.25, linewidth=0.8)  # fmt: skip
            mean = mean_curve(arm_runs)
            axis.plot([p[x_key] / scale for p in mean], [p[key] for p in mean], color=color, marker=".", linewidth=2,
                      label=f"{ARM_LABELS.get(arm, arm)} (mean of {len(arm_runs)})")  # fmt: skip
        axis.set_xlabel(x_label)
        axis.set_ylabel(f"held-out accuracy, {key}")
        axis.set_title(f"{key} (temperature 1)" if key == "sampled" else "greedy", fontsize=10)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    figure.suptitle("Same warm model, seeds and prompts per seed; thin lines: seeds, bold: their mean", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def suite_table(name: str, suite, summaries: dict) -> str:
    """One row per setting and arm: the arm against GRPO on the same seeds under the suite's budget, at equal
    decoded tokens and at equal wall time (each on every seed's own curves, mean ± SE over seeds), the cost to reach
    GRPO's final sampled accuracy on the mean curves, and, for TreePO, the study's verdict."""
    lines = [
        f"Suite `{name}` (fixed {suite.fixed}): settings {', '.join(suite.settings)}; budget: GRPO's "
        f"{suite.budget.replace('_', ' ')} on each seed.",
        "",
        "| setting | arm | paired seeds | GRPO sampled gain ± SE | arm sampled gain ± SE | sampled − GRPO's at equal "
        "decoded tokens | at equal wall time | greedy − GRPO's at equal decoded tokens | to reach GRPO's final "
        "(mean curves): tokens ÷ GRPO's, wall ÷ GRPO's | seeds reaching it | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for setting, summary in summaries.items():
        grpo = summary.get("grpo")
        # The suite's arm order, whatever order the runs were read in; arms outside the suite follow.
        ordered = sorted(summary, key=lambda arm: suite.arms.index(arm) if arm in suite.arms else len(suite.arms))
        for arm in ordered:
            row = summary[arm]
            if arm == "grpo" or "paired_seeds" not in row:
                continue
            cells = [_gain(row[key], row[f"{key}_se"]) if row.get(key) is not None else "—" for key in
                     ("sampled_vs_grpo_at_equal_tokens", "sampled_vs_grpo_at_equal_wall",
                      "greedy_vs_grpo_at_equal_tokens")]  # fmt: skip
            headline = verdict(summary, arm)
            said = ("met" if headline["met"] else "not met") if headline["grpo_learns"] else "void: GRPO did not learn"
            lines.append(
                f"| {setting} | {ARM_LABELS.get(arm, arm)} | {row['paired_seeds']} | "
                f"{_gain(grpo['sampled_gain'], grpo['sampled_gain_se']) if grpo else '—'} | "
                f"{_gain(row['sampled_gain'], row['sampled_gain_se'])} | {' | '.join(cells)} | "
                f"{_share(row['mean_curve_token_share'])}, {_share(row['mean_curve_wall_share'])} | "
                f"{row['seeds_reaching_grpo_final']}/{row['paired_seeds']} | {said} |"
            )
    return "\n".join(lines)
