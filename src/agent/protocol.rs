//! The environment protocol (docs/agent-protocol.md): its messages, the [`Environment`] trait
//! the runner drives, and [`ProcessEnv`], a child process spoken to in JSON lines with a
//! timeout on every call. Failures of the process are typed ([`EnvError`]) so the runner can end
//! the episode with the reason, start a fresh process and go on.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// The answer to `info`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnvInfo {
    pub name: String,
    pub tasks: Vec<String>,
    #[serde(default)]
    pub splits: Vec<String>,
}

/// What the environment shows after `reset` and every `step`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnvState {
    pub instruction: String,
    pub kind: String,
    pub observation: String,
    pub valid_actions: Vec<String>,
    /// Normalised to [0, 1].
    pub score: f64,
    pub done: bool,
    pub success: bool,
    #[serde(default)]
    pub info: Value,
}

/// Why a call to an environment failed.
#[derive(Debug, thiserror::Error)]
pub enum EnvError {
    #[error("could not start environment `{command}`: {reason}")]
    Spawn { command: String, reason: String },
    #[error("environment `{command}` exited while answering {request} ({status})")]
    Exited { command: String, request: String, status: String },
    #[error("environment `{command}` did not answer {request} within {seconds} s")]
    Timeout { command: String, request: String, seconds: f64 },
    #[error("environment `{command}` answered {request} with something that is not a valid answer: {problem}: {line}")]
    Garbage { command: String, request: String, problem: String, line: String },
    /// The environment answered `{"error": ...}`: it is still usable.
    #[error("environment `{command}` refused {request}: {message}")]
    Refused { command: String, request: String, message: String },
}

impl EnvError {
    /// Whether the process must be restarted before it is used again (everything but a refusal).
    pub fn needs_restart(&self) -> bool {
        !matches!(self, EnvError::Refused { .. })
    }
}

pub type EnvResult<T> = std::result::Result<T, EnvError>;

/// An environment the runner can drive: a child process or an in-process one.
pub trait Environment {
    /// A short name for messages (the command line of a process).
    fn describe(&self) -> String;
    /// Sends one request object and returns the answer object (an `{"error"}` answer is
    /// [`EnvError::Refused`]).
    fn call(&mut self, request: Value) -> EnvResult<Value>;
    /// Ends the current process (if any) and starts afresh.
    fn restart(&mut self) -> EnvResult<()>;

    fn info(&mut self) -> EnvResult<EnvInfo> {
        let request = json!({"op": "info"});
        let answer = self.call(request.clone())?;
        decode(self.describe(), &request, answer)
    }

    fn variations(&mut self, task: &str, split: &str) -> EnvResult<Vec<u64>> {
        #[derive(Deserialize)]
        struct Variations {
            variations: Vec<u64>,
        }
        let request = json!({"op": "variations", "task": task, "split": split});
        let answer = self.call(request.clone())?;
        Ok(decode::<Variations>(self.describe(), &request, answer)?.variations)
    }

    fn reset(&mut self, task: &str, variation: u64, split: &str) -> EnvResult<EnvState> {
        let request = json!({"op": "reset", "task": task, "variation": variation, "split": split});
        let answer = self.call(request.clone())?;
        decode(self.describe(), &request, answer)
    }

    fn step(&mut self, action: &str) -> EnvResult<EnvState> {
        let request = json!({"op": "step", "action": action});
        let answer = self.call(request.clone())?;
        decode(self.describe(), &request, answer)
    }

    fn gold(&mut self) -> EnvResult<Vec<String>> {
        #[derive(Deserialize)]
        struct Gold {
            actions: Vec<String>,
        }
        let request = json!({"op": "gold"});
        let answer = self.call(request.clone())?;
        Ok(decode::<Gold>(self.describe(), &request, answer)?.actions)
    }

    fn close(&mut self) {
        let _ = self.call(json!({"op": "close"}));
    }
}

/// Parses an answer into `T`, or a [`EnvError::Garbage`] naming the request.
fn decode<T: serde::de::DeserializeOwned>(command: String, request: &Value, answer: Value) -> EnvResult<T> {
    serde_json::from_value(answer.clone()).map_err(|e| EnvError::Garbage {
        command,
        request: request.to_string(),
        problem: format!("missing or mistyped fields ({e})"),
        line: shorten(&answer.to_string()),
    })
}

fn shorten(text: &str) -> String {
    const MAX: usize = 200;
    if text.chars().count() <= MAX { text.to_string() } else { format!("{}...", text.chars().take(MAX).collect::<String>()) }
}

/// A line (or the end) of the child's stdout, sent by the reader thread.
enum Line {
    Text(String),
    Closed,
}

/// The process command: a program and its arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvCommand {
    pub program: String,
    pub args: Vec<String>,
}

impl EnvCommand {
    /// `sh -c TEXT`: a shell command line.
    pub fn shell(text: &str) -> Self {
        EnvCommand { program: "sh".into(), args: vec!["-c".into(), text.into()] }
    }

    /// The command as one line for messages.
    pub fn display(&self) -> String {
        if self.program == "sh" && self.args.len() == 2 && self.args[0] == "-c" {
            return self.args[1].clone();
        }
        std::iter::once(self.program.as_str()).chain(self.args.iter().map(String::as_str)).collect::<Vec<_>>().join(" ")
    }
}

struct Running {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<Line>,
}

/// An environment in a child process, JSON lines on stdin/stdout; stderr is passed through
/// with each line prefixed by `[env LABEL]`. Started on first use and after a failure.
pub struct ProcessEnv {
    command: EnvCommand,
    label: String,
    timeout: Duration,
    running: Option<Running>,
}

impl ProcessEnv {
    /// A process environment (not started yet); every call waits at most `timeout`.
    pub fn new(command: EnvCommand, label: impl Into<String>, timeout: Duration) -> Self {
        ProcessEnv { command, label: label.into(), timeout, running: None }
    }

    fn start(&mut self) -> EnvResult<&mut Running> {
        if self.running.is_none() {
            let mut command = Command::new(&self.command.program);
            command.args(&self.command.args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
            // Its own process group, so that stopping a hung `sh -c ...` environment also stops
            // what the shell started (killing the shell alone would orphan it).
            #[cfg(unix)]
            std::os::unix::process::CommandExt::process_group(&mut command, 0);
            let mut child = command
                .spawn()
                .map_err(|e| EnvError::Spawn { command: self.command.display(), reason: e.to_string() })?;
            let stdin = child.stdin.take().expect("piped stdin");
            let stdout = child.stdout.take().expect("piped stdout");
            let stderr = child.stderr.take().expect("piped stderr");
            let (sender, lines) = mpsc::channel();
            // A reader thread turns the blocking pipe into a channel, so each call can wait with
            // a timeout; it ends when the pipe closes (the process exited or was killed).
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(text) = line else { break };
                    if sender.send(Line::Text(text)).is_err() {
                        return;
                    }
                }
                let _ = sender.send(Line::Closed);
            });
            let label = self.label.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
                    eprintln!("[env {label}] {line}");
                }
            });
            self.running = Some(Running { child, stdin, lines });
        }
        Ok(self.running.as_mut().expect("just started"))
    }

    fn stop(&mut self) {
        if let Some(mut running) = self.running.take() {
            drop(running.stdin);
            // A well-behaved environment exits when its stdin closes; give it a moment, then kill.
            for _ in 0..20 {
                if matches!(running.child.try_wait(), Ok(Some(_))) {
                    // The leader has gone; anything it left behind in its group goes too.
                    kill_process_group(&mut running.child);
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            kill_process_group(&mut running.child);
            let _ = running.child.wait();
        }
    }

    fn exit_status(&mut self) -> String {
        let Some(running) = self.running.as_mut() else { return "not running".into() };
        for _ in 0..50 {
            if let Ok(Some(status)) = running.child.try_wait() {
                return status.to_string();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        "output closed".into()
    }
}

/// Kills the child and everything in its process group (the child leads it, see `start`).
fn kill_process_group(child: &mut Child) {
    #[cfg(unix)]
    {
        // `kill -KILL -- -PGID` reaches the whole group without unsafe FFI.
        let _ = Command::new("kill").args(["-KILL", "--", &format!("-{}", child.id())]).stdout(Stdio::null()).stderr(Stdio::null()).status();
    }
    let _ = child.kill();
}

impl Drop for ProcessEnv {
    fn drop(&mut self) {
        if let Some(running) = self.running.as_mut() {
            let _ = writeln!(running.stdin, "{}", json!({"op": "close"}));
        }
        self.stop();
    }
}

impl Environment for ProcessEnv {
    fn describe(&self) -> String {
        self.command.display()
    }

    fn call(&mut self, request: Value) -> EnvResult<Value> {
        let command = self.command.display();
        let request_text = request.to_string();
        let timeout = self.timeout;
        let running = self.start()?;
        if writeln!(running.stdin, "{request_text}").and_then(|_| running.stdin.flush()).is_err() {
            let status = self.exit_status();
            self.stop();
            return Err(EnvError::Exited { command, request: request_text, status });
        }
        let line = match running.lines.recv_timeout(timeout) {
            Ok(Line::Text(line)) => line,
            Ok(Line::Closed) | Err(RecvTimeoutError::Disconnected) => {
                let status = self.exit_status();
                self.stop();
                return Err(EnvError::Exited { command, request: request_text, status });
            }
            Err(RecvTimeoutError::Timeout) => {
                self.stop();
                return Err(EnvError::Timeout { command, request: request_text, seconds: timeout.as_secs_f64() });
            }
        };
        let garbage = |problem: &str, line: &str| EnvError::Garbage { command: command.clone(), request: request_text.clone(), problem: problem.into(), line: shorten(line) };
        let answer: Value = match serde_json::from_str(&line) {
            Ok(value @ Value::Object(_)) => value,
            Ok(_) => {
                self.stop();
                return Err(garbage("not a JSON object", &line));
            }
            Err(e) => {
                self.stop();
                return Err(garbage(&format!("not JSON ({e})"), &line));
            }
        };
        if let Some(message) = answer.get("error") {
            let message = message.as_str().map(str::to_string).unwrap_or_else(|| message.to_string());
            return Err(EnvError::Refused { command, request: request_text, message });
        }
        Ok(answer)
    }

    fn restart(&mut self) -> EnvResult<()> {
        self.stop();
        self.start().map(|_| ())
    }
}

/// The command of an `--env` value: `builtin` (this engram binary's `agent env builtin`),
/// `cmd:SHELL COMMAND`, `scienceworld` or `twx:GAME` (the bridges in tools/envs/ run by
/// `python`, the environments' virtualenv interpreter). Unknown values are an error naming them.
pub fn env_command(spec: &str, engram: &std::path::Path, python: &str) -> std::result::Result<EnvCommand, String> {
    let bridge = |script: &str, extra: &[&str]| EnvCommand {
        program: python.to_string(),
        args: std::iter::once(format!("tools/envs/{script}")).chain(extra.iter().map(|s| s.to_string())).collect(),
    };
    if spec == "builtin" {
        return Ok(EnvCommand { program: engram.display().to_string(), args: ["agent", "env", "builtin"].map(String::from).to_vec() });
    }
    if let Some(command) = spec.strip_prefix("cmd:") {
        if command.trim().is_empty() {
            return Err("--env cmd: needs a command after the colon".into());
        }
        return Ok(EnvCommand::shell(command));
    }
    if spec == "scienceworld" {
        return Ok(bridge("scienceworld_bridge.py", &[]));
    }
    if let Some(game) = spec.strip_prefix("twx:") {
        if game.trim().is_empty() {
            return Err("--env twx: needs a game name (e.g. twx:coin)".into());
        }
        return Ok(bridge("twx_bridge.py", &["--game", game]));
    }
    Err(format!("unknown environment '{spec}' (expected builtin, cmd:COMMAND, scienceworld or twx:GAME)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_values_map_to_commands() {
        let engram = std::path::Path::new("/bin/engram");
        let builtin = env_command("builtin", engram, "py").unwrap();
        assert_eq!((builtin.program.as_str(), builtin.args.join(" ")), ("/bin/engram", "agent env builtin".to_string()));
        let cmd = env_command("cmd:python3 x.py --game coin", engram, "py").unwrap();
        assert_eq!((cmd.program.as_str(), cmd.display()), ("sh", "python3 x.py --game coin".to_string()));
        let twx = env_command("twx:coin", engram, ".venv-envs/bin/python").unwrap();
        assert_eq!(twx.display(), ".venv-envs/bin/python tools/envs/twx_bridge.py --game coin");
        assert_eq!(env_command("scienceworld", engram, "py").unwrap().display(), "py tools/envs/scienceworld_bridge.py");
        for bad in ["gym", "cmd:", "twx:", ""] {
            assert!(env_command(bad, engram, "py").is_err(), "{bad}");
        }
    }
}
