//! Labels for a bank's basis directions written by a local model: an interpretation prompt built
//! from the steps at both ends of a direction, the model's JSON answer checked field by field,
//! and retries (sampled) when the answer is not valid.

use serde::{Deserialize, Serialize};

use super::analyze::{shorten, BasisDirection, StepRef};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::generate::{generate, GenerationRequest, SamplingParams, StopParams};
use crate::model::chat::ChatMessage;
use crate::session::{Model, Session, SessionOptions};

/// What the model is asked to return.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DirectionLabel {
    pub label: String,
    pub explanation: String,
    /// Whether the high end goes with success: `positive`, `negative` or `neutral`.
    pub polarity: String,
    /// The model's own confidence in [0, 1].
    pub confidence: f64,
    pub key_evidence: Vec<String>,
}

/// The outcome of labelling one direction.
#[derive(Debug, Clone, Serialize)]
pub struct LabelOutcome {
    pub label: Option<DirectionLabel>,
    /// Generations tried (the first greedy, the rest sampled).
    pub attempts: usize,
    /// Why each rejected answer was rejected, with the start of its text.
    pub rejected: Vec<String>,
}

/// The start of the answer, written into the prompt after the assistant turn begins.
const ANSWER_START: &str = "{\"label\": \"";

/// The shortest answer budget worth generating.
const MIN_ANSWER_TOKENS: usize = 48;

/// Steps shown per end of the direction, tried in turn until the prompt fits the model's
/// context (a small model's attention is short anyway).
const STEPS_SHOWN: [usize; 4] = [6, 4, 2, 1];

fn describe(steps: &[StepRef], shown: usize) -> String {
    steps
        .iter()
        .take(shown)
        .enumerate()
        .map(|(i, s)| {
            format!(
                "{}. [{}] task: {} | saw: {} | did: {}",
                i + 1,
                if s.success { "episode succeeded" } else { "episode failed" },
                shorten(&s.instruction, 80),
                shorten(&s.observation, 120),
                shorten(&s.action, 60)
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The interpretation prompt (the user message) for a direction with `shown` steps of each end.
pub fn interpretation_prompt(direction: &BasisDirection, shown: usize) -> Result<String> {
    let steps = direction.steps.as_ref().ok_or_else(|| Error::InvalidInput("labelling a direction needs experiences (--experiences)".into()))?;
    Ok(format!(
        "An AI agent's internal activations were projected on one direction. Steps where the projection is HIGH:\n{}\n\n\
         Steps where it is LOW:\n{}\n\n\
         What pattern do the HIGH steps share that the LOW steps lack? polarity is positive if the HIGH steps go with success, negative if with failure, else neutral. \
         Answer with only this JSON object, the <...> parts filled in:\n\
         {{\"label\": \"<2-5 words>\", \"explanation\": \"<one sentence>\", \"polarity\": \"<positive|negative|neutral>\", \"confidence\": <0 to 1>, \"key_evidence\": [\"<a quote from the steps>\"]}}",
        describe(&steps.top.steps, shown),
        describe(&steps.bottom.steps, shown)
    ))
}

/// Parses and checks a model's answer: the first `{` to the last `}` must be a JSON object with
/// every field, a known polarity, a confidence in [0, 1] and a non-empty label.
pub fn parse_label(text: &str) -> std::result::Result<DirectionLabel, String> {
    let (Some(start), Some(end)) = (text.find('{'), text.rfind('}')) else { return Err("no JSON object in the answer".into()) };
    if end < start {
        return Err("no JSON object in the answer".into());
    }
    let label: DirectionLabel = serde_json::from_str(&text[start..=end]).map_err(|e| format!("invalid JSON: {e}"))?;
    if label.label.trim().is_empty() {
        return Err("empty label".into());
    }
    if [&label.label, &label.explanation].iter().any(|t| t.contains('<') && t.contains('>')) {
        return Err("the answer copies the template's <...> placeholders".into());
    }
    if !["positive", "negative", "neutral"].contains(&label.polarity.as_str()) {
        return Err(format!("polarity '{}' is not positive, negative or neutral", label.polarity));
    }
    if !(0.0..=1.0).contains(&label.confidence) {
        return Err(format!("confidence {} is outside [0, 1]", label.confidence));
    }
    Ok(label)
}

/// Asks `model` (which must have a chat template) to label `direction`: one greedy answer, then
/// up to `retries` sampled ones while the answer is rejected.
pub fn label_direction<B: Backend>(model: &Model<B>, direction: &BasisDirection, retries: usize, max_tokens: usize) -> Result<LabelOutcome> {
    let template = model.chat_template.as_ref().ok_or_else(|| Error::InvalidInput(format!("{} has no chat template to ask for labels with", model.path.display())))?;
    let limit = model.config.max_position_embeddings;
    let mut ids = Vec::new();
    for shown in STEPS_SHOWN {
        let messages = [
            ChatMessage::new("system", "You interpret directions in a language model's activation space. You answer with one JSON object."),
            ChatMessage::new("user", interpretation_prompt(direction, shown)?),
        ];
        // The answer is started for the model: a small model continues a JSON object far more
        // often than it opens one unprompted.
        let rendered = template.render(&messages, true)? + ANSWER_START;
        ids = model.tokenizer.encode(&rendered, false)?;
        if ids.len() + max_tokens < limit {
            break;
        }
    }
    // With the fewest steps and still too long, answer in what is left, if that is enough for
    // a short JSON object.
    let max_tokens = max_tokens.min(limit.saturating_sub(ids.len() + 1));
    if max_tokens < MIN_ANSWER_TOKENS {
        return Err(Error::InvalidInput(format!(
            "the labelling prompt needs {} tokens, leaving {max_tokens} of the model's {limit} positions to answer in (at least {MIN_ANSWER_TOKENS} are needed)",
            ids.len()
        )));
    }
    let mut session = Session::new(model, SessionOptions::new(1, ids.len() + max_tokens + 1))?;
    let mut rejected = Vec::new();
    for attempt in 0..=retries {
        let sampling = if attempt == 0 { SamplingParams::default() } else { SamplingParams { temperature: 0.7, top_p: 0.95, seed: attempt as u64, ..SamplingParams::default() } };
        let request = GenerationRequest { prompt_ids: ids.clone(), sampling, stop: StopParams { max_tokens, ..Default::default() } };
        let (outputs, _) = generate(&mut session, &[request], &mut |_: usize, _: &str| {})?;
        let text = format!("{ANSWER_START}{}", outputs[0].text);
        match parse_label(&text) {
            Ok(label) => return Ok(LabelOutcome { label: Some(label), attempts: attempt + 1, rejected }),
            Err(why) => rejected.push(format!("{why}: {}", shorten(&text, 160))),
        }
    }
    Ok(LabelOutcome { label: None, attempts: retries + 1, rejected })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_valid_answers_and_names_what_is_wrong() {
        let good = "Sure! {\"label\": \"opening\", \"explanation\": \"x\", \"polarity\": \"positive\", \"confidence\": 0.7, \"key_evidence\": [\"open door\"]} done";
        assert_eq!(parse_label(good).unwrap().label, "opening");
        assert!(parse_label("no json here").unwrap_err().contains("no JSON"));
        assert!(parse_label("{\"label\": \"a\"}").unwrap_err().contains("invalid JSON"));
        let bad_polarity = good.replace("positive", "sideways");
        assert!(parse_label(&bad_polarity).unwrap_err().contains("sideways"));
        let bad_confidence = good.replace("0.7", "7");
        assert!(parse_label(&bad_confidence).unwrap_err().contains("outside"));
        assert!(parse_label("} {").unwrap_err().contains("no JSON"));
    }
}
