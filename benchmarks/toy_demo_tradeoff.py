"""Plot every recorded demo measurement as (fd_real excess over the 4-step teacher, paired attr_acc gain over it).

Why: issue #13 item 3 asks for a student that beats the 4-step teacher on BOTH axes -- fd_real lower and a
paired attr_acc interval above zero -- i.e. a point in the upper-left quadrant.  Tables of screens hide
that every variant measured so far moves along one line through the quadrant's edge; one picture shows it.

Screens (``benchmarks/toy_demo_screen.py`` records, one JSON line per score) are all judged on the demo's
seed-0 evaluation set, whose 4-step CFG-3 teacher has fd_real ``--screen-teacher-fd`` (240.3; printed by
every screen); full demos (``metrics.json``) carry their own teacher baseline.  Only raw weights are plotted.

    .venv/bin/python benchmarks/toy_demo_tradeoff.py --out docs/images/toy_demo_tradeoff.png \\
        --screens docs/results/demo_screens_session6.jsonl docs/results/demo_screens_session7.jsonl \\
        --demos docs/results/demo_session6_*_metrics.json

``--demos "stage-3 teacher=docs/results/demo_session8_s0_metrics.json" ...`` plots a group under its own marker.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

GROUPS = [  # (label, regex on the screen's name); first match wins
    ("recipe (CFG 3)", r"^recipe"),
    ("real-score CFG 1 / 1.5", r"^(cfg1|dmdcfg)"),
    ("guidance interval (CFG 3 inside)", r"^iv"),
    ("VFM discriminator, unweighted", r"^vfm_now"),  # (vfm_warm150: G does not see D before 150)
    ("DMD2 GAN head", r"^gan"),
    ("Euler backward simulation", r"^simeuler"),
]


def screen_points(paths: list[Path], iteration: int, teacher_fd: float) -> dict[str, list[tuple]]:
    points: dict[str, list[tuple]] = {}
    for path in paths:
        for line in path.read_text().splitlines():
            r = json.loads(line)
            if r["weights"] != "raw" or r["it"] != iteration:
                continue
            label = next((g for g, pat in GROUPS if re.search(pat, r["name"])), None)
            if label is None:
                continue
            points.setdefault(f"{label}, {r['sampler']}", []).append(
                (r["fd_real"] - teacher_fd, r["gain"], *r["ci95"]))
    return points


def demo_points(paths: list[Path]) -> list[tuple]:
    out = []
    for path in paths:
        m = json.loads(path.read_text())
        g = m["student_vs_teacher_4step"]["attr_acc"]
        out.append((m["student"]["fd_real"] - m["teacher_4step"]["fd_real"], g["gain"], *g["ci95"]))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--screens", nargs="*", default=[], type=Path)
    p.add_argument("--demos", nargs="*", default=[], metavar="[LABEL=]METRICS_JSON",
                   help="full demos' metrics.json; a LABEL= prefix groups them under their own marker")
    p.add_argument("--iteration", type=int, default=100, help="which screen evaluations to plot")
    p.add_argument("--screen-teacher-fd", type=float, default=240.3)
    args = p.parse_args()
    demos: dict[str, list[Path]] = {}
    for item in args.demos:
        label, _, path = item.rpartition("=")
        demos.setdefault(label or "full demo, 400 it.", []).append(Path(path))
    missing = [str(f) for f in [*args.screens, *(q for v in demos.values() for q in v)] if not f.is_file()]
    if missing:
        raise SystemExit(f"no such record: {missing[0]}")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5.5))
    ax.axhline(0, color="0.5", lw=0.8)
    ax.axvline(0, color="0.5", lw=0.8)
    colours = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 3)
    seen: dict[str, str] = {}
    for name, pts in sorted(screen_points(args.screens, args.iteration, args.screen_teacher_fd).items()):
        group, sampler = name.rsplit(", ", 1)
        if group not in seen:
            seen[group] = next(colours)
        colour = seen[group]
        xs, ys = [q[0] for q in pts], [q[1] for q in pts]
        ax.scatter(xs, ys, color=colour, marker="o" if sampler == "stochastic" else "x", s=28,
                   label=f"{group} ({sampler} sampler)")
    for (label, paths), (fmt, colour) in zip(demos.items(), [("s", "k"), ("D", "tab:red"), ("^", "tab:purple")] * 3):
        pts = demo_points(paths)
        ax.errorbar([q[0] for q in pts], [q[1] for q in pts],
                    yerr=[[q[1] - q[2] for q in pts], [q[3] - q[1] for q in pts]],
                    fmt=fmt, color=colour, ms=5, capsize=2, label=f"{label} (95% interval)")
    ax.set_xlabel("student fd_real - 4-step teacher's fd_real (lower is better)")
    ax.set_ylabel("paired attr_acc gain over the 4-step teacher")
    ax.set_title(f"demo screens at {args.iteration} iterations (raw weights) and full demos; "
                 "target: shaded half, interval above 0", fontsize=9)
    low, high = ax.get_xlim()
    ax.set_xlim(min(-30.0, low), high)
    ax.axvspan(min(-30.0, low), 0, color="0.93", zorder=0)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
