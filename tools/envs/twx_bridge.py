#!/usr/bin/env python3
"""TextWorldExpress over the engram environment protocol (docs/agent-protocol.md).

    .venv-envs/bin/python tools/envs/twx_bridge.py [--game GAME] [--params small|library]
        [--game-params GAME=k=v,k=v ...] [--max-steps N]

tasks       the library's games (cookingworld, twc, coin, mapreader, arithmetic, sorting,
            simonsays, peckingorder), or only GAME with --game GAME
variations  the library's seeds for the split (train 0..999, dev 10000..10999, test 20000..20999)
reset       generates the game for (seed, fold = split) with the game's parameters and the gold path
state       instruction = task description, kind = game name, valid_actions = the library's valid
            actions (deduplicated, sorted), score = the library's normalised score clamped to
            [0, 1] (raw values in info), done = success, failure, or --max-steps reached,
            success = the library's tasksuccess
gold        the library's gold action sequence for the generated game

Game parameters. `--params small` (default) keeps worlds small enough for small models:
    cookingworld  numLocations=3,numIngredients=2,numDistractorItems=3,includeDoors=0,limitInventorySize=0
    twc           numLocations=1,numItemsToPutAway=2,includeDoors=0
    coin          numLocations=5,numDistractorItems=0,includeDoors=0
    mapreader     numLocations=5,maxDistanceApart=3,maxDistractorItemsPerLocation=0,includeDoors=0
    others        the library's defaults
`--params library` uses the library's defaults for every game ("" as gameParams; e.g. cookingworld
has 11 locations, 3 ingredients, 10 distractors, doors). `--game-params GAME=PARAMS` overrides one
game. The parameters in force are reported in every state's info.game_params.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from protocol import Bridge, clamp01, dedup_sorted, log, serve  # noqa: E402

NO_LIMIT = 10**9
SMALL = {
    "cookingworld": "numLocations=3,numIngredients=2,numDistractorItems=3,includeDoors=0,limitInventorySize=0",
    "twc": "numLocations=1,numItemsToPutAway=2,includeDoors=0",
    "coin": "numLocations=5,numDistractorItems=0,includeDoors=0",
    "mapreader": "numLocations=5,maxDistanceApart=3,maxDistractorItemsPerLocation=0,includeDoors=0",
}


class TwxBridge(Bridge):
    name = "textworld-express"

    def __init__(self, game=None, preset="small", overrides=None, max_steps=None):
        from textworld_express import TextWorldExpressEnv

        self.env = TextWorldExpressEnv(envStepLimit=NO_LIMIT)  # the bridge applies --max-steps
        games = list(self.env.getGameNames())
        if game is not None and game not in games:
            raise SystemExit(f"twx_bridge: unknown game {game!r}; the library has {games}")
        self._tasks = [game] if game else games
        self.params = {g: (SMALL.get(g, "") if preset == "small" else "") for g in games}
        for g, p in (overrides or {}).items():
            if g not in games:
                raise SystemExit(f"twx_bridge: --game-params for unknown game {g!r}")
            self.params[g] = p
        self.max_steps = max_steps
        self.loaded = None  # (game, params) currently loaded in the simulator
        self._seeds = {}
        self.episode = None
        log(f"[twx] games {self._tasks}; params " + "; ".join(f"{g}: {self.params[g] or '(default)'}" for g in self._tasks))

    def tasks(self):
        return self._tasks

    def _load(self, game):
        key = (game, self.params[game])
        if self.loaded != key:
            self.env.load(game, self.params[game])
            self.loaded = key

    def variations(self, task, split):
        if task not in self._seeds:
            self._load(task)  # the seed lists come from the loaded game
            self._seeds[task] = {
                "train": self.env.getValidSeedsTrain(),
                "dev": self.env.getValidSeedsDev(),
                "test": self.env.getValidSeedsTest(),
            }
        return self._seeds[task][split]

    def reset(self, task, variation, split):
        split = self.find_split(task, variation, split)
        self.episode = None
        self._load(task)
        obs, infos = self.env.reset(seed=variation, gameFold=split, generateGoldPath=True)
        self.episode = {"task": task, "variation": variation, "split": split, "steps": 0,
                        "done": False, "instruction": infos.get("taskDescription") or self.env.getTaskDescription(),
                        "properties": self.env.getGenerationProperties()}
        return self._state(obs, infos, done=False)

    def _state(self, obs, infos, done):
        ep = self.episode
        truncated = False
        if not done and self.max_steps is not None and ep["steps"] >= self.max_steps:
            done, truncated = True, True
        ep["done"] = done
        success = bool(infos.get("tasksuccess"))
        return {
            "instruction": ep["instruction"],
            "kind": ep["task"],
            "observation": obs,
            "valid_actions": dedup_sorted(infos["validActions"]),
            "score": clamp01(float(infos["score"])),
            "done": bool(done),
            "success": bool(done and success),
            "info": {
                "raw_score": infos.get("scoreRaw"),
                "library_score": infos.get("score"),
                "moves": infos.get("numMoves", 0),
                "steps": ep["steps"],
                "seed": ep["variation"],
                "split": ep["split"],
                "failed": bool(infos.get("taskfailure")),
                "truncated": truncated,
                "game_params": ep["properties"],
            },
        }

    def library_step(self, action):
        obs, _reward, done, infos = self.env.step(action)
        return obs, infos, done

    def library_gold(self):
        return self.env.getGoldActionSequence()

    def close(self):
        if self.env is not None:
            try:
                self.env.close()
            except Exception as e:
                log(f"[twx] close: {e}")
            self.env = None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--game", default=None, help="serve only this game (default: all the library's games)")
    ap.add_argument("--params", choices=["small", "library"], default="small",
                    help="default game parameters: small worlds (default) or the library's defaults")
    ap.add_argument("--game-params", action="append", default=[], metavar="GAME=PARAMS",
                    help='override one game\'s gameParams, e.g. "coin=numLocations=3,includeDoors=0" (repeatable)')
    ap.add_argument("--max-steps", type=int, default=None,
                    help="end an episode (done, not success, info.truncated) after this many steps; default: no cap")
    args = ap.parse_args()
    overrides = {}
    for gp in args.game_params:
        g, sep, p = gp.partition("=")
        if not sep:
            ap.error(f"--game-params expects GAME=PARAMS, got {gp!r}")
        overrides[g] = p
    serve(lambda: TwxBridge(args.game, args.params, overrides, args.max_steps))


if __name__ == "__main__":
    main()
