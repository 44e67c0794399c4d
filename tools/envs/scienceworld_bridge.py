#!/usr/bin/env python3
"""ScienceWorld over the engram environment protocol (docs/agent-protocol.md).

    .venv-envs/bin/python tools/envs/scienceworld_bridge.py [--simplification easy]
        [--max-steps N] [--reuse-jvm]

tasks       the 30 ScienceWorld task names (e.g. "boil", "melt", "find-living-thing")
variations  the library's own train/dev/test variation lists for the task
reset       loads (task, variation) with the simplification string (default "easy") and the gold
            path, then the library's reset ("look around" is the first observation)
state       instruction = task description, kind = task name, valid_actions = the library's valid
            action-object combinations (deduplicated, sorted), score = max(0, raw)/100 (raw is
            ScienceWorld's 0..100 score, -100 on task failure; kept in info.raw_score),
            done = completed or failed (or --max-steps reached), success = done with raw 100
gold        the library's gold action sequence for the loaded variation (it may run past the
            step that completes the task: stop at done)

Reproducibility: the simulator seeds its world from the variation, but object listing order,
some object choices and the gold path depend on what the JVM did before. By default every
episode runs in a fresh JVM that has done exactly the same warm-up (load boil/0/easy), so an
episode depends only on (task, variation, simplification) however many episodes ran before it;
the next JVM is prepared in the background during the episode. --reuse-jvm keeps one JVM (faster
resets, but episodes then depend on the history of the process).
"""

import argparse
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from protocol import Bridge, ProtocolError, clamp01, dedup_sorted, log, serve  # noqa: E402

NO_LIMIT = 10**9
WARMUP = ("boil", 0, "easy")


def _new_env(warm):
    from scienceworld import ScienceWorldEnv

    t = time.time()
    env = ScienceWorldEnv("", envStepLimit=NO_LIMIT)  # the bridge applies --max-steps itself
    if warm:
        _load_and_look(env, *WARMUP)
    log(f"[scienceworld] JVM ready in {time.time() - t:.1f}s (warm-up: {warm})")
    return env


def _load_and_look(env, task, variation, simplification):
    """Build the world once and take the first look. (The library's reset() would build it a
    second time: load() then reset() -> server.reset() -> load again; same world, twice the cost.)"""
    env.load(task, variation, simplification, generateGoldPath=True)
    env.lastStepScore = 0
    obs, _reward, _done, info = env.step("look around")
    return obs, info


def _close_env(env):
    if env is not None:
        try:
            env.close()
        except Exception as e:  # the JVM may already be gone
            log(f"[scienceworld] close: {e}")


class _Spare:
    """A JVM being prepared in a background thread."""

    def __init__(self):
        self.env, self.err = None, None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            self.env = _new_env(warm=True)
        except Exception as e:
            self.err = e

    def take(self):
        self.thread.join()
        if self.err is not None:
            raise self.err
        env, self.env = self.env, None
        return env

    def discard(self):
        # A JVM still starting is not waited for: it exits with this process (die_on_exit).
        if not self.thread.is_alive():
            _close_env(self.env)
            self.env = None


class ScienceWorldBridge(Bridge):
    name = "scienceworld"

    def __init__(self, simplification="easy", max_steps=None, reuse_jvm=False):
        from scienceworld.constants import ID2TASK

        self.simplification = simplification
        self.max_steps = max_steps
        self.reuse_jvm = reuse_jvm
        self._tasks = list(ID2TASK.values())  # the library's task table; no JVM needed
        self._splits = {}  # task -> {split: [variations]}
        self.meta = None  # JVM used only to answer `variations` (loading a task replaces the world)
        self.env = None  # the JVM of the current episode
        self.spare = None if reuse_jvm else _Spare()
        self.episode = None

    def tasks(self):
        return self._tasks

    @staticmethod
    def _sets(env):
        """The library's split lists for the task loaded in `env` (they read the loaded task's
        name only: the world is left as it is)."""
        return {"train": env.get_variations_train(), "dev": env.get_variations_dev(),
                "test": env.get_variations_test()}

    def variations(self, task, split):
        if task not in self._splits:
            if self.meta is None:
                self.meta = _new_env(warm=False)
            self.meta.load(task, 0, "", generateGoldPath=False)
            self._splits[task] = self._sets(self.meta)
        return self._splits[task][split]

    def _fresh_env(self):
        if self.reuse_jvm:
            if self.env is None:
                self.env = _new_env(warm=False)
            return self.env
        spare, self.spare = self.spare, None  # a new one is started when this reset ends
        env = spare.take()
        _close_env(self.env)
        self.env = None
        return env

    def reset(self, task, variation, split):
        known = task in self._splits
        if known:
            split = self.find_split(task, variation, split)
        if self.meta is not None:  # variations are asked before episodes: free its memory
            _close_env(self.meta)
            self.meta = None
        self.episode = None
        if variation < 0:
            raise ProtocolError(f"variation {variation} is negative")
        t0 = time.time()
        try:
            env = self._fresh_env()
            self.env = env
            t1 = time.time()
            try:
                obs, info = _load_and_look(env, task, variation, self.simplification)
            except Exception as e:
                if known:
                    raise
                first = (str(e).strip().splitlines() or [""])[:2]
                raise ProtocolError(f"cannot load {task!r} variation {variation} (out of range?): "
                                    + " ".join(l.strip() for l in first))
            if not known:  # no meta JVM just to check the split: ask the episode's own JVM
                self._splits[task] = self._sets(env)
                split = self.find_split(task, variation, split)
            log(f"[scienceworld] reset {task}/{variation}: waited {t1 - t0:.1f}s for a JVM, "
                f"load {time.time() - t1:.1f}s")
        finally:
            if not self.reuse_jvm and self.spare is None:
                self.spare = _Spare()  # the next episode's JVM, prepared while this one runs
        self.episode = {"task": task, "variation": variation, "split": split, "steps": 0,
                        "done": False, "instruction": env.get_task_description()}
        return self._state(obs, info, done=False)

    def _state(self, obs, info, done):
        ep = self.episode
        raw = int(info["score"])
        truncated = False
        if not done and self.max_steps is not None and ep["steps"] >= self.max_steps:
            done, truncated = True, True
        ep["done"] = done
        return {
            "instruction": ep["instruction"],
            "kind": ep["task"],
            "observation": obs,
            "valid_actions": dedup_sorted(info["valid"]),
            "score": clamp01(raw / 100.0),
            "done": bool(done),
            "success": bool(done and raw >= 100 and not truncated),
            "info": {
                "raw_score": raw,
                "moves": int(info["moves"]),
                "steps": ep["steps"],
                "variation": ep["variation"],
                "split": ep["split"],
                "simplification": self.simplification,
                "failed": raw < 0,
                "truncated": truncated,
            },
        }

    def library_step(self, action):
        obs, _reward, done, info = self.env.step(action)
        return obs, info, done

    def library_gold(self):
        return self.env.get_gold_action_sequence()

    def close(self):
        if self.spare is not None:
            self.spare.discard()
        _close_env(self.env)
        _close_env(self.meta)
        self.env = self.meta = self.spare = None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--simplification", default="easy",
                    help='ScienceWorld simplification string: "easy" (default; teleport, open doors '
                         'and containers, self-watering pots, no electrical actions), "" for none, or a '
                         'comma list of teleportAction,selfWateringFlowerPots,openContainers,openDoors,'
                         'noElectricalAction')
    ap.add_argument("--max-steps", type=int, default=None,
                    help="end an episode (done, not success, info.truncated) after this many steps; "
                         "default: no cap")
    ap.add_argument("--reuse-jvm", action="store_true",
                    help="one JVM for all episodes: faster resets, but episodes depend on the process history")
    args = ap.parse_args()
    serve(lambda: ScienceWorldBridge(args.simplification, args.max_steps, args.reuse_jvm))


if __name__ == "__main__":
    main()
