//! What to add where: SteeringPlan (vectors × coefficient × schedule × mode), CapturePlan (which
//! residual points and positions to record) and ReadoutPlan (norms and projections per point).

use std::sync::Arc;

use super::SteeringVector;
use crate::error::{Error, Result};

/// A point of the residual stream: after a block's attention residual add, or at its output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Point {
    /// After block `i`'s attention residual add (named explicitly: `attn:i`).
    Attention(usize),
    /// The output of block `i`: transformers' `hidden_states[i + 1]`, llama.cpp's `direction.i`.
    Block(usize),
}

impl Point {
    /// Dense index of the point among `2 × layers` points (attention, block for each layer).
    pub fn index(self) -> usize {
        match self {
            Point::Attention(l) => 2 * l,
            Point::Block(l) => 2 * l + 1,
        }
    }

    pub fn layer(self) -> usize {
        match self {
            Point::Attention(l) | Point::Block(l) => l,
        }
    }

    pub fn name(self) -> String {
        match self {
            Point::Attention(l) => format!("attn.{l}"),
            Point::Block(l) => format!("layer.{l}"),
        }
    }
}

/// Which tokens a steering term applies to. Rows at positions below the sequence's prompt
/// length are prompt rows; the k-th generated row (k = 0, 1, ...) is at `prompt_len + k`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Schedule {
    All,
    Prompt,
    Generated,
    /// The first `k` generated rows.
    FirstGenerated(usize),
    /// Absolute positions `start..=end`.
    Positions { start: usize, end: usize },
    /// Prompt rows at full strength, generated row k at `rate^k`.
    Decay(f32),
}

impl Schedule {
    /// The factor multiplying the coefficient at `position` of a sequence whose prompt has
    /// `prompt_len` tokens (`None`: all rows are prompt rows so far).
    pub fn factor(self, position: usize, prompt_len: Option<usize>) -> f32 {
        let generated = prompt_len.and_then(|p| position.checked_sub(p));
        match self {
            Schedule::All => 1.0,
            Schedule::Prompt => f32::from(generated.is_none()),
            Schedule::Generated => f32::from(generated.is_some()),
            Schedule::FirstGenerated(k) => f32::from(generated.is_some_and(|g| g < k)),
            Schedule::Positions { start, end } => f32::from(position >= start && position <= end),
            Schedule::Decay(rate) => generated.map_or(1.0, |g| rate.powi(g.min(i32::MAX as usize) as i32)),
        }
    }

    /// Parses `all`, `prompt`, `generated`, `first:K`, `range:A-B`, `decay:R`.
    pub fn parse(text: &str) -> Result<Self> {
        let bad = || Error::InvalidInput(format!("steering schedule '{text}' (expected all, prompt, generated, first:K, range:A-B or decay:R)"));
        Ok(match text.split_once(':') {
            None => match text {
                "all" => Schedule::All,
                "prompt" => Schedule::Prompt,
                "generated" => Schedule::Generated,
                _ => return Err(bad()),
            },
            Some(("first", k)) => Schedule::FirstGenerated(k.parse().map_err(|_| bad())?),
            Some(("range", r)) => {
                let (start, end) = parse_range(r).ok_or_else(bad)?;
                Schedule::Positions { start, end }
            }
            Some(("decay", r)) => {
                let rate: f32 = r.parse().map_err(|_| bad())?;
                if !(rate.is_finite() && rate > 0.0 && rate <= 1.0) {
                    return Err(Error::InvalidInput(format!("decay rate must be in (0, 1], got {r}")));
                }
                Schedule::Decay(rate)
            }
            _ => return Err(bad()),
        })
    }
}

/// How a term's coefficient turns into the vector added to a row `h`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SteeringMode {
    /// `h += c · v`.
    Add,
    /// `h += c · |h| / |v| · v` (|h| before steering): strength relative to the row's norm.
    Relative,
    /// `h += max(0, target − ⟨h, v̂⟩) · v̂`: add only what is missing to reach the target projection.
    Clamp { target: f32 },
}

impl SteeringMode {
    /// Parses `add`, `relative`, `clamp:TARGET`.
    pub fn parse(text: &str) -> Result<Self> {
        match text.split_once(':') {
            None if text == "add" => Ok(SteeringMode::Add),
            None if text == "relative" => Ok(SteeringMode::Relative),
            Some(("clamp", t)) => {
                let target: f32 = t.parse().map_err(|_| Error::InvalidInput(format!("clamp target '{t}' is not a number")))?;
                if !target.is_finite() {
                    return Err(Error::InvalidInput("clamp target must be finite".into()));
                }
                Ok(SteeringMode::Clamp { target })
            }
            _ => Err(Error::InvalidInput(format!("steering mode '{text}' (expected add, relative or clamp:TARGET)"))),
        }
    }
}

/// Parses `A-B` (inclusive) or `A`.
pub fn parse_range(text: &str) -> Option<(usize, usize)> {
    let (a, b) = match text.split_once('-') {
        Some((a, b)) => (a.trim().parse().ok()?, b.trim().parse().ok()?),
        None => {
            let v = text.trim().parse().ok()?;
            (v, v)
        }
    };
    (a <= b).then_some((a, b))
}

/// One vector applied with one coefficient, schedule and mode.
#[derive(Debug, Clone)]
pub struct SteeringTerm {
    pub vector: Arc<SteeringVector>,
    pub scale: f32,
    /// Inclusive layer range to apply (None: every layer the vector has a direction for).
    pub layers: Option<(usize, usize)>,
    /// Apply at the block output (default) or after the attention residual add.
    pub at_attention: bool,
    pub schedule: Schedule,
    pub mode: SteeringMode,
}

impl SteeringTerm {
    pub fn new(vector: Arc<SteeringVector>, scale: f32) -> Self {
        SteeringTerm { vector, scale, layers: None, at_attention: false, schedule: Schedule::All, mode: SteeringMode::Add }
    }

    /// The direction this term adds at `point`, if any.
    pub fn direction_at(&self, point: Point) -> Option<&[f32]> {
        let layer = point.layer();
        let wanted = matches!(point, Point::Attention(_)) == self.at_attention;
        let in_range = self.layers.is_none_or(|(a, b)| layer >= a && layer <= b);
        if wanted && in_range { self.vector.get(layer) } else { None }
    }
}

/// Everything added to one sequence's residual stream: the terms are summed.
#[derive(Debug, Clone, Default)]
pub struct SteeringPlan {
    pub terms: Vec<SteeringTerm>,
}

impl SteeringPlan {
    pub fn is_empty(&self) -> bool {
        self.terms.is_empty()
    }

    /// Checks every vector fits the model and every coefficient is finite.
    pub fn validate(&self, hidden_size: usize, layer_count: usize) -> Result<()> {
        for (i, term) in self.terms.iter().enumerate() {
            term.vector.check_fits(hidden_size, layer_count, &format!("steering term {i}"))?;
            if !term.scale.is_finite() {
                return Err(Error::InvalidInput(format!("steering term {i}: scale must be finite")));
            }
        }
        Ok(())
    }
}

/// Which rows of a sequence to capture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CapturePositions {
    /// The last prompt token.
    LastPrompt,
    /// Every prompt token.
    AllPrompt,
    /// The mean over the prompt tokens (one row per sequence).
    MeanPrompt,
    /// Every generated token.
    Generated,
    /// Every row at absolute positions `start..=end`.
    Range { start: usize, end: usize },
    /// Every row.
    All,
}

impl CapturePositions {
    /// Parses `last`, `prompt`, `mean`, `generated`, `all`, `A-B`.
    pub fn parse(text: &str) -> Result<Self> {
        Ok(match text {
            "last" => CapturePositions::LastPrompt,
            "prompt" => CapturePositions::AllPrompt,
            "mean" => CapturePositions::MeanPrompt,
            "generated" => CapturePositions::Generated,
            "all" => CapturePositions::All,
            other => {
                let (start, end) = parse_range(other).ok_or_else(|| {
                    Error::InvalidInput(format!("capture positions '{other}' (expected last, prompt, mean, generated, all or A-B)"))
                })?;
                CapturePositions::Range { start, end }
            }
        })
    }
}

/// What to record: residual points and positions.
#[derive(Debug, Clone)]
pub struct CapturePlan {
    pub points: Vec<Point>,
    pub positions: CapturePositions,
}

impl CapturePlan {
    /// Parses `LAYERS[@POSITIONS]`: layers `A-B`, `A,B,C`, `all`, each optionally prefixed with
    /// `attn:` for the post-attention point; positions default to `last`.
    pub fn parse(text: &str, layer_count: usize) -> Result<Self> {
        let (layers, positions) = match text.split_once('@') {
            Some((l, p)) => (l, CapturePositions::parse(p)?),
            None => (text, CapturePositions::LastPrompt),
        };
        let mut points = Vec::new();
        for part in layers.split(',') {
            let (attention, spec) = match part.strip_prefix("attn:") {
                Some(rest) => (true, rest),
                None => (false, part),
            };
            let (a, b) = if spec == "all" {
                (0, layer_count - 1)
            } else {
                parse_range(spec).ok_or_else(|| Error::InvalidInput(format!("capture layers '{part}' (expected A-B, A, all or attn:...)")))?
            };
            if b >= layer_count {
                return Err(Error::InvalidInput(format!("capture layer {b} but the model has {layer_count} layers")));
            }
            points.extend((a..=b).map(|l| if attention { Point::Attention(l) } else { Point::Block(l) }));
        }
        points.sort();
        points.dedup();
        Ok(CapturePlan { points, positions })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_follow_prompt_and_generated_positions() {
        let prompt = Some(5);
        assert_eq!(Schedule::Prompt.factor(4, prompt), 1.0);
        assert_eq!(Schedule::Prompt.factor(5, prompt), 0.0);
        assert_eq!(Schedule::Generated.factor(5, prompt), 1.0);
        assert_eq!(Schedule::Generated.factor(3, None), 0.0, "before generation starts every row is a prompt row");
        assert_eq!(Schedule::FirstGenerated(2).factor(6, prompt), 1.0);
        assert_eq!(Schedule::FirstGenerated(2).factor(7, prompt), 0.0);
        assert_eq!(Schedule::Positions { start: 2, end: 3 }.factor(3, prompt), 1.0);
        assert_eq!(Schedule::Positions { start: 2, end: 3 }.factor(4, prompt), 0.0);
        assert_eq!(Schedule::Decay(0.5).factor(2, prompt), 1.0);
        assert_eq!(Schedule::Decay(0.5).factor(7, prompt), 0.25);
    }

    #[test]
    fn cli_strings_parse_and_bad_ones_are_refused() {
        assert_eq!(Schedule::parse("first:3").unwrap(), Schedule::FirstGenerated(3));
        assert_eq!(Schedule::parse("range:2-9").unwrap(), Schedule::Positions { start: 2, end: 9 });
        assert!(Schedule::parse("decay:1.5").is_err());
        assert!(Schedule::parse("sometimes").is_err());
        assert_eq!(SteeringMode::parse("clamp:2.5").unwrap(), SteeringMode::Clamp { target: 2.5 });
        assert!(SteeringMode::parse("clamp:nan").is_err());
        let plan = CapturePlan::parse("attn:1-2,5@mean", 30).unwrap();
        assert_eq!(plan.points, vec![Point::Attention(1), Point::Attention(2), Point::Block(5)]);
        assert_eq!(plan.positions, CapturePositions::MeanPrompt);
        assert!(CapturePlan::parse("0-30", 30).is_err());
        assert!(CapturePlan::parse("3-1", 30).is_err());
    }
}

/// Per-layer readouts: `|h|` and the projection of `h` on each probe's unit direction.
#[derive(Debug, Clone, Default)]
pub struct ReadoutPlan {
    pub points: Vec<Point>,
    /// Probe vectors with their names (e.g. the steering files they came from).
    pub probes: Vec<(String, Arc<SteeringVector>)>,
}

impl ReadoutPlan {
    /// Readouts at every block output.
    pub fn all_blocks(layer_count: usize, probes: Vec<(String, Arc<SteeringVector>)>) -> Self {
        ReadoutPlan { points: (0..layer_count).map(Point::Block).collect(), probes }
    }
}
