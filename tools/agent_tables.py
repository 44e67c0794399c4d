#!/usr/bin/env python3
"""Markdown tables of a `tools/agent_results.sh` run: the dev sweep and the per-episode test
actions, from the `agent eval --json` files in one folder (standard library only).

    python3 tools/agent_tables.py /tmp/agent twx    # or sw
"""
import glob
import json
import os
import sys


def summary(results):
    n = len(results)
    s = sum(r["success"] for r in results)
    score = sum(r["score"] for r in results) / max(n, 1)
    steps = sum(r["steps"] for r in results) / max(n, 1)
    return n, s, score, steps


def dev_table(folder, name):
    print(f"| setting | environment | episodes | success | mean score | mean steps |")
    print("|---|---|---|---|---|---|")
    files = sorted(glob.glob(os.path.join(folder, f"{name}_dev_*.json")), key=os.path.getmtime)
    for path in files:
        report = json.load(open(path))
        label = os.path.basename(path)[len(name) + 5:-5]
        setting, _, env = label.rpartition("_")
        by_task = {}
        for r in report["results"]:
            by_task.setdefault(r["task"], []).append(r)
        n, s, score, steps = summary(report["results"])
        per_task = ", ".join(f"{t} {summary(rs)[2]:.3f}" for t, rs in by_task.items()) if len(by_task) > 1 else ""
        print(f"| {setting} | {env} | {n} | {s}/{n} | {score:.3f}{' (' + per_task + ')' if per_task else ''} | {steps:.1f} |")


def test_actions(folder, name):
    for path in sorted(glob.glob(os.path.join(folder, f"{name}_test_four_*.json"))):
        report = json.load(open(path))
        print(f"\n{os.path.basename(path)}: complete={report.get('complete')}, refused={len(report.get('refused', []))}")
        print("| task | variation | condition | end | score | actions |")
        print("|---|---|---|---|---|---|")
        for r in report["results"]:
            actions = "; ".join(r["actions"])
            if len(actions) > 160:
                actions = actions[:157] + "..."
            print(f"| {r['task']} | {r['variation']} | {r['condition']} | {r['end']} | {r['score']:.3f} | {actions} |")


if __name__ == "__main__":
    folder, name = sys.argv[1], sys.argv[2]
    dev_table(folder, name)
    if "--actions" in sys.argv:
        test_actions(folder, name)
