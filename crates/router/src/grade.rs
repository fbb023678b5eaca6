//! Graders: is a model's answer correct against a reference?
//!
//! * multiple choice — the letter the answer picks ("B", "(B)", "B. promotion",
//!   "The answer is B", or the text of exactly one choice);
//! * final number — the last number in the answer (after `####` when the
//!   answer has one, as GSM8K references do), with thousands separators,
//!   currency signs, signs and decimals normalised, so `$1,200.00` equals
//!   `1200`;
//! * exact match and contains — after normalising case, spacing and
//!   surrounding punctuation.

use serde::{Deserialize, Serialize};

/// How an item is graded, with its reference answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Grader {
    /// `key` is the correct label; `choices` are (label, text) pairs.
    MultipleChoice {
        key: char,
        choices: Vec<(char, String)>,
    },
    /// `reference` is a number as written (normalised before comparing).
    FinalNumber {
        reference: String,
    },
    ExactMatch {
        reference: String,
    },
    Contains {
        reference: String,
    },
}

/// A graded answer: whether it is correct and what was read from it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Graded {
    pub correct: bool,
    /// The letter, number or normalised text taken from the answer.
    pub extracted: Option<String>,
}

impl Grader {
    pub fn grade(&self, answer: &str) -> Graded {
        match self {
            Grader::MultipleChoice { key, choices } => {
                let picked = extract_choice(answer, choices);
                Graded {
                    correct: picked == Some(key.to_ascii_uppercase()),
                    extracted: picked.map(String::from),
                }
            }
            Grader::FinalNumber { reference } => {
                let number = extract_final_number(answer);
                let expected = normalize_number(reference);
                Graded {
                    correct: number.is_some() && number == expected,
                    extracted: number,
                }
            }
            Grader::ExactMatch { reference } => {
                let normalized = normalize_text(answer);
                Graded {
                    correct: normalized == normalize_text(reference),
                    extracted: Some(normalized),
                }
            }
            Grader::Contains { reference } => {
                let normalized = normalize_text(answer);
                let needle = normalize_text(reference);
                Graded {
                    correct: !needle.is_empty() && normalized.contains(&needle),
                    extracted: Some(normalized),
                }
            }
        }
    }
}

/// The reference number of a GSM8K answer: what follows the last `####`.
pub fn gsm8k_reference(answer: &str) -> Option<String> {
    let (_, after) = answer.rsplit_once("####")?;
    numbers_in(after).into_iter().next()
}

/// Lower-case, single spaces, no surrounding quotes or final punctuation.
pub fn normalize_text(text: &str) -> String {
    let words: Vec<&str> = text.split_whitespace().collect();
    let joined = words.join(" ").to_lowercase();
    joined
        .trim_matches(|c: char| matches!(c, '"' | '\'' | '`' | '*'))
        .trim_end_matches(['.', '!', '?', ';', ':', ','])
        .trim()
        .to_string()
}

/// The letter an answer picks among `choices`, or `None`.
pub fn extract_choice(answer: &str, choices: &[(char, String)]) -> Option<char> {
    let labels: Vec<char> = if choices.is_empty() {
        ('A'..='E').collect()
    } else {
        choices
            .iter()
            .map(|(label, _)| label.to_ascii_uppercase())
            .collect()
    };
    let trimmed = answer.trim_start_matches(|c: char| {
        c.is_whitespace() || matches!(c, '*' | '"' | '\'' | '(' | '[' | '`')
    });
    if let Some(label) = explicit_label(trimmed, &labels) {
        return Some(label);
    }
    if let Some(label) = leading_label(trimmed, &labels, choices) {
        return Some(label);
    }
    if let Some(label) = marked_label(answer, &labels) {
        return Some(label);
    }
    choice_text(answer, choices)
}

fn is_label_end(next: Option<char>) -> bool {
    match next {
        None => true,
        Some(c) => !c.is_alphanumeric(),
    }
}

/// "The answer is B", "Answer: (C)", "correct option is D".
fn explicit_label(text: &str, labels: &[char]) -> Option<char> {
    // ASCII lower-casing keeps byte offsets, so `position` indexes `text` too.
    let lower = text.to_ascii_lowercase();
    for phrase in [
        "answer is",
        "answer:",
        "option is",
        "choice is",
        "option",
        "answer",
    ] {
        let Some(position) = lower.find(phrase) else {
            continue;
        };
        let rest = text[position + phrase.len()..].trim_start_matches(|c: char| {
            c.is_whitespace() || matches!(c, ':' | '(' | '*' | '"' | '\'' | '[')
        });
        let mut chars = rest.chars();
        if let Some(letter) = chars.next() {
            let letter = letter.to_ascii_uppercase();
            let next = chars.next();
            if labels.contains(&letter) && is_label_end(next) {
                return Some(letter);
            }
        }
    }
    None
}

/// The answer starts with a label: "B", "B.", "B)", "B: text", or "A text"
/// where the text is choice A's.
fn leading_label(text: &str, labels: &[char], choices: &[(char, String)]) -> Option<char> {
    let mut chars = text.chars();
    let letter = chars.next()?;
    if !labels.contains(&letter) {
        return None;
    }
    let rest = chars.as_str();
    match rest.chars().next() {
        None => Some(letter),
        Some('.' | ')' | ':' | ',' | ']' | '*' | '\n' | '-') => Some(letter),
        Some(c) if c.is_whitespace() => {
            // "A person would …" is an article, not a label, unless what
            // follows is choice A's text.
            let following = normalize_text(rest);
            let names_its_choice = choices.iter().any(|(label, choice)| {
                *label == letter && following.starts_with(&normalize_text(choice))
            });
            (names_its_choice || following.is_empty()).then_some(letter)
        }
        Some(_) => None,
    }
}

/// A label marked as one anywhere: "(C)" or " C)" or " C." at a word boundary.
fn marked_label(text: &str, labels: &[char]) -> Option<char> {
    let chars: Vec<char> = text.chars().collect();
    for (index, &letter) in chars.iter().enumerate() {
        if !labels.contains(&letter) {
            continue;
        }
        let before = if index == 0 { ' ' } else { chars[index - 1] };
        let after = chars.get(index + 1).copied();
        let after_next = chars.get(index + 2).copied();
        let bracketed = before == '(' && after == Some(')');
        let labelled =
            before.is_whitespace() && matches!(after, Some(')' | ':')) && is_label_end(after_next);
        if bracketed || labelled {
            return Some(letter);
        }
    }
    None
}

/// The answer names exactly one choice's text (a choice whose text is part
/// of another named choice's does not count).
fn choice_text(answer: &str, choices: &[(char, String)]) -> Option<char> {
    let answer = format!(" {} ", normalize_words(answer));
    let named: Vec<(char, String)> = choices
        .iter()
        .map(|(label, text)| (label.to_ascii_uppercase(), normalize_words(text)))
        .filter(|(_, text)| !text.is_empty() && answer.contains(&format!(" {text} ")))
        .collect();
    let maximal: Vec<char> = named
        .iter()
        .filter(|(_, text)| {
            !named
                .iter()
                .any(|(_, other)| other.len() > text.len() && other.contains(text.as_str()))
        })
        .map(|(label, _)| *label)
        .collect();
    match maximal.as_slice() {
        [only] => Some(*only),
        _ => None,
    }
}

fn normalize_words(text: &str) -> String {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|word| !word.is_empty())
        .map(str::to_lowercase)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The answer's final number, normalised (see [`normalize_number`]): the
/// first after the last `####` if there is one, else the last in the text.
pub fn extract_final_number(text: &str) -> Option<String> {
    if let Some((_, after)) = text.rsplit_once("####") {
        if let Some(first) = numbers_in(after).into_iter().next() {
            return Some(first);
        }
    }
    numbers_in(text).pop()
}

/// Every number in `text`, in order, normalised.
fn numbers_in(text: &str) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let mut numbers = Vec::new();
    let mut index = 0;
    while index < chars.len() {
        let starts_number = chars[index].is_ascii_digit()
            || (chars[index] == '.' && chars.get(index + 1).is_some_and(char::is_ascii_digit));
        if !starts_number {
            index += 1;
            continue;
        }
        let start = index;
        while index < chars.len()
            && (chars[index].is_ascii_digit() || matches!(chars[index], ',' | '.'))
        {
            // A separator must be followed by a digit to belong to the number.
            if matches!(chars[index], ',' | '.')
                && !chars.get(index + 1).is_some_and(char::is_ascii_digit)
            {
                break;
            }
            index += 1;
        }
        let raw: String = chars[start..index].iter().collect();
        let negative = is_negative(&chars, start);
        for part in split_grouping(&raw) {
            let signed = if negative { format!("-{part}") } else { part };
            if let Some(number) = normalize_number(&signed) {
                numbers.push(number);
            }
        }
    }
    numbers
}

/// A minus sign (ASCII or Unicode, possibly before a currency sign) right
/// before the number, not joining two words or numbers ("3-4", "x-2").
fn is_negative(chars: &[char], start: usize) -> bool {
    let mut at = start;
    if at > 0 && matches!(chars[at - 1], '$' | '€' | '£') {
        at -= 1;
    }
    if at == 0 || !matches!(chars[at - 1], '-' | '−') {
        return false;
    }
    at < 2 || !chars[at - 2].is_alphanumeric()
}

/// "1,234,567" is one number; "1,2,3" (not thousands groups) is three.
fn split_grouping(raw: &str) -> Vec<String> {
    if !raw.contains(',') {
        return vec![raw.to_string()];
    }
    let (integer, fraction) = match raw.split_once('.') {
        Some((integer, fraction)) => (integer, Some(fraction)),
        None => (raw, None),
    };
    let groups: Vec<&str> = integer.split(',').collect();
    let thousands = groups[0].len() <= 3
        && !groups[0].is_empty()
        && groups[1..].iter().all(|group| group.len() == 3);
    if thousands {
        let joined = groups.concat();
        return vec![match fraction {
            Some(fraction) => format!("{joined}.{fraction}"),
            None => joined,
        }];
    }
    raw.split(',').map(str::to_string).collect()
}

/// A number in canonical form: no sign for zero, no leading zeros, no
/// trailing fractional zeros, no thousands separators or currency:
/// `"$1,200.50"` → `"1200.5"`, `"-0.0"` → `"0"`, `"007"` → `"7"`.
pub fn normalize_number(text: &str) -> Option<String> {
    let mut text = text.trim().trim_end_matches('.');
    let negative = text.starts_with(['-', '−']);
    if negative {
        text = text.trim_start_matches(['-', '−']);
    }
    let text = text
        .trim_start_matches(['$', '€', '£'])
        .trim_end_matches('%')
        .replace(',', "");
    let (integer, fraction) = match text.split_once('.') {
        Some((integer, fraction)) => (integer, fraction),
        None => (text.as_str(), ""),
    };
    let all_digits = |part: &str| part.chars().all(|c| c.is_ascii_digit());
    if (integer.is_empty() && fraction.is_empty()) || !all_digits(integer) || !all_digits(fraction)
    {
        return None;
    }
    let integer = integer.trim_start_matches('0');
    let fraction = fraction.trim_end_matches('0');
    let integer = if integer.is_empty() { "0" } else { integer };
    let magnitude = if fraction.is_empty() {
        integer.to_string()
    } else {
        format!("{integer}.{fraction}")
    };
    if negative && magnitude != "0" {
        Some(format!("-{magnitude}"))
    } else {
        Some(magnitude)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn choices() -> Vec<(char, String)> {
        [
            ('A', "get mad"),
            ('B', "compile"),
            ('C', "history"),
            ('D', "history studies"),
            ('E', "a person"),
        ]
        .iter()
        .map(|(label, text)| (*label, text.to_string()))
        .collect()
    }

    #[test]
    fn multiple_choice_letters_in_their_usual_shapes() {
        let cases = [
            ("B", Some('B')),
            (" B.", Some('B')),
            ("B) compile", Some('B')),
            ("(B)", Some('B')),
            ("**B**", Some('B')),
            ("B: compile", Some('B')),
            ("The answer is D.", Some('D')),
            ("Answer: (c)", Some('C')),
            ("I think the correct option is E", Some('E')),
            ("The best choice here is (A) because", Some('A')),
            ("E a person", Some('E')),
            ("compile", Some('B')),
            ("They would compile it.", Some('B')),
            // "history studies" names D; "history" inside it is not a second pick.
            ("history studies", Some('D')),
            // An article is not a label.
            ("A program needs to compile first", Some('B')),
            ("A program crashes", None),
            ("I am not sure", None),
            ("", None),
            ("F", None),
        ];
        for (answer, expected) in cases {
            assert_eq!(extract_choice(answer, &choices()), expected, "{answer:?}");
        }
    }

    #[test]
    fn multiple_choice_grading_compares_with_the_key() {
        let grader = Grader::MultipleChoice {
            key: 'b',
            choices: choices(),
        };
        assert!(grader.grade("B. compile").correct);
        let wrong = grader.grade("C");
        assert!(!wrong.correct);
        assert_eq!(wrong.extracted.as_deref(), Some("C"));
    }

    #[test]
    fn final_numbers_in_tricky_shapes() {
        let cases = [
            ("The answer is 42.", Some("42")),
            ("She pays $1,234.50 in total", Some("1234.5")),
            ("3 + 4 = 7", Some("7")),
            ("It drops to -5 degrees", Some("-5")),
            ("pages 3-4", Some("4")),
            ("He has 18 apples.\n#### 18", Some("18")),
            ("#### 1,000\nso 999 is wrong", Some("1000")),
            ("0.50 dollars", Some("0.5")),
            ("about .5 of it", Some("0.5")),
            ("25% of them", Some("25")),
            ("5.00", Some("5")),
            ("007", Some("7")),
            ("-0.0", Some("0")),
            ("1,2,3", Some("3")),
            ("no numbers here", None),
            ("", None),
        ];
        for (text, expected) in cases {
            assert_eq!(extract_final_number(text).as_deref(), expected, "{text:?}");
        }
    }

    #[test]
    fn gsm8k_references_are_read_after_the_marker() {
        let reference = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n\
                         Natalia sold 48+24 = <<48+24=72>>72 clips altogether.\n#### 72";
        assert_eq!(gsm8k_reference(reference).as_deref(), Some("72"));
        assert_eq!(gsm8k_reference("#### 1,234").as_deref(), Some("1234"));
        assert_eq!(gsm8k_reference("no marker 5"), None);
        let grader = Grader::FinalNumber {
            reference: "1234".into(),
        };
        assert!(grader.grade("So the total is $1,234.").correct);
        assert!(!grader.grade("1234 and then 5").correct);
        assert!(
            !Grader::FinalNumber {
                reference: "x".into()
            }
            .grade("x")
            .correct
        );
    }

    #[test]
    fn exact_and_contains_ignore_case_spacing_and_final_punctuation() {
        let exact = Grader::ExactMatch {
            reference: "Paris".into(),
        };
        assert!(exact.grade("  paris.").correct);
        assert!(exact.grade("\"PARIS\"").correct);
        assert!(!exact.grade("Paris, France").correct);
        let contains = Grader::Contains {
            reference: "Paris  France".into(),
        };
        assert!(contains.grade("It is paris france!").correct);
        assert!(!contains.grade("It is Lyon").correct);
        assert!(
            !Grader::Contains {
                reference: " ".into()
            }
            .grade("x")
            .correct
        );
    }
}
