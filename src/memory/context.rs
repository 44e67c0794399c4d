//! The agent's prompt for one step (the one layout the agent runner acts on and the distiller
//! reads activations from), the valid-action filter for long lists, the action tokens that
//! follow the prompt, and where activations are read.

use serde::{Deserialize, Serialize};

use std::collections::HashSet;

use super::apply::prompt_with_workflow;
use super::experience::Episode;
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::model::chat::ChatMessage;
use crate::session::Model;

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

#[derive(Debug, Clone, Copy)]
pub struct PromptInput<'a> {
    pub instruction: &'a str,
    /// A memory's workflow text (text and both conditions).
    pub workflow: Option<&'a str>,
    /// Earlier (observation, action) pairs, oldest first; the last `history` are shown.
    pub history: &'a [(String, String)],
    pub observation: &'a str,
    /// The candidate actions (already filtered).
    pub actions: &'a [String],
}

/// The user message of a step: the task (after the workflow text, when given), the last
/// `history` observation/action pairs, the current observation, the candidate actions and the
/// question. The agent runner and the distiller both build it here, so a memory is distilled
/// from exactly the prompts it is applied to.
pub fn prompt_message(input: &PromptInput<'_>, history: usize) -> String {
    let mut text = String::new();
    let task = match input.workflow {
        Some(workflow) => prompt_with_workflow(workflow, input.instruction),
        None => format!("Task: {}", input.instruction),
    };
    text.push_str(&task);
    text.push('\n');
    for (observation, action) in &input.history[input.history.len().saturating_sub(history)..] {
        text.push_str(&format!("Observation: {observation}\nAction: {action}\n"));
    }
    text.push_str(&format!("Observation: {}\n", input.observation));
    if !input.actions.is_empty() {
        text.push_str(&format!("Valid actions: {}\n", input.actions.join("; ")));
    }
    text.push_str("Reply with the next action, exactly as written in the list.");
    text
}

/// Words of `text`, lowercased (letters and digits).
fn words(text: &str) -> impl Iterator<Item = String> + '_ {
    text.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()).map(str::to_lowercase)
}

/// Words of an action that name no object: articles, prepositions, conjunctions.
/// ("around" too: "look around" names no object.)
const FUNCTION_WORDS: [&str; 18] = ["a", "an", "the", "in", "on", "to", "at", "into", "onto", "from", "with", "of", "and", "or", "for", "by", "up", "around"];

/// The candidates a long valid-action list is cut down to before scoring. Lists of at most
/// `cap` actions are kept whole. Otherwise an action is kept when every one of its object words
/// (the words after the first, the verb, that are not function words) appears in `context` (the
/// instruction and current observation): this is the "action template × objects present" filter
/// for ScienceWorld-sized lists. Kept actions stay in the environment's order and the first
/// `cap` are used; if none is kept, the first `cap` of the list are. Deterministic.
pub fn filter_actions(actions: &[String], context: &str, cap: usize) -> Vec<String> {
    if actions.len() <= cap {
        return actions.to_vec();
    }
    let present: HashSet<String> = words(context).collect();
    let kept: Vec<String> = actions
        .iter()
        .filter(|action| words(action).skip(1).filter(|w| !FUNCTION_WORDS.contains(&w.as_str())).all(|w| present.contains(&w)))
        .take(cap)
        .cloned()
        .collect();
    if kept.is_empty() { actions.iter().take(cap).cloned().collect() } else { kept }
}

/// Candidates kept for a step whose recorded valid-action list is long (the runner's default
/// `--max-candidates`).
pub const DEFAULT_MAX_CANDIDATES: usize = 64;

/// The user message of step `step` of `episode` as the agent runner showed it: `history` earlier
/// steps, and the step's recorded valid actions cut down by [`filter_actions`] (episodes written
/// by `engram agent collect` record the candidates that were shown; with none recorded, the
/// list line is left out).
pub fn step_message(episode: &Episode, step: usize, history: usize) -> String {
    let pairs: Vec<(String, String)> = episode.steps[..step].iter().map(|s| (s.observation.clone(), s.action.clone())).collect();
    let current = &episode.steps[step];
    let context = format!("{}\n{}", episode.instruction, current.observation);
    let actions = current.valid_actions.as_deref().map(|a| filter_actions(a, &context, DEFAULT_MAX_CANDIDATES)).unwrap_or_default();
    prompt_message(&PromptInput { instruction: &episode.instruction, workflow: None, history: &pairs, observation: &current.observation, actions: &actions }, history)
}

/// A step prompt's token ids: the model's chat template around `message` with the assistant's
/// turn opened, or, for a model without a template, the message followed by `Action:`.
pub fn prompt_ids<B: Backend>(model: &Model<B>, message: &str) -> Result<Vec<u32>> {
    match &model.chat_template {
        Some(template) => {
            let rendered = template.render(&[ChatMessage::new("user", message)], true)?;
            model.tokenizer.encode(&rendered, false)
        }
        None => model.tokenizer.encode(&format!("{message}\nAction:"), true),
    }
}

/// An action's token ids as they follow the prompt: with a chat template, the action and the end
/// of the turn (so an action that is a prefix of another is not favoured); without one, a space,
/// the action and a newline.
pub fn action_ids<B: Backend>(model: &Model<B>, action: &str) -> Result<Vec<u32>> {
    match (&model.chat_template, model.eos_ids.first()) {
        (Some(_), Some(&end)) => {
            let mut ids = model.tokenizer.encode(action, false)?;
            ids.push(end);
            Ok(ids)
        }
        _ => model.tokenizer.encode(&format!(" {action}\n"), false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::experience::Step;

    #[test]
    fn step_messages_show_history_and_recorded_candidates() {
        let step = |o: &str, a: &str, valid: Option<&[&str]>| Step { observation: o.into(), action: a.into(), valid_actions: valid.map(|v| v.iter().map(|s| s.to_string()).collect()) };
        let e = Episode {
            task: "t".into(),
            kind: "k".into(),
            instruction: "do it".into(),
            success: true,
            score: None,
            steps: vec![step("o1", "a1", None), step("o2", "a2", None), step("o3", "a3", Some(&["a3", "wait"]))],
            workflow: None,
            variation: None,
            split: None,
        };
        assert_eq!(step_message(&e, 0, 2), "Task: do it\nObservation: o1\nReply with the next action, exactly as written in the list.");
        assert_eq!(
            step_message(&e, 2, 1),
            "Task: do it\nObservation: o2\nAction: a2\nObservation: o3\nValid actions: a3; wait\nReply with the next action, exactly as written in the list."
        );
        assert!(step_message(&e, 2, 5).starts_with("Task: do it\nObservation: o1\nAction: a1\nObservation: o2\nAction: a2\n"));
        assert_eq!("action-mean".parse::<Position>().unwrap(), Position::ActionMean);
    }

    #[test]
    fn filter_keeps_actions_about_present_objects() {
        let actions: Vec<String> = ["look around", "open door to kitchen", "open fridge", "take egg from fridge", "take apple", "focus on egg", "wait"].map(String::from).to_vec();
        assert_eq!(filter_actions(&actions, "anything", 10), actions, "short lists are kept whole");
        let kept = filter_actions(&actions, "You are in the kitchen. There is a fridge holding an egg.", 5);
        assert_eq!(kept, ["look around", "open fridge", "take egg from fridge", "focus on egg", "wait"].map(String::from).to_vec());
        let capped = filter_actions(&actions, "kitchen fridge egg", 2);
        assert_eq!(capped, ["look around", "open fridge"].map(String::from).to_vec());
        let none = filter_actions(&actions[1..5], "nothing here", 2);
        assert_eq!(none, actions[1..3].to_vec(), "no match falls back to the first ones");
    }

    #[test]
    fn prompt_shows_recent_history_and_candidates() {
        let history = vec![("o1".to_string(), "a1".to_string()), ("o2".to_string(), "a2".to_string())];
        let actions = vec!["go".to_string(), "stay".to_string()];
        let input = PromptInput { instruction: "do it", workflow: None, history: &history, observation: "o3", actions: &actions };
        let text = prompt_message(&input, 1);
        assert_eq!(text, "Task: do it\nObservation: o2\nAction: a2\nObservation: o3\nValid actions: go; stay\nReply with the next action, exactly as written in the list.");
        let with = prompt_message(&PromptInput { workflow: Some("1. go"), ..input }, 0);
        assert!(with.starts_with("Workflow that worked for similar tasks:\n1. go\n\nTask: do it\nObservation: o3\n"), "{with}");
    }
}
