//! Features of a prompt that the pre-route decision reads: its length, its
//! task signals and the kind of question it asks. Cheap by design: one pass
//! over the words, no allocation beyond the lower-cased word list.

use serde::{Deserialize, Serialize};

/// The coarse task a prompt asks for; the configuration has one policy per class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskClass {
    /// Pick one of labelled choices (A/B/C…).
    MultipleChoice,
    /// Arithmetic or a word problem with numbers.
    Math,
    /// Write, read or fix program code.
    Code,
    /// Anything else: chat, facts, writing.
    Open,
}

impl TaskClass {
    pub const ALL: [TaskClass; 4] = [
        TaskClass::MultipleChoice,
        TaskClass::Math,
        TaskClass::Code,
        TaskClass::Open,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TaskClass::MultipleChoice => "multiple_choice",
            TaskClass::Math => "math",
            TaskClass::Code => "code",
            TaskClass::Open => "open",
        }
    }
}

impl std::fmt::Display for TaskClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What kind of question the prompt asks, from its wording.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuestionKind {
    /// "How many", "how much", "what is 3 × 4": a number is expected.
    Quantity,
    /// "Why", "explain", "describe": a free-form explanation.
    Explanation,
    /// "Is", "does", "can" at the start: yes or no.
    YesNo,
    /// Other "what/which/who/where/when" questions.
    Factual,
    /// An instruction rather than a question.
    Instruction,
}

/// Signals read from the prompt text alone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptFeatures {
    pub chars: usize,
    pub words: usize,
    /// Numbers written in the prompt (digit runs).
    pub numbers: usize,
    /// Lines or inline markers that label choices: "A.", "(B)", "C)".
    pub choice_labels: usize,
    /// Words that ask for arithmetic: "total", "each", "percent", "how many"…
    pub math_cues: usize,
    /// Words and marks of program code: "function", "```", "def"…
    pub code_cues: usize,
    /// Words that chain steps: "then", "after", "remaining", "first"…
    pub multi_step_cues: usize,
    pub question: QuestionKind,
    pub class: TaskClass,
}

const MATH_CUES: &[&str] = &[
    "total",
    "each",
    "per",
    "percent",
    "%",
    "sum",
    "twice",
    "half",
    "times",
    "average",
    "cost",
    "costs",
    "price",
    "paid",
    "pay",
    "earn",
    "earns",
    "profit",
    "minutes",
    "hours",
    "calculate",
    "compute",
    "equals",
    "multiply",
    "divide",
    "+",
    "-",
    "*",
    "/",
    "=",
];

const CODE_CUES: &[&str] = &[
    "function",
    "code",
    "python",
    "rust",
    "javascript",
    "def",
    "fn",
    "class",
    "compile",
    "compiler",
    "bug",
    "regex",
    "sql",
    "api",
    "implement",
    "return",
    "variable",
    "array",
    "string",
];

const MULTI_STEP_CUES: &[&str] = &[
    "then",
    "after",
    "afterwards",
    "remaining",
    "rest",
    "first",
    "second",
    "next",
    "finally",
    "left",
    "more",
    "fewer",
    "than",
];

impl PromptFeatures {
    /// Reads the features of `prompt` (the text the user asked, usually the
    /// last user message).
    pub fn of(prompt: &str) -> PromptFeatures {
        let lower = prompt.to_lowercase();
        let words: Vec<&str> = lower
            .split(|c: char| c.is_whitespace() || matches!(c, ',' | ';' | '?' | '!' | '"'))
            .map(|word| word.trim_matches(|c: char| matches!(c, '.' | ':' | '(' | ')')))
            .filter(|word| !word.is_empty())
            .collect();
        let count = |cues: &[&str]| words.iter().filter(|word| cues.contains(word)).count();
        let math_cues = count(MATH_CUES)
            + lower.matches("how many").count()
            + lower.matches("how much").count();
        let code_cues = count(CODE_CUES) + prompt.matches("```").count() * 3;
        let numbers = count_numbers(prompt);
        let choice_labels = count_choice_labels(prompt);
        let question = question_kind(&words, &lower);
        let mut features = PromptFeatures {
            chars: prompt.chars().count(),
            words: words.len(),
            numbers,
            choice_labels,
            math_cues,
            code_cues,
            multi_step_cues: count(MULTI_STEP_CUES),
            question,
            class: TaskClass::Open,
        };
        features.class = features.classify();
        features
    }

    fn classify(&self) -> TaskClass {
        if self.choice_labels >= 2 {
            return TaskClass::MultipleChoice;
        }
        if self.code_cues >= 2 && self.code_cues > self.math_cues {
            return TaskClass::Code;
        }
        let asks_for_a_number = self.question == QuestionKind::Quantity;
        if self.numbers >= 1 && (self.math_cues >= 1 || asks_for_a_number) {
            return TaskClass::Math;
        }
        TaskClass::Open
    }

    /// A one-line summary for decision reasons.
    pub fn summary(&self) -> String {
        format!(
            "class={} words={} numbers={} multi_step={}",
            self.class, self.words, self.numbers, self.multi_step_cues
        )
    }
}

fn count_numbers(text: &str) -> usize {
    let mut numbers = 0;
    let mut in_number = false;
    for c in text.chars() {
        let digit = c.is_ascii_digit();
        if digit && !in_number {
            numbers += 1;
        }
        // "1,000" and "3.5" are one number each.
        in_number = digit || (in_number && matches!(c, ',' | '.'));
    }
    numbers
}

/// Counts choice labels: a capital letter A–H written as "A.", "A)", "(A)"
/// or "A:" at the start of a line or after whitespace.
fn count_choice_labels(text: &str) -> usize {
    let bytes = text.as_bytes();
    let mut labels = 0;
    for index in 0..bytes.len() {
        let letter = bytes[index];
        if !(b'A'..=b'H').contains(&letter) {
            continue;
        }
        let before = if index == 0 { b'\n' } else { bytes[index - 1] };
        let after = bytes.get(index + 1).copied().unwrap_or(b' ');
        let opened = before == b'(' && after == b')';
        let starts = before.is_ascii_whitespace() && matches!(after, b'.' | b')' | b':');
        // "A." followed by a letter is an initial ("J.R.R."), not a label.
        let next = bytes.get(index + 2).copied().unwrap_or(b' ');
        if opened || (starts && !next.is_ascii_alphabetic()) {
            labels += 1;
        }
    }
    labels
}

fn question_kind(words: &[&str], lower: &str) -> QuestionKind {
    if lower.contains("how many") || lower.contains("how much") {
        return QuestionKind::Quantity;
    }
    let has = |cue: &str| words.contains(&cue);
    if has("why") || has("explain") || has("describe") {
        return QuestionKind::Explanation;
    }
    // The first word of the last sentence that ends with a question mark.
    let question = lower
        .rsplit_terminator(['.', '\n'])
        .find(|sentence| sentence.trim_end().ends_with('?'));
    if let Some(sentence) = question {
        let first = sentence.split_whitespace().next().unwrap_or("");
        if matches!(
            first,
            "is" | "are" | "does" | "do" | "can" | "could" | "will" | "was" | "were" | "should"
        ) {
            return QuestionKind::YesNo;
        }
        return QuestionKind::Factual;
    }
    if has("what") || has("which") || has("who") || has("where") || has("when") {
        return QuestionKind::Factual;
    }
    QuestionKind::Instruction
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multiple_choice_prompts_are_recognised_by_their_labels() {
        let prompt = "Where would you find a jellyfish?\nA. ocean\nB. desert\nC. forest\n\
                      D. mall\nE. sky\nAnswer with the letter only.";
        let features = PromptFeatures::of(prompt);
        assert_eq!(features.choice_labels, 5);
        assert_eq!(features.class, TaskClass::MultipleChoice);
        let inline = PromptFeatures::of("Pick one: (A) red (B) blue (C) green");
        assert_eq!(inline.class, TaskClass::MultipleChoice);
    }

    #[test]
    fn initials_and_articles_are_not_choice_labels() {
        let features = PromptFeatures::of("A dog met E.T. at home. A cat did too.");
        assert_eq!(features.choice_labels, 0);
        assert_eq!(features.class, TaskClass::Open);
    }

    #[test]
    fn word_problems_are_math() {
        let prompt = "Tom has 1,200 apples and sells 3.5 boxes of 20 each. \
                      How many apples are left?";
        let features = PromptFeatures::of(prompt);
        assert_eq!(features.numbers, 3);
        assert_eq!(features.question, QuestionKind::Quantity);
        assert_eq!(features.class, TaskClass::Math);
        assert!(features.multi_step_cues >= 1);
    }

    #[test]
    fn code_requests_are_code() {
        let features =
            PromptFeatures::of("Write a Python function that reverses a string in place.");
        assert_eq!(features.class, TaskClass::Code);
        assert_eq!(features.question, QuestionKind::Instruction);
    }

    #[test]
    fn question_kinds_follow_the_wording() {
        assert_eq!(
            PromptFeatures::of("Is the sky blue?").question,
            QuestionKind::YesNo
        );
        assert_eq!(
            PromptFeatures::of("Why is the sky blue?").question,
            QuestionKind::Explanation
        );
        assert_eq!(
            PromptFeatures::of("What is the capital of France?").question,
            QuestionKind::Factual
        );
        assert_eq!(
            PromptFeatures::of("What is the capital of France?").class,
            TaskClass::Open
        );
        assert_eq!(PromptFeatures::of("").class, TaskClass::Open);
    }
}
