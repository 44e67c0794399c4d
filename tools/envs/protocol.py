"""The JSON-lines environment protocol (docs/agent-protocol.md), shared by the bridges.

A bridge subclasses `Bridge` and implements the ops; `serve()` reads one request per line from
stdin and writes exactly one answer per line to the *original* stdout, flushed. Everything else
that would reach stdout (library prints, warnings, child processes inheriting fd 1) is sent to
stderr instead: at start-up fd 1 is duplicated for the protocol and then pointed at stderr.
"""

import json
import os
import sys
import traceback


class ProtocolError(Exception):
    """A request the bridge cannot serve; answered as {"error": msg}, the bridge stays up."""


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def _protocol_stream():
    """Keep the real stdout for protocol lines only; send every other write to fd 1 to stderr."""
    sys.stdout.flush()
    proto_fd = os.dup(1)
    os.dup2(2, 1)  # fd 1 (inherited by the JVMs and any C code) now goes to stderr
    sys.stdout = sys.stderr  # Python-level print() too
    return os.fdopen(proto_fd, "w", encoding="utf-8", buffering=1, newline="\n")


def as_int(req, key):
    v = req.get(key)
    if isinstance(v, bool) or not isinstance(v, int):
        if isinstance(v, str) and v.strip().lstrip("-").isdigit():
            return int(v)
        raise ProtocolError(f"'{key}' must be an integer, got {v!r}")
    return v


def as_str(req, key, default=None):
    v = req.get(key, default)
    if not isinstance(v, str):
        raise ProtocolError(f"'{key}' must be a string, got {v!r}")
    return v


def clamp01(x):
    return 0.0 if x < 0 else 1.0 if x > 1 else float(x)


def dedup_sorted(actions):
    """The valid-action list in a deterministic order: unique strings, sorted."""
    return sorted({str(a) for a in actions})


class Bridge:
    name = "bridge"
    splits = ["train", "dev", "test"]

    def tasks(self):
        raise NotImplementedError

    def variations(self, task, split):
        raise NotImplementedError

    def reset(self, task, variation, split):
        raise NotImplementedError

    # A bridge keeps its current episode in `self.episode` (a dict with at least "done" and
    # "steps") and implements these three; `step` and `gold` below do the protocol's checks.
    episode = None

    def library_step(self, action):
        """One action in the library: (observation, info, done)."""
        raise NotImplementedError

    def library_gold(self):
        """The library's gold action sequence for the loaded episode."""
        raise NotImplementedError

    def _state(self, observation, info, done):
        """The protocol's state answer after a reset or a step."""
        raise NotImplementedError

    def step(self, action):
        ep = self.episode
        if ep is None:
            raise ProtocolError("step before reset")
        if ep["done"]:
            raise ProtocolError("the episode is over; reset first")
        observation, info, done = self.library_step(action)
        ep["steps"] += 1
        return self._state(observation, info, done=done)

    def gold(self):
        if self.episode is None:
            raise ProtocolError("gold before reset")
        actions = self.library_gold()
        if not actions or str(actions[0]).startswith("ERROR"):
            raise ProtocolError(f"no gold path for this episode: {list(actions[:1])}")
        return [str(a) for a in actions]

    def close(self):
        pass

    # -- request dispatch -------------------------------------------------------------------
    def check_split(self, split):
        if split not in self.splits:
            raise ProtocolError(f"unknown split {split!r}; expected one of {self.splits}")

    def check_task(self, task):
        if task not in self.tasks():
            raise ProtocolError(f"unknown task {task!r}; send {{\"op\": \"info\"}} for the list")

    def handle(self, req):
        op = req.get("op")
        if op == "info":
            return {"name": self.name, "tasks": list(self.tasks()), "splits": list(self.splits)}
        if op == "variations":
            task, split = as_str(req, "task"), as_str(req, "split")
            self.check_task(task)
            self.check_split(split)
            return {"variations": [int(v) for v in self.variations(task, split)]}
        if op == "reset":
            task = as_str(req, "task")
            self.check_task(task)
            variation = as_int(req, "variation")
            split = req.get("split")
            if split is not None:
                split = as_str(req, "split")
                self.check_split(split)
            return self.reset(task, variation, split)
        if op == "step":
            return self.step(as_str(req, "action"))
        if op == "gold":
            return {"actions": list(self.gold())}
        if op == "close":
            return {"ok": True}
        raise ProtocolError(f"unknown op {op!r}; expected info, variations, reset, step, gold, close")

    def find_split(self, task, variation, split):
        """Check that `variation` belongs to `split` of `task`; infer the split when none is given."""
        if split is not None:
            if variation not in set(self.variations(task, split)):
                raise ProtocolError(f"variation {variation} is not in the {split} split of {task!r}")
            return split
        for s in self.splits:
            if variation in set(self.variations(task, s)):
                return s
        raise ProtocolError(f"variation {variation} is in no split of {task!r}")


def serve(bridge_factory):
    """Run the protocol loop until `close` or end of input. `bridge_factory` builds the bridge
    after stdout has been protected, so library start-up output cannot reach the protocol."""
    out = _protocol_stream()

    def answer(obj):
        out.write(json.dumps(obj, ensure_ascii=False, allow_nan=False) + "\n")
        out.flush()

    bridge = bridge_factory()
    try:
        stdin = sys.stdin.buffer
        while True:
            raw = stdin.readline()
            if not raw:
                break  # end of input: the parent went away
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                answer({"error": f"request is not UTF-8: {e}"})
                continue
            try:
                req = json.loads(line)
            except ValueError as e:
                answer({"error": f"malformed JSON request: {e}"})
                continue
            if not isinstance(req, dict):
                answer({"error": "a request must be a JSON object with an 'op'"})
                continue
            try:
                resp = bridge.handle(req)
            except ProtocolError as e:
                resp = {"error": str(e)}
            except Exception as e:  # a library or simulator failure: report it, keep serving
                traceback.print_exc(file=sys.stderr)
                lines = [l.strip() for l in str(e).strip().splitlines() if l.strip()]
                # Java exceptions arrive with their stack trace: keep the message, not the frames
                msg = " ".join(l for l in lines[:3] if not l.startswith("at "))
                resp = {"error": f"{type(e).__name__}: {msg[:1000]}"}
            try:
                answer(resp)
            except (TypeError, ValueError) as e:
                answer({"error": f"answer could not be encoded: {e}"})
            if req.get("op") == "close" and "error" not in resp:
                break
    except BrokenPipeError:
        pass
    finally:
        try:
            bridge.close()
        except Exception:
            traceback.print_exc(file=sys.stderr)
