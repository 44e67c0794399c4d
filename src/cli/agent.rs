//! `engram agent ...`: collect experiences from an environment, evaluate a model under memory
//! conditions, and serve the built-in environment over the protocol (hidden, for the runner).

use std::collections::{HashSet, VecDeque};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use engram::agent::builtin::{serve, Fault};
use engram::agent::eval::{check_overlap, evaluate, markdown_tables, methods, parse_conditions, summarize, text_table, Evaluation, OverlapCheck};
use engram::agent::policy::{Agent, AgentOptions};
use engram::agent::protocol::{env_command, Environment, ProcessEnv};
use engram::agent::runner::{run_episode, schedule, Actor, EpisodeEnd, EpisodeSpec, GoldActor, ModelActor, RandomActor, RunLimits, Schedule};
use engram::memory::apply::RetrievalOptions;
use engram::steer::plan::parse_range;
use serde_json::{json, Value};

use super::memory_apply::load_bank;
use super::ModelArgs;

#[derive(Args)]
pub struct AgentArgs {
    #[command(subcommand)]
    command: AgentCommand,
}

#[derive(Subcommand)]
enum AgentCommand {
    /// Run episodes with a policy and append them to an experiences file (resumable).
    Collect(CollectArgs),
    /// Run the same episodes under memory conditions and report success and score with intervals.
    Eval(EvalArgs),
    /// Serve a built-in environment over the JSON-lines protocol on stdin/stdout.
    #[command(hide = true)]
    Env(EnvArgs),
}

/// Where episodes come from and how they are bounded.
#[derive(Args, Clone)]
struct EnvOptions {
    /// builtin, cmd:SHELL COMMAND, scienceworld or twx:GAME (bridges run by ENGRAM_ENV_PYTHON or .venv-envs/bin/python).
    #[arg(long, default_value = "builtin")]
    env: String,
    /// The split episodes are drawn from (train, dev, test).
    #[arg(long)]
    split: String,
    /// Episodes to run (tasks in turn, each task's variations in order).
    #[arg(long, default_value_t = 8)]
    episodes: usize,
    /// Only these tasks (comma-separated; default: every task the environment lists).
    #[arg(long, value_delimiter = ',')]
    tasks: Vec<String>,
    /// Actions at most per episode.
    #[arg(long, default_value_t = 30)]
    max_steps: usize,
    /// Valid actions kept at most per step (longer lists are filtered to the objects present).
    #[arg(long, default_value_t = 64)]
    max_candidates: usize,
    /// Seconds the environment may take to answer one request.
    #[arg(long, default_value_t = 120.0)]
    env_timeout: f64,
    /// Seed of random choices (random and mixed policies, bootstrap).
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

impl EnvOptions {
    fn open(&self) -> Result<ProcessEnv> {
        if !(self.env_timeout.is_finite() && self.env_timeout > 0.0) {
            bail!("--env-timeout must be a positive number of seconds");
        }
        let engram = std::env::current_exe().context("locating the engram binary for --env builtin")?;
        let python = std::env::var("ENGRAM_ENV_PYTHON").unwrap_or_else(|_| ".venv-envs/bin/python".into());
        if (self.env == "scienceworld" || self.env.starts_with("twx:")) && !Path::new(&python).exists() {
            bail!("--env {}: the environments' python {python} is missing (run tools/envs/setup.sh, or set ENGRAM_ENV_PYTHON)", self.env);
        }
        let command = env_command(&self.env, &engram, &python).map_err(anyhow::Error::msg)?;
        let label = if self.env.starts_with("cmd:") { "cmd".to_string() } else { self.env.clone() };
        Ok(ProcessEnv::new(command, label, Duration::from_secs_f64(self.env_timeout)))
    }

    fn limits(&self) -> Result<RunLimits> {
        if self.max_steps == 0 || self.max_candidates == 0 {
            bail!("--max-steps and --max-candidates must be at least 1");
        }
        Ok(RunLimits { max_steps: self.max_steps, max_candidates: self.max_candidates })
    }

    /// The episodes of the run; fewer than asked is a warning, none an error.
    fn schedule(&self, env: &mut ProcessEnv) -> Result<Schedule> {
        let schedule = schedule(env, &self.tasks, &self.split, self.episodes).with_context(|| format!("listing the episodes of --env {}", self.env))?;
        if schedule.episodes.is_empty() {
            bail!("--env {} has no episodes in split '{}'", self.env, self.split);
        }
        if schedule.episodes.len() < self.episodes {
            eprintln!("warning: split '{}' has only {} episodes; running those", self.split, schedule.episodes.len());
        }
        Ok(schedule)
    }
}

/// How the model acts.
#[derive(Args, Clone)]
struct PolicyOptions {
    /// mean (per token) or sum of the candidate's log-probabilities.
    #[arg(long, default_value = "mean")]
    score: String,
    /// Earlier observation/action pairs in the prompt.
    #[arg(long, default_value_t = 2)]
    history: usize,
    /// Candidate actions scored together.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// KV positions per sequence.
    #[arg(long, default_value_t = 1024)]
    context: usize,
}

impl PolicyOptions {
    fn agent_options(&self, policy: &str) -> Result<AgentOptions> {
        Ok(AgentOptions {
            policy: policy.parse()?,
            reduction: self.score.parse().context("--score")?,
            history: self.history,
            batch: self.batch,
            context: self.context,
            ..AgentOptions::default()
        })
    }
}

#[derive(Args)]
struct CollectArgs {
    #[command(flatten)]
    env: EnvOptions,
    /// model (the model acts), gold (the environment's expert), random, or mixed (the expert
    /// with random deviations: successes and failures of the same kinds).
    #[arg(long, default_value = "mixed")]
    policy: String,
    /// Probability of a random action at each step of the mixed policy.
    #[arg(long, default_value_t = 0.3)]
    deviation: f64,
    /// How the model acts with --policy model: score or generate.
    #[arg(long, default_value = "score")]
    action_policy: String,
    /// The experiences file (JSON lines); episodes already in it are skipped.
    #[arg(short, long)]
    output: PathBuf,
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    agent: PolicyOptions,
}

#[derive(Args)]
struct EvalArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    env: EnvOptions,
    #[command(flatten)]
    agent: PolicyOptions,
    /// score (log-likelihood of each valid action, the prompt computed once) or generate
    /// (greedy, mapped to the nearest valid action).
    #[arg(long, default_value = "score")]
    policy: String,
    /// Conditions, comma-separated: none, text (workflow in the prompt), steer, both.
    #[arg(long, default_value = "none,text,steer,both")]
    conditions: String,
    /// The memory bank (needed by every condition but none).
    #[arg(long, value_name = "BANK")]
    memory: Option<PathBuf>,
    /// Scale of the memory's steering term.
    #[arg(long, default_value_t = 1.0, allow_hyphen_values = true)]
    memory_scale: f32,
    /// Only steer these layers (inclusive A-B).
    #[arg(long, value_name = "A-B")]
    memory_layers: Option<String>,
    /// Memories blended per episode.
    #[arg(long, default_value_t = 1)]
    memory_top_k: usize,
    /// Memories less similar than this (centred cosine) are not used.
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    memory_threshold: f64,
    /// Write the report (summaries, comparisons, every episode) as JSON.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Write the tables as markdown.
    #[arg(long, value_name = "FILE")]
    markdown: Option<PathBuf>,
}

#[derive(Args)]
struct EnvArgs {
    /// builtin
    name: String,
    /// Misbehave (crash, hang, garbage) on the first step of variation --fault-variation.
    #[arg(long, requires = "fault_variation")]
    fault: Option<String>,
    #[arg(long)]
    fault_variation: Option<u64>,
}

pub fn run(args: AgentArgs) -> Result<()> {
    match args.command {
        AgentCommand::Collect(args) => collect(args),
        AgentCommand::Eval(args) => eval(args),
        AgentCommand::Env(args) => serve_env(args),
    }
}

fn serve_env(args: EnvArgs) -> Result<()> {
    if args.name != "builtin" {
        bail!("unknown built-in environment '{}' (expected builtin)", args.name);
    }
    let fault = match (args.fault, args.fault_variation) {
        (Some(kind), Some(variation)) => Some((kind.parse::<Fault>().map_err(anyhow::Error::msg)?, variation)),
        _ => None,
    };
    let stdin = std::io::stdin();
    serve(stdin.lock(), std::io::stdout().lock(), fault).context("serving the built-in environment")
}

/// The episodes already in an experiences file, by (task, variation, split). A last line cut
/// short by an interrupted run (no final newline) is removed so appending starts on a fresh line.
fn existing_episodes(path: &Path) -> Result<HashSet<EpisodeSpec>> {
    let mut done = HashSet::new();
    if !path.exists() {
        return Ok(done);
    }
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    if !bytes.is_empty() && bytes.last() != Some(&b'\n') {
        let keep = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        eprintln!("warning: {}: dropping an unfinished last line (an interrupted run); that episode will be run again", path.display());
        let file = std::fs::OpenOptions::new().write(true).open(path).with_context(|| format!("opening {}", path.display()))?;
        file.set_len(keep as u64).with_context(|| format!("truncating {}", path.display()))?;
    }
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("reading {}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let value: Value = serde_json::from_str(&line).with_context(|| format!("{}:{}: not a JSON line; fix or remove it before resuming", path.display(), i + 1))?;
        let spec = (|| Some(EpisodeSpec { task: value.get("task")?.as_str()?.to_string(), variation: value.get("variation")?.as_u64()?, split: value.get("split")?.as_str()?.to_string() }))();
        if let Some(spec) = spec {
            done.insert(spec);
        }
    }
    Ok(done)
}

fn progress_bar(len: usize) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len as u64);
    bar.set_style(indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} episodes  {msg}").expect("valid template"));
    bar
}

/// Advances the bar with `message`; where stderr is not a terminal (a log file, CI) the bar is
/// hidden, so the same progress goes out as one plain line per episode instead.
fn report_progress(bar: &indicatif::ProgressBar, started: Instant, episode: &str, message: String) {
    bar.inc(1);
    if bar.is_hidden() {
        let total = bar.length().unwrap_or(0);
        eprintln!("[{:>7.1} s] {}/{total} {episode}  {message}", started.elapsed().as_secs_f64(), bar.position());
    }
    bar.set_message(message);
}

fn collect(args: CollectArgs) -> Result<()> {
    let limits = args.env.limits()?;
    if !(0.0..=1.0).contains(&args.deviation) {
        bail!("--deviation must be between 0 and 1");
    }
    let mut env = args.env.open()?;
    let mut schedule = args.env.schedule(&mut env)?;
    let done = existing_episodes(&args.output)?;
    let mut todo: VecDeque<EpisodeSpec> = schedule.episodes.iter().filter(|s| !done.contains(s)).cloned().collect();
    let already = schedule.episodes.len() - todo.len();
    if already > 0 {
        eprintln!("resuming: {already} of {} episodes are already in {}", schedule.episodes.len(), args.output.display());
    }
    let model = if args.policy == "model" { Some(args.model.load()?) } else { None };
    let mut agent = match &model {
        Some(model) => Some(Agent::new(model, args.agent.agent_options(&args.action_policy)?)?),
        None => None,
    };
    let mut actor: Box<dyn Actor + '_> = match args.policy.as_str() {
        "gold" => Box::new(GoldActor::new(0.0, args.env.seed)),
        "mixed" => Box::new(GoldActor::new(args.deviation, args.env.seed)),
        "random" => Box::new(RandomActor::new(args.env.seed)),
        "model" => Box::new(ModelActor { agent: agent.as_mut().expect("loaded for the model policy"), workflow: None }),
        other => bail!("--policy '{other}' (expected model, gold, random or mixed)"),
    };
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(&args.output).with_context(|| format!("opening {}", args.output.display()))?;
    let started = Instant::now();
    let bar = progress_bar(todo.len());
    let (mut written, mut successes, mut env_errors, mut refused) = (0, 0, 0, 0);
    while let Some(spec) = todo.pop_front() {
        let outcome = run_episode(&mut env, &spec, actor.as_mut(), limits)?;
        match &outcome.end {
            EpisodeEnd::ResetRefused(reason) => {
                // A variation the environment cannot start is refused again on a rerun: take the
                // task's next one (skipping those already in the file), so the count is kept.
                refused += 1;
                let next = std::iter::from_fn(|| schedule.replacement(&spec.task)).find(|s| !done.contains(s));
                let instead = next.as_ref().map_or("no variation left to replace it".to_string(), |s| format!("running variation {} instead", s.variation));
                bar.suspend(|| eprintln!("warning: {} variation {}: {reason}; {instead}", spec.task, spec.variation));
                if let Some(next) = next {
                    todo.push_front(next);
                }
                continue;
            }
            EpisodeEnd::EnvError(reason) => {
                env_errors += 1;
                bar.suspend(|| eprintln!("warning: {} variation {}: {reason}; not written (a rerun tries it again)", spec.task, spec.variation));
            }
            _ => {
                if let Some(episode) = outcome.to_episode() {
                    let mut line = serde_json::to_value(&episode).expect("serializable");
                    line["end"] = json!(outcome.end.name());
                    // One line per episode, flushed at once: an interruption loses at most the episode in flight.
                    writeln!(file, "{line}").and_then(|_| file.flush()).with_context(|| format!("writing {}", args.output.display()))?;
                    written += 1;
                    successes += usize::from(episode.success);
                }
            }
        }
        let label = format!("{} {}: {} in {} steps", spec.task, spec.variation, outcome.end.name(), outcome.steps.len());
        report_progress(&bar, started, &label, format!("{successes}/{written} succeeded"));
    }
    bar.finish_and_clear();
    env.close();
    println!(
        "wrote {written} episodes ({successes} succeeded, {} failed) to {}; {already} already there; {env_errors} environment errors; {refused} variations refused by the environment (replaced where the split had more)",
        written - successes,
        args.output.display(),
    );
    Ok(())
}

fn eval(args: EvalArgs) -> Result<()> {
    let started = Instant::now();
    let conditions = parse_conditions(&args.conditions).context("--conditions")?;
    let limits = args.env.limits()?;
    let layers = match &args.memory_layers {
        Some(text) => Some(parse_range(text).with_context(|| format!("--memory-layers '{text}' (expected A-B)"))?),
        None => None,
    };
    let retrieval = RetrievalOptions { top_k: args.memory_top_k, threshold: args.memory_threshold, scale: args.memory_scale, layers };
    if !args.memory_scale.is_finite() {
        bail!("--memory-scale must be finite");
    }
    if args.memory.is_none() {
        if let Some(c) = conditions.iter().find(|c| c.name() != "none") {
            bail!("condition '{}' needs a memory bank: pass --memory BANK (or --conditions none)", c.name());
        }
    }
    let agent_options = args.agent.agent_options(&args.policy)?;
    let model = args.model.load()?;
    let bank = match &args.memory {
        Some(path) => Some(load_bank(path, &model)?),
        None => None,
    };
    let mut env = args.env.open()?;
    let mut schedule = args.env.schedule(&mut env)?;
    let mut overlap_checked = true;
    if let (Some(bank), Some(path)) = (&bank, &args.memory) {
        match check_overlap(bank, &schedule.episodes).with_context(|| format!("memory bank {}", path.display()))? {
            OverlapCheck::Checked => {}
            OverlapCheck::Unchecked(names) => {
                overlap_checked = false;
                eprintln!(
                    "warning: memory bank {}: {} memories ({}) do not record the episodes they were distilled from, so overlap with the evaluated episodes cannot be checked",
                    path.display(),
                    names.len(),
                    names.join(", ")
                );
            }
        }
    }
    let mut agent = Agent::new(&model, agent_options)?;
    let names: Vec<String> = conditions.iter().map(|c| c.name().to_string()).collect();
    let report = Report { args: &args, model: &model.path, names: &names, overlap_checked };
    let bar = progress_bar(schedule.episodes.len() * conditions.len());
    let mut running = vec![(0usize, 0usize); conditions.len()];
    let evaluation = evaluate(&mut agent, &mut env, &mut schedule, &conditions, bank.as_ref(), &retrieval, limits, |result, so_far| {
        let k = names.iter().position(|n| *n == result.condition).expect("a listed condition");
        running[k].0 += usize::from(result.success);
        running[k].1 += 1;
        if let Some(error) = &result.error {
            bar.suspend(|| eprintln!("warning: {} variation {} ({}): {error}", result.task, result.variation, result.condition));
        }
        let label = format!("{} {} {}: {} in {} steps", result.task, result.variation, result.condition, result.end, result.steps);
        report_progress(&bar, started, &label, names.iter().zip(&running).map(|(n, (s, t))| format!("{n} {s}/{t}")).collect::<Vec<_>>().join("  "));
        // Once an episode has run under every condition, the files are rewritten with what is
        // complete so far, so a run stopped early still leaves its paired results.
        if k + 1 == names.len() {
            if let Err(e) = report.write(so_far, started.elapsed().as_secs_f64(), false) {
                bar.suspend(|| eprintln!("warning: {e:#}"));
            }
        }
    })?;
    bar.finish_and_clear();
    env.close();
    for (spec, reason) in &evaluation.refused {
        eprintln!("note: {} variation {} was refused by the environment ({reason}) and replaced by the task's next variation", spec.task, spec.variation);
    }
    let wall = started.elapsed().as_secs_f64();
    let (summaries, comparisons) = summarize(&names, &evaluation.results, args.env.seed);
    println!("{} episodes x {} conditions on --env {} split {} ({}), {:.1} s", evaluation.episodes.len(), conditions.len(), args.env.env, args.env.split, model.path.display(), wall);
    print!("{}", text_table(&summaries, &comparisons));
    report.write(&evaluation, wall, true)?;
    Ok(())
}

/// The `--json` and `--markdown` files of an evaluation, rewritten as episodes complete.
struct Report<'a> {
    args: &'a EvalArgs,
    model: &'a Path,
    names: &'a [String],
    overlap_checked: bool,
}

impl Report<'_> {
    /// Writes both files (where asked) from `evaluation`; `complete` is false for the
    /// intermediate files of a run still going.
    fn write(&self, evaluation: &Evaluation, wall: f64, complete: bool) -> Result<()> {
        let args = self.args;
        let (summaries, comparisons) = summarize(self.names, &evaluation.results, args.env.seed);
        if let Some(path) = &args.json {
            let report = json!({
                "model": self.model.display().to_string(),
                "env": args.env.env,
                "split": args.env.split,
                "complete": complete,
                "episodes": evaluation.episodes,
                "refused": evaluation.refused.iter().map(|(spec, reason)| json!({"episode": spec, "reason": reason})).collect::<Vec<_>>(),
                "conditions": summaries,
                "comparisons": comparisons,
                "methods": methods(),
                "settings": {
                    "memory": args.memory.as_ref().map(|p| p.display().to_string()),
                    "memory_scale": args.memory_scale,
                    "memory_layers": args.memory_layers,
                    "memory_top_k": args.memory_top_k,
                    "memory_threshold": args.memory_threshold,
                    "policy": args.policy,
                    "score": args.agent.score,
                    "history": args.agent.history,
                    "max_steps": args.env.max_steps,
                    "max_candidates": args.env.max_candidates,
                    "seed": args.env.seed,
                },
                "overlap_checked": self.overlap_checked,
                "wall_seconds": wall,
                "results": evaluation.results,
            });
            std::fs::write(path, serde_json::to_string_pretty(&report).expect("serializable") + "\n").with_context(|| format!("writing {}", path.display()))?;
        }
        if let Some(path) = &args.markdown {
            let methods = methods();
            let text = format!(
                "Evaluation{}: {} episodes of `--env {}` split {} under {}, model {}.\n\n{}\nIntervals: {}; {}. Paired: {}; {}.\n",
                if complete { "" } else { " (in progress)" },
                evaluation.episodes.len(),
                args.env.env,
                args.env.split,
                self.names.join(", "),
                self.model.display(),
                markdown_tables(&summaries, &comparisons),
                methods.success_interval,
                methods.score_interval,
                methods.paired_success_test,
                methods.paired_score_interval
            );
            std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(())
    }
}
