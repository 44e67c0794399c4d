#!/usr/bin/env python3
"""Drive an environment bridge over the protocol and check it (docs/agent-protocol.md).

    python tools/envs/check_protocol.py [--tasks boil,melt] [--split dev] [--random-steps 5] \\
        -- .venv-envs/bin/python tools/envs/scienceworld_bridge.py

For each task: `variations` on every split, `reset` on the first variation of --split, the gold
actions step by step (stopping at done), which must end with success and score 1.0; then a reset
of another variation and a few random valid actions; a reset of the first variation again, whose
observation and valid actions must equal the first one (reproducibility; a different gold path is
reported as a note); errors for garbage,
an unknown op, an unknown task, a step before any reset; `close`. Prints a summary with latencies.
Exit status 0 only when every check passed. Uses only the standard library.
"""

import argparse
import json
import random
import statistics
import subprocess
import sys
import threading
import time

STATE_KEYS = {"instruction": str, "kind": str, "observation": str, "valid_actions": list,
              "score": (int, float), "done": bool, "success": bool, "info": dict}


class Child:
    def __init__(self, cmd, timeout):
        self.timeout = timeout
        self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=sys.stderr,
                                  text=True, encoding="utf-8", bufsize=1)

    def call(self, req, raw=None):
        line = raw if raw is not None else json.dumps(req)
        t = time.time()
        self.p.stdin.write(line + "\n")
        self.p.stdin.flush()
        box = []
        th = threading.Thread(target=lambda: box.append(self.p.stdout.readline()), daemon=True)
        th.start()
        th.join(self.timeout)
        dt = time.time() - t
        if not box:
            raise AssertionError(f"no answer within {self.timeout}s to {line[:200]}")
        out = box[0]
        if not out:
            raise AssertionError(f"bridge exited (rc={self.p.poll()}) on {line[:200]}")
        try:
            obj = json.loads(out)
        except ValueError:
            raise AssertionError(f"answer is not JSON: {out[:300]!r}")
        if not isinstance(obj, dict):
            raise AssertionError(f"answer is not an object: {out[:300]!r}")
        return obj, dt


def check_state(s, what):
    assert "error" not in s, f"{what}: error {s['error']}"
    for k, ty in STATE_KEYS.items():
        assert k in s, f"{what}: state lacks {k!r}"
        assert isinstance(s[k], ty), f"{what}: {k} has type {type(s[k]).__name__}"
    assert 0.0 <= s["score"] <= 1.0, f"{what}: score {s['score']} outside [0,1]"
    assert all(isinstance(a, str) for a in s["valid_actions"]), f"{what}: non-string action"
    assert len(set(s["valid_actions"])) == len(s["valid_actions"]), f"{what}: duplicate valid actions"
    assert s["valid_actions"] == sorted(s["valid_actions"]), f"{what}: valid actions not sorted"
    assert not s["success"] or s["done"], f"{what}: success without done"


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def ms(xs):
    if not xs:
        return "-"
    return f"mean {1000 * statistics.mean(xs):.0f} ms, p90 {1000 * pct(xs, 0.9):.0f} ms, max {1000 * max(xs):.0f} ms"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default=None, help="comma list (default: the first two tasks from info)")
    ap.add_argument("--split", default="dev", help="split of the episodes played (default dev)")
    ap.add_argument("--random-steps", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=180.0, help="seconds allowed per call")
    ap.add_argument("cmd", nargs=argparse.REMAINDER, help="-- bridge command")
    args = ap.parse_args()
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        ap.error("give the bridge command after --")
    rng = random.Random(args.seed)
    failures = []
    notes = []
    t_start = time.time()
    child = Child(cmd, args.timeout)
    resets, steps, valid_sizes = [], [], []

    def expect_error(req, raw=None, what=""):
        r, _ = child.call(req, raw)
        ok = set(r) == {"error"} and isinstance(r["error"], str)
        print(f"  error check {what:28s} {'ok' if ok else 'FAILED'}: {str(r)[:110]}")
        if not ok:
            failures.append(f"{what}: expected an error, got {str(r)[:200]}")

    try:
        info, dt = child.call({"op": "info"})
        assert "error" not in info, info
        print(f"info ({dt:.2f}s): name={info['name']} tasks={len(info['tasks'])} splits={info['splits']}")
        # The errors first: a step and a gold before any reset.
        expect_error({"op": "step", "action": "look around"}, what="step before reset")
        expect_error({"op": "gold"}, what="gold before reset")
        tasks = args.tasks.split(",") if args.tasks else info["tasks"][:2]
        for task in tasks:
            print(f"task {task}")
            try:
                sizes = {}
                var = {}
                for split in info["splits"]:
                    r, dt = child.call({"op": "variations", "task": task, "split": split})
                    assert "error" not in r, r
                    var[split] = r["variations"]
                    sizes[split] = len(r["variations"])
                print(f"  variations {sizes} (e.g. {args.split}: {var[args.split][:3]}...)")
                for a in info["splits"]:
                    for b in info["splits"]:
                        if a < b:
                            assert not set(var[a]) & set(var[b]), f"splits {a} and {b} overlap"
                v0 = var[args.split][0]
                s, dt = child.call({"op": "reset", "task": task, "variation": v0, "split": args.split})
                check_state(s, "reset")
                resets.append(dt)
                first = s
                assert s["kind"] == task, f"kind {s['kind']!r}"
                g, _ = child.call({"op": "gold"})
                assert "error" not in g, g
                gold = g["actions"]
                ep_sizes = [len(s["valid_actions"])]
                in_valid = 0
                used = 0
                for a in gold:
                    in_valid += a in s["valid_actions"]
                    s, dt = child.call({"op": "step", "action": a})
                    check_state(s, f"step {a!r}")
                    steps.append(dt)
                    used += 1
                    ep_sizes.append(len(s["valid_actions"]))
                    if s["done"]:
                        break
                valid_sizes += ep_sizes
                ok = s["done"] and s["success"] and s["score"] == 1.0
                print(f"  gold v{v0}: reset {resets[-1]:.2f}s, {used}/{len(gold)} gold actions to done={s['done']} "
                      f"success={s['success']} score={s['score']} info={json.dumps(s['info'])[:160]}")
                print(f"  valid actions per state: min {min(ep_sizes)} median {int(statistics.median(ep_sizes))} "
                      f"max {max(ep_sizes)}; gold actions literally in the valid list: {in_valid}/{used}")
                if not ok:
                    failures.append(f"{task} v{v0}: gold path ended done={s['done']} success={s['success']} score={s['score']}")
                # Stepping after the episode ended is refused.
                if s["done"]:
                    expect_error({"op": "step", "action": gold[0]}, what="step after done")
                # Random valid actions on another variation.
                v1 = var[args.split][1 % len(var[args.split])]
                s, dt = child.call({"op": "reset", "task": task, "variation": v1, "split": args.split})
                check_state(s, "reset 2")
                resets.append(dt)
                taken = []
                for _ in range(args.random_steps):
                    if s["done"]:
                        break
                    a = rng.choice(s["valid_actions"])
                    taken.append(a)
                    s, dt = child.call({"op": "step", "action": a})
                    check_state(s, f"random step {a!r}")
                    steps.append(dt)
                    valid_sizes.append(len(s["valid_actions"]))
                print(f"  random v{v1}: {len(taken)} steps, score {s['score']} done {s['done']}: {taken}")
                # Reproducibility: the first episode again.
                s, dt = child.call({"op": "reset", "task": task, "variation": v0, "split": args.split})
                check_state(s, "reset 3")
                resets.append(dt)
                g2, _ = child.call({"op": "gold"})
                same = s["observation"] == first["observation"] and s["valid_actions"] == first["valid_actions"]
                same_gold = g2.get("actions") == gold
                print(f"  reset v{v0} again: same observation and valid actions: {same}; same gold: {same_gold}")
                if not same:
                    failures.append(f"{task} v{v0}: a second reset differs from the first")
                if not same_gold:  # the world is what must repeat; some libraries' experts are random walks
                    notes.append(f"{task} v{v0}: the gold path differs between two resets "
                                 f"({len(gold)} vs {len(g2.get('actions') or [])} actions)")
            except AssertionError as e:
                print(f"  FAILED: {e}")
                failures.append(f"{task}: {e}")
                if child.p.poll() is not None:
                    raise
        expect_error(None, raw="this is not json {", what="garbage line")
        expect_error(None, raw="[1, 2]", what="JSON that is not an object")
        expect_error({"op": "frobnicate"}, what="unknown op")
        expect_error({"op": "reset", "task": "no-such-task", "variation": 0, "split": "train"}, what="unknown task")
        expect_error({"op": "variations", "task": tasks[0], "split": "nope"}, what="unknown split")
        r, _ = child.call({"op": "info"})
        print(f"  still serving after errors: {'error' not in r}")
        if "error" in r:
            failures.append("bridge not usable after errors")
        r, _ = child.call({"op": "close"})
        if r != {"ok": True}:
            failures.append(f"close answered {r}")
        try:
            rc = child.p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            rc = None
            child.p.kill()
        print(f"close: {r}, exit status {rc}")
        if rc != 0:
            failures.append(f"bridge exit status {rc} after close")
    except AssertionError as e:
        failures.append(str(e))
        print(f"FAILED: {e}")
        if child.p.poll() is None:
            child.p.kill()

    print("summary:")
    print(f"  reset latency: {ms(resets)} over {len(resets)} resets")
    print(f"  step latency:  {ms(steps)} over {len(steps)} steps")
    if valid_sizes:
        print(f"  valid actions per state: min {min(valid_sizes)}, median {int(statistics.median(valid_sizes))}, "
              f"p90 {pct(valid_sizes, 0.9)}, max {max(valid_sizes)} over {len(valid_sizes)} states")
    print(f"  total {time.time() - t_start:.1f}s; {'ALL CHECKS PASSED' if not failures else 'FAILURES:'}")
    for f in failures:
        print(f"    - {f}")
    for n in notes:
        print(f"  note: {n}")
    sys.exit(0 if not failures else 1)


if __name__ == "__main__":
    main()
