//! The built-in text environment: four small household task kinds (cook, clean, laundry,
//! water), each with many variations split into train/dev/test, valid actions, a scripted
//! expert, failure modes (wrong order, dead ends, a step limit) and partial scores. It runs
//! in-process ([`BuiltinEnv`] is an [`Environment`]) or as a child process speaking the protocol
//! ([`serve`], behind `engram agent env builtin`), so the process path is tested without Python.

use std::io::{BufRead, Write};

use serde_json::{json, Value};

use super::protocol::{EnvError, EnvResult, Environment};

/// The task kinds, in the order `info` lists them.
pub const TASKS: [&str; 4] = ["clean", "cook", "laundry", "water"];
/// The splits, in the order `info` lists them.
pub const SPLITS: [&str; 3] = ["train", "dev", "test"];

/// One step of the expert's path: the action and what the agent sees after it.
struct Stage {
    action: String,
    after: String,
}

/// An action that ends the episode in failure when taken before stage `before` is reached.
struct DeadEnd {
    action: String,
    before: usize,
    message: String,
}

/// One variation of one task, fully written out.
struct Scenario {
    kind: &'static str,
    instruction: String,
    intro: String,
    stages: Vec<Stage>,
    dead_ends: Vec<DeadEnd>,
    /// Harmless actions that change nothing.
    distractors: Vec<String>,
    carried: Vec<(usize, String)>,
}

/// Picks the `index`-th combination of option lists of the given sizes (mixed radix).
fn digits(mut index: u64, sizes: &[usize]) -> Vec<usize> {
    sizes
        .iter()
        .map(|&n| {
            let d = (index % n as u64) as usize;
            index /= n as u64;
            d
        })
        .collect()
}

fn stage(action: String, after: String) -> Stage {
    Stage { action, after }
}

fn dead(action: String, before: usize, message: String) -> DeadEnd {
    DeadEnd { action, before, message }
}

/// How many variations each task has (the product of its option lists).
fn variation_count(task: &str) -> Option<u64> {
    Some(match task {
        "cook" => 6 * 3 * 2 * 3,
        "clean" => 4 * 3 * 2 * 3,
        "laundry" => 4 * 2 * 2 * 3,
        "water" => 5 * 3 * 2 * 3,
        _ => return None,
    })
}

/// The split a variation belongs to: 6 in 10 train, 2 dev, 2 test.
pub fn split_of(variation: u64) -> &'static str {
    match variation % 10 {
        0..=5 => "train",
        6 | 7 => "dev",
        _ => "test",
    }
}

fn scenario(task: &str, variation: u64) -> Option<Scenario> {
    if variation >= variation_count(task)? {
        return None;
    }
    Some(match task {
        "cook" => {
            const FOOD: [&str; 6] = ["egg", "potato", "carrot", "corn", "pasta", "rice"];
            const STORE: [&str; 3] = ["fridge", "cupboard", "pantry"];
            const VESSEL: [&str; 2] = ["pot", "pan"];
            let d = digits(variation, &[6, 3, 2, 3]);
            let (food, store, vessel) = (FOOD[d[0]], STORE[d[1]], VESSEL[d[2]]);
            let instruction = [format!("Cook the {food} on the stove."), format!("Boil the {food} in a {vessel}."), format!("Make a hot {food} for dinner.")][d[3]].clone();
            Scenario {
                kind: "cook",
                instruction,
                intro: format!("You are in the kitchen. There is a {store}, a stove and a {vessel}. The {store} is closed."),
                stages: vec![
                    stage(format!("open {store}"), format!("The {store} is open. Inside you see the {food} and a jar of jam.")),
                    stage(format!("take {food}"), format!("You hold the {food}. The {vessel} is on the stove.")),
                    stage(format!("put {food} in {vessel}"), format!("The {food} is in the {vessel}. The stove is off.")),
                    stage("turn on stove".into(), format!("The stove heats the {vessel}. The {food} is not cooked yet.")),
                    stage("wait".into(), format!("The {food} is cooked. Dinner is ready.")),
                ],
                dead_ends: vec![
                    dead("turn on stove".into(), 3, format!("The empty {vessel} overheats and cracks. The task cannot be completed.")),
                    dead(format!("eat {food}"), 5, format!("You ate the raw {food}. There is nothing left to cook.")),
                ],
                distractors: vec!["take jam".into(), "go north".into(), "open window".into()],
                carried: vec![(2, food.to_string())],
            }
        }
        "clean" => {
            const SURFACE: [&str; 4] = ["table", "desk", "counter", "shelf"];
            const TOOL: [&str; 3] = ["sponge", "cloth", "rag"];
            const BASIN: [&str; 2] = ["sink", "bucket"];
            let d = digits(variation, &[4, 3, 2, 3]);
            let (surface, tool, basin) = (SURFACE[d[0]], TOOL[d[1]], BASIN[d[2]]);
            let instruction = [format!("Wipe the dirty {surface} clean."), format!("Clean the {surface} with a {tool}."), format!("Scrub the stains off the {surface}.")][d[3]].clone();
            Scenario {
                kind: "clean",
                instruction,
                intro: format!("You are in the dining room. The {surface} is dirty. A {tool} lies next to the {basin}."),
                stages: vec![
                    stage(format!("take {tool}"), format!("You hold a dry {tool}. The {basin} is full of water.")),
                    stage(format!("wet {tool} in {basin}"), format!("The {tool} is wet. The {surface} is still dirty.")),
                    stage(format!("wipe {surface}"), format!("The {surface} is clean now. The dirty {tool} is in your hand.")),
                    stage(format!("put {tool} in {basin}"), format!("You put the {tool} in the {basin}. Everything is tidy.")),
                ],
                dead_ends: vec![
                    dead(format!("wipe {surface}"), 2, format!("The dry {tool} grinds the dirt into the {surface}; the stain is permanent.")),
                    dead(format!("pour water on {surface}"), 4, format!("Water soaks into the {surface} and warps it.")),
                ],
                distractors: vec!["take cup".into(), "go south".into(), "open window".into()],
                carried: vec![(1, tool.to_string())],
            }
        }
        "laundry" => {
            const ITEM: [&str; 4] = ["shirts", "socks", "towels", "sheets"];
            const SOAP: [&str; 2] = ["soap", "detergent"];
            const MACHINE: [&str; 2] = ["washer", "machine"];
            let d = digits(variation, &[4, 2, 2, 3]);
            let (item, soap, machine) = (ITEM[d[0]], SOAP[d[1]], MACHINE[d[2]]);
            let instruction = [format!("Wash the dirty {item} in the {machine}."), "Do a load of laundry.".to_string(), format!("Clean the {item} in the {machine}.")][d[3]].clone();
            Scenario {
                kind: "laundry",
                instruction,
                intro: format!("You are in the laundry room. A pile of dirty {item} lies on the floor next to the {machine}. A box of {soap} and a bottle of bleach are on the shelf."),
                stages: vec![
                    stage(format!("take {item}"), format!("You hold the dirty {item}. The {machine} is empty.")),
                    stage(format!("put {item} in {machine}"), format!("The {item} are in the {machine}. There is no {soap} in it.")),
                    stage(format!("add {soap}"), format!("The {soap} is in the {machine} with the {item}.")),
                    stage(format!("start {machine}"), format!("The {machine} hums and washes the {item}. They come out clean.")),
                ],
                dead_ends: vec![
                    dead(format!("start {machine}"), 3, format!("The {machine} runs its whole cycle unready; the {item} are still dirty and the time is gone.")),
                    dead("add bleach".into(), 4, format!("The bleach ruins the {item}.")),
                ],
                distractors: vec!["take basket".into(), "go east".into(), "open door".into()],
                carried: vec![(1, item.to_string())],
            }
        }
        "water" => {
            const PLANT: [&str; 5] = ["plant", "fern", "roses", "tomato", "basil"];
            const PLACE: [&str; 3] = ["balcony", "garden", "porch"];
            const CAN: [&str; 2] = ["can", "jug"];
            let d = digits(variation, &[5, 3, 2, 3]);
            let (plant, place, can) = (PLANT[d[0]], PLACE[d[1]], CAN[d[2]]);
            let instruction =
                [format!("Water the {plant} on the {place}."), format!("Give the {plant} on the {place} some water."), format!("Keep the {plant} on the {place} alive.")][d[3]].clone();
            Scenario {
                kind: "water",
                instruction,
                intro: format!("You are in the kitchen. An empty {can} stands by the tap. A door leads to the {place}."),
                stages: vec![
                    stage(format!("take {can}"), format!("You hold the empty {can}. The tap is here.")),
                    stage(format!("fill {can} at tap"), format!("The {can} is full of water. The door leads to the {place}.")),
                    stage(format!("go to {place}"), format!("You are on the {place}. The {plant} looks dry.")),
                    stage(format!("water {plant}"), format!("You water the {plant}. It looks healthy again.")),
                ],
                dead_ends: vec![dead(format!("pull {plant}"), 4, format!("You pulled the {plant} out by its roots. It will not grow again."))],
                distractors: vec!["go to bedroom".into(), "take umbrella".into(), "open window".into()],
                carried: vec![(1, can.to_string())],
            }
        }
        _ => return None,
    })
}

/// The state of an episode in progress.
struct Episode {
    task: String,
    scenario: Scenario,
    stage: usize,
    steps: usize,
    step_limit: usize,
    done: bool,
    success: bool,
    observation: String,
}

impl Episode {
    fn valid_actions(&self) -> Vec<String> {
        let s = &self.scenario;
        let mut actions: Vec<String> = s.stages.iter().map(|st| st.action.clone()).chain(s.dead_ends.iter().map(|d| d.action.clone())).chain(s.distractors.iter().cloned()).collect();
        actions.extend(["look", "inventory"].map(String::from));
        actions.sort();
        actions.dedup();
        actions
    }

    fn situation(&self) -> String {
        if self.stage == 0 { self.scenario.intro.clone() } else { self.scenario.stages[self.stage - 1].after.clone() }
    }

    fn state(&self) -> Value {
        let total = self.scenario.stages.len();
        json!({
            "instruction": self.scenario.instruction,
            "kind": self.scenario.kind,
            "observation": self.observation,
            "valid_actions": if self.done { Vec::new() } else { self.valid_actions() },
            "score": self.stage as f64 / total as f64,
            "done": self.done,
            "success": self.success,
            "info": {"task": self.task, "moves": self.steps, "stage": self.stage, "stages": total},
        })
    }

    fn act(&mut self, action: &str) {
        let action = action.trim().to_lowercase();
        self.steps += 1;
        let s = &self.scenario;
        let gold = s.stages.iter().position(|st| st.action == action);
        self.observation = if gold == Some(self.stage) {
            self.stage += 1;
            if self.stage == s.stages.len() {
                self.done = true;
                self.success = true;
            }
            s.stages[self.stage - 1].after.clone()
        } else if let Some(end) = s.dead_ends.iter().find(|d| d.action == action && self.stage < d.before) {
            self.done = true;
            end.message.clone()
        } else if gold.is_some_and(|g| g > self.stage) {
            format!("You cannot {action} yet. {}", self.situation())
        } else if gold.is_some() {
            format!("You already did that. {}", self.situation())
        } else if action == "look" {
            self.situation()
        } else if action == "inventory" {
            let held: Vec<&str> = s.carried.iter().filter(|(from, _)| self.stage >= *from).map(|(_, what)| what.as_str()).collect();
            if held.is_empty() { "You carry nothing.".into() } else { format!("You carry: {}.", held.join(", ")) }
        } else if s.distractors.contains(&action) {
            format!("You {action}. Nothing useful happens. {}", self.situation())
        } else {
            format!("You can't do that here. {}", self.situation())
        };
        if !self.done && self.steps >= self.step_limit {
            self.done = true;
            self.observation.push_str(" You ran out of time.");
        }
    }
}

/// The built-in environment, in-process.
#[derive(Default)]
pub struct BuiltinEnv {
    episode: Option<Episode>,
}

impl BuiltinEnv {
    pub fn new() -> Self {
        BuiltinEnv::default()
    }

    /// Answers one protocol request (an `Err` is the message of an `{"error"}` answer).
    pub fn handle(&mut self, request: &Value) -> Result<Value, String> {
        let op = request.get("op").and_then(Value::as_str).ok_or("a request needs a string \"op\"")?;
        let text = |field: &str| request.get(field).and_then(Value::as_str).ok_or_else(|| format!("\"{op}\" needs a string \"{field}\""));
        match op {
            "info" => Ok(json!({"name": "builtin", "tasks": TASKS, "splits": SPLITS})),
            "variations" => {
                let (task, split) = (text("task")?, text("split")?);
                let count = variation_count(task).ok_or_else(|| format!("unknown task '{task}' (tasks: {})", TASKS.join(", ")))?;
                if !SPLITS.contains(&split) {
                    return Err(format!("unknown split '{split}' (splits: {})", SPLITS.join(", ")));
                }
                Ok(json!({"variations": (0..count).filter(|&v| split_of(v) == split).collect::<Vec<_>>()}))
            }
            "reset" => {
                let (task, split) = (text("task")?, text("split")?);
                let variation = request.get("variation").and_then(Value::as_u64).ok_or("\"reset\" needs a non-negative integer \"variation\"")?;
                let scenario = scenario(task, variation).ok_or_else(|| format!("task '{task}' has no variation {variation}"))?;
                if split_of(variation) != split {
                    return Err(format!("variation {variation} of '{task}' is in the {} split, not {split}", split_of(variation)));
                }
                let step_limit = 2 * scenario.stages.len() + 4;
                let observation = scenario.intro.clone();
                let episode = Episode { task: task.to_string(), scenario, stage: 0, steps: 0, step_limit, done: false, success: false, observation };
                let state = episode.state();
                self.episode = Some(episode);
                Ok(state)
            }
            "step" => {
                let action = text("action")?;
                let episode = self.episode.as_mut().ok_or("no episode: send \"reset\" first")?;
                if episode.done {
                    return Err("the episode is over: send \"reset\"".into());
                }
                episode.act(action);
                Ok(episode.state())
            }
            "gold" => {
                let episode = self.episode.as_ref().ok_or("no episode: send \"reset\" first")?;
                Ok(json!({"actions": episode.scenario.stages.iter().map(|s| s.action.as_str()).collect::<Vec<_>>()}))
            }
            "close" => Ok(json!({"ok": true})),
            other => Err(format!("unknown op '{other}' (info, variations, reset, step, gold, close)")),
        }
    }
}

impl Environment for BuiltinEnv {
    fn describe(&self) -> String {
        "builtin (in-process)".into()
    }

    fn call(&mut self, request: Value) -> EnvResult<Value> {
        self.handle(&request).map_err(|message| EnvError::Refused { command: self.describe(), request: request.to_string(), message })
    }

    fn restart(&mut self) -> EnvResult<()> {
        self.episode = None;
        Ok(())
    }
}

/// A deliberate misbehaviour of the served environment, to test how the runner copes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The process exits.
    Crash,
    /// The process stops answering.
    Hang,
    /// The process answers a line that is not JSON.
    Garbage,
    /// The `reset` of the variation is refused (`{"error"}`), as a generator that cannot build
    /// some seeds does; the process stays usable.
    RefuseReset,
}

impl std::str::FromStr for Fault {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "crash" => Ok(Fault::Crash),
            "hang" => Ok(Fault::Hang),
            "garbage" => Ok(Fault::Garbage),
            "refuse-reset" => Ok(Fault::RefuseReset),
            other => Err(format!("fault '{other}' (expected crash, hang, garbage or refuse-reset)")),
        }
    }
}

/// Serves the built-in environment over the protocol until `close` or the end of input. With
/// `fault`, the first `step` of an episode of variation `fault_variation` misbehaves (or, for
/// [`Fault::RefuseReset`], its `reset` is refused).
pub fn serve(input: impl BufRead, mut output: impl Write, fault: Option<(Fault, u64)>) -> std::io::Result<()> {
    let mut env = BuiltinEnv::new();
    let mut variation = None;
    for line in input.lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let answer = match serde_json::from_str::<Value>(&line) {
            Ok(request) => {
                let op = request.get("op").and_then(Value::as_str).unwrap_or("");
                if op == "reset" {
                    variation = request.get("variation").and_then(Value::as_u64);
                }
                if let Some((kind, at)) = fault {
                    if kind == Fault::RefuseReset && op == "reset" && variation == Some(at) {
                        writeln!(output, "{}", json!({"error": format!("cannot generate variation {at} (fault injected)")}))?;
                        output.flush()?;
                        continue;
                    }
                    if op == "step" && variation == Some(at) {
                        match kind {
                            Fault::Crash => std::process::exit(3),
                            Fault::Hang => loop {
                                std::thread::sleep(std::time::Duration::from_secs(3600));
                            },
                            Fault::Garbage => {
                                writeln!(output, "this is not JSON")?;
                                output.flush()?;
                                continue;
                            }
                            Fault::RefuseReset => {}
                        }
                    }
                }
                let answer = env.handle(&request).unwrap_or_else(|message| json!({"error": message}));
                if op == "close" {
                    writeln!(output, "{answer}")?;
                    output.flush()?;
                    return Ok(());
                }
                answer
            }
            Err(e) => json!({"error": format!("the request is not JSON: {e}")}),
        };
        writeln!(output, "{answer}")?;
        output.flush()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gold_succeeds_and_dead_ends_fail_for_every_task() {
        let mut env = BuiltinEnv::new();
        for task in TASKS {
            for split in SPLITS {
                let variations = env.variations(task, split).unwrap();
                assert!(variations.len() >= 8, "{task} {split}: {variations:?}");
                for &v in variations.iter().take(5) {
                    let state = env.reset(task, v, split).unwrap();
                    assert_eq!(state.kind, task);
                    assert!(!state.done && state.score == 0.0);
                    let gold = env.gold().unwrap();
                    let mut last = state;
                    for (i, action) in gold.iter().enumerate() {
                        assert!(last.valid_actions.contains(action), "{action} not valid in {:?}", last.valid_actions);
                        last = env.step(action).unwrap();
                        assert_eq!(last.done, i + 1 == gold.len());
                    }
                    assert!(last.success && last.score == 1.0);
                    // The second gold action first: wrong order, no progress.
                    env.reset(task, v, split).unwrap();
                    let early = env.step(&gold[1]).unwrap();
                    assert!(!early.done && early.score == 0.0 && early.observation.contains("cannot"), "{}", early.observation);
                }
            }
        }
        // A dead end: the stove on before the pot is filled.
        let v = env.variations("cook", "test").unwrap()[0];
        env.reset("cook", v, "test").unwrap();
        let state = env.step("turn on stove").unwrap();
        assert!(state.done && !state.success);
        // The step limit.
        env.reset("cook", v, "test").unwrap();
        let mut state = env.step("look").unwrap();
        while !state.done {
            state = env.step("look").unwrap();
        }
        assert!(!state.success && state.observation.contains("out of time"));
        // Refusals keep the environment usable.
        assert!(matches!(env.reset("fly", 0, "train"), Err(EnvError::Refused { .. })));
        assert!(matches!(env.reset("cook", v, "train"), Err(EnvError::Refused { .. })));
        assert!(env.info().unwrap().tasks.len() == 4);
    }

    #[test]
    fn splits_are_disjoint_and_serve_speaks_json_lines() {
        let mut env = BuiltinEnv::new();
        let all: Vec<Vec<u64>> = SPLITS.iter().map(|s| env.variations("water", s).unwrap()).collect();
        for (i, a) in all.iter().enumerate() {
            for b in &all[i + 1..] {
                assert!(a.iter().all(|v| !b.contains(v)));
            }
        }
        let input = "{\"op\":\"info\"}\nnot json\n{\"op\":\"close\"}\n{\"op\":\"info\"}\n";
        let mut out = Vec::new();
        serve(input.as_bytes(), &mut out, None).unwrap();
        let lines: Vec<Value> = String::from_utf8(out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 3, "stops after close");
        assert_eq!(lines[0]["name"], "builtin");
        assert!(lines[1]["error"].as_str().unwrap().contains("not JSON"));
        assert_eq!(lines[2]["ok"], true);
    }
}
