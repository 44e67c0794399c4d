//! The experiences format (one episode a JSON line) and its streaming, validating reader.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// One step of an episode: what the agent saw and what it did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Step {
    /// The observation the agent acted on.
    pub observation: String,
    /// The action it took.
    pub action: String,
    /// The actions that were valid at this step, when the environment said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid_actions: Option<Vec<String>>,
}

/// One episode: a task attempted once, its outcome and its steps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Episode {
    /// The task's identifier (several episodes may share it).
    #[serde(default)]
    pub task: String,
    /// The kind of task (the default memory key).
    pub kind: String,
    /// The instruction the agent was given.
    pub instruction: String,
    /// Whether the episode succeeded.
    pub success: bool,
    /// The environment's score, when it gives one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score: Option<f64>,
    /// The steps, in order.
    pub steps: Vec<Step>,
    /// An explicit workflow text for this kind of task, when the harness wrote one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow: Option<String>,
    /// The environment's variation of the task, when the episode came from an environment
    /// (with `split`, it identifies the episode, so evaluation can refuse what a bank saw).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variation: Option<u64>,
    /// The environment split the variation belongs to (train, dev, test).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split: Option<String>,
}

impl Episode {
    /// The (task, variation, split) the episode ran, when it says all three.
    pub fn source(&self) -> Option<EpisodeSource> {
        Some(EpisodeSource { task: self.task.clone(), variation: self.variation?, split: self.split.clone()? })
    }
}

/// One environment episode's identity: a task's variation in a split.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct EpisodeSource {
    pub task: String,
    pub variation: u64,
    pub split: String,
}

impl std::fmt::Display for EpisodeSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} variation {} ({})", self.task, self.variation, self.split)
    }
}

impl Episode {
    /// Parses and validates one JSON line; the error is the problem, without the location.
    pub fn parse(line: &str) -> std::result::Result<Episode, String> {
        let episode: Episode = serde_json::from_str(line).map_err(|e| format!("not a valid episode: {e}"))?;
        episode.validate()?;
        Ok(episode)
    }

    /// Checks non-empty kind and instruction, at least one step, non-empty actions, finite score.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.kind.trim().is_empty() {
            return Err("empty \"kind\"".into());
        }
        if self.instruction.trim().is_empty() {
            return Err("empty \"instruction\"".into());
        }
        if self.steps.is_empty() {
            return Err("an episode needs at least one step".into());
        }
        if let Some(i) = self.steps.iter().position(|s| s.action.trim().is_empty()) {
            return Err(format!("step {} has an empty \"action\"", i + 1));
        }
        if let Some(score) = self.score {
            if !score.is_finite() {
                return Err(format!("score {score} is not finite"));
            }
        }
        Ok(())
    }
}

/// Streams episodes from a JSON-lines file, one line at a time (the file is never loaded
/// whole). Blank lines are ignored. A malformed line is an error `FILE:LINE: problem`, or, with
/// `skip_bad`, that message is kept in [`ExperienceReader::warnings`] and the line skipped.
pub struct ExperienceReader<R: BufRead> {
    path: PathBuf,
    reader: R,
    line: usize,
    skip_bad: bool,
    /// Lines that were skipped (with `skip_bad`), as `FILE:LINE: problem`.
    pub warnings: Vec<String>,
    done: bool,
}

impl ExperienceReader<BufReader<std::fs::File>> {
    /// Opens `path` for streaming.
    pub fn open(path: impl AsRef<Path>, skip_bad: bool) -> Result<Self> {
        let path = path.as_ref();
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        Ok(Self::new(path, BufReader::new(file), skip_bad))
    }
}

impl<R: BufRead> ExperienceReader<R> {
    /// Reads episodes from `reader`; `path` names it in messages.
    pub fn new(path: impl AsRef<Path>, reader: R, skip_bad: bool) -> Self {
        ExperienceReader { path: path.as_ref().to_path_buf(), reader, line: 0, skip_bad, warnings: Vec::new(), done: false }
    }

    fn located(&self, problem: &str) -> Error {
        Error::format(format!("{}:{}", self.path.display(), self.line), problem)
    }
}

impl<R: BufRead> Iterator for ExperienceReader<R> {
    type Item = Result<Episode>;

    fn next(&mut self) -> Option<Self::Item> {
        let mut text = String::new();
        while !self.done {
            text.clear();
            self.line += 1;
            match self.reader.read_line(&mut text) {
                Ok(0) => self.done = true,
                Ok(_) if text.trim().is_empty() => {}
                Ok(_) => match Episode::parse(text.trim()) {
                    Ok(episode) => return Some(Ok(episode)),
                    Err(problem) if self.skip_bad => {
                        let warning = self.located(&problem).to_string();
                        self.warnings.push(warning);
                    }
                    Err(problem) => {
                        self.done = true;
                        return Some(Err(self.located(&problem)));
                    }
                },
                Err(e) => {
                    self.done = true;
                    return Some(Err(self.located(&format!("unreadable line: {e}"))));
                }
            }
        }
        None
    }
}

/// Reads every episode of `path` (see [`ExperienceReader`]); returns them with the warnings of
/// skipped lines. An empty file is an error.
pub fn read_experiences(path: impl AsRef<Path>, skip_bad: bool) -> Result<(Vec<Episode>, Vec<String>)> {
    let path = path.as_ref();
    let mut reader = ExperienceReader::open(path, skip_bad)?;
    let episodes = reader.by_ref().collect::<Result<Vec<_>>>()?;
    if episodes.is_empty() {
        return Err(Error::format(path, "no episodes"));
    }
    Ok((episodes, reader.warnings))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{"task": "t1", "kind": "cook", "instruction": "cook an egg", "success": true, "score": 1.0, "steps": [{"observation": "a pan", "action": "crack egg", "valid_actions": ["crack egg"]}]}"#;

    #[test]
    fn reads_good_lines_and_names_the_bad_line() {
        let text = format!("{GOOD}\n\n{{\"kind\": \"x\"}}\n{GOOD}\n");
        let reader = ExperienceReader::new("exp.jsonl", text.as_bytes(), false);
        let all: Vec<Result<Episode>> = reader.collect();
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].as_ref().unwrap().steps[0].action, "crack egg");
        let err = all[1].as_ref().unwrap_err().to_string();
        assert!(err.starts_with("exp.jsonl:3:"), "{err}");
    }

    #[test]
    fn skip_bad_keeps_going_and_warns() {
        let no_steps = GOOD.replace(r#"[{"observation": "a pan", "action": "crack egg", "valid_actions": ["crack egg"]}]"#, "[]");
        let text = format!("{GOOD}\nnot json\n{no_steps}\n{GOOD}\n");
        let mut reader = ExperienceReader::new("exp.jsonl", text.as_bytes(), true);
        let all: Vec<Episode> = reader.by_ref().collect::<Result<_>>().unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(reader.warnings.len(), 2);
        assert!(reader.warnings[0].contains("exp.jsonl:2:"), "{:?}", reader.warnings);
        assert!(reader.warnings[1].contains("exp.jsonl:3:") && reader.warnings[1].contains("at least one step"));
    }

    #[test]
    fn validation() {
        assert!(Episode::parse(&GOOD.replace("\"kind\": \"cook\"", "\"kind\": \" \"")).unwrap_err().contains("kind"));
        assert!(Episode::parse(&GOOD.replace("\"instruction\": \"cook an egg\"", "\"instruction\": \"\"")).unwrap_err().contains("instruction"));
        assert!(Episode::parse(&GOOD.replace("\"score\": 1.0", "\"score\": 1e999")).is_err());
        let no_score = Episode::parse(&GOOD.replace("\"score\": 1.0, ", "")).unwrap();
        assert_eq!(no_score.score, None);
    }
}
