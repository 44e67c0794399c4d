//! The agent's context text for one step of an episode (the one layout the distiller and the
//! agent runner share), the action text appended to it, and where activations are read.

use serde::{Deserialize, Serialize};

use super::experience::Episode;
use crate::error::{Error, Result};

/// Where a step's activation is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Position {
    /// The residual at the last token of the context (just before the action).
    ContextLast,
    /// The mean residual over the action's tokens, appended after the context.
    ActionMean,
}

impl Position {
    /// `context-last` or `action-mean`.
    pub fn name(self) -> &'static str {
        match self {
            Position::ContextLast => "context-last",
            Position::ActionMean => "action-mean",
        }
    }
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Position {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "context-last" => Ok(Position::ContextLast),
            "action-mean" => Ok(Position::ActionMean),
            other => Err(Error::InvalidInput(format!("position '{other}' (expected context-last or action-mean)"))),
        }
    }
}

/// The context text for step `step` of `episode` with `history` earlier steps shown:
///
/// ```text
/// Task: {instruction}
/// Observation: {observation of step j-K}
/// Action: {action of step j-K}
/// ...
/// Observation: {observation of step j}
/// Action:
/// ```
///
/// Lines are joined with `\n`; there is no trailing newline or space after `Action:`, so the
/// action text ([`action_text`], which starts with a space) follows directly. Newlines inside
/// observations and actions are kept as they are. `step` must be a valid step index.
pub fn context_text(episode: &Episode, step: usize, history: usize) -> String {
    let mut text = format!("Task: {}\n", episode.instruction);
    for earlier in &episode.steps[step.saturating_sub(history)..step] {
        text.push_str(&format!("Observation: {}\nAction: {}\n", earlier.observation, earlier.action));
    }
    text.push_str(&format!("Observation: {}\nAction:", episode.steps[step].observation));
    text
}

/// The text of step `step`'s action as it follows the context: a space, then the action.
pub fn action_text(episode: &Episode, step: usize) -> String {
    format!(" {}", episode.steps[step].action)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::experience::Step;

    #[test]
    fn layout_with_history() {
        let step = |o: &str, a: &str| Step { observation: o.into(), action: a.into(), valid_actions: None };
        let e = Episode {
            task: "t".into(),
            kind: "k".into(),
            instruction: "do it".into(),
            success: true,
            score: None,
            steps: vec![step("o1", "a1"), step("o2", "a2"), step("o3", "a3")],
            workflow: None,
            variation: None,
            split: None,
        };
        assert_eq!(context_text(&e, 0, 2), "Task: do it\nObservation: o1\nAction:");
        assert_eq!(context_text(&e, 2, 1), "Task: do it\nObservation: o2\nAction: a2\nObservation: o3\nAction:");
        assert_eq!(context_text(&e, 2, 5), "Task: do it\nObservation: o1\nAction: a1\nObservation: o2\nAction: a2\nObservation: o3\nAction:");
        assert_eq!(action_text(&e, 1), " a2");
        assert_eq!("action-mean".parse::<Position>().unwrap(), Position::ActionMean);
    }
}
