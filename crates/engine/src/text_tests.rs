//! Unit tests of the text assembler: split characters, split stops, hold-back and release.

use super::*;

/// Feed pieces one by one; returns what was released at each step and at the end.
fn run(stops: &[&str], pieces: &[&[u8]]) -> (Vec<String>, String, bool) {
    let mut assembler = TextAssembler::new(stops.iter().map(|s| (*s).to_owned()).collect());
    let steps = pieces.iter().map(|piece| assembler.push(piece)).collect();
    let stopped = assembler.stopped();
    (steps, assembler.finish(), stopped)
}

#[test]
fn plain_text_is_released_immediately() {
    let (steps, tail, stopped) = run(&[], &[b"Hello", b", ", b"world"]);
    assert_eq!(steps, vec!["Hello", ", ", "world"]);
    assert_eq!(tail, "");
    assert!(!stopped);
}

#[test]
fn a_multibyte_character_split_across_tokens_is_held_until_complete() {
    let euro = "€".as_bytes(); // three bytes
    let (steps, tail, _) = run(&[], &[b"cost ", &euro[..1], &euro[1..2], &euro[2..], b"5"]);
    assert_eq!(steps, vec!["cost ", "", "", "€", "5"]);
    assert_eq!(tail, "");
}

#[test]
fn an_emoji_split_with_text_around_it_releases_the_text_part() {
    let face = "😀".as_bytes(); // four bytes
    let first: Vec<u8> = [b"a".as_slice(), &face[..2]].concat();
    let second: Vec<u8> = [&face[2..], b"b".as_slice()].concat();
    let (steps, _, _) = run(&[], &[&first, &second]);
    assert_eq!(steps, vec!["a", "😀b"]);
}

#[test]
fn a_broken_character_at_the_end_is_released_lossily_by_finish() {
    let euro = "€".as_bytes();
    let (steps, tail, _) = run(&[], &[b"x", &euro[..2]]);
    assert_eq!(steps, vec!["x", ""]);
    assert_eq!(tail, "\u{FFFD}");
}

#[test]
fn invalid_bytes_in_the_middle_become_replacement_characters() {
    let (steps, _, _) = run(&[], &[b"a\xFFb"]);
    assert_eq!(steps, vec!["a\u{FFFD}b"]);
}

#[test]
fn a_stop_inside_one_token_cuts_the_text_before_it() {
    let (steps, tail, stopped) = run(&["END"], &[b"abc", b"dENDef", b"more"]);
    assert_eq!(steps, vec!["abc", "d", ""]);
    assert_eq!(tail, "");
    assert!(stopped);
}

#[test]
fn a_stop_split_across_tokens_is_held_back_then_dropped() {
    let (steps, tail, stopped) = run(&["</s>"], &[b"hi <", b"/", b"s>", b"after"]);
    assert_eq!(steps, vec!["hi ", "", "", ""]);
    assert_eq!(tail, "");
    assert!(stopped);
}

#[test]
fn a_held_prefix_that_turns_out_not_to_be_a_stop_is_released() {
    let (steps, tail, stopped) = run(&["</s>"], &[b"a <", b"/b", b">"]);
    assert_eq!(steps, vec!["a ", "</b", ">"]);
    assert_eq!(tail, "");
    assert!(!stopped);
}

#[test]
fn a_held_prefix_at_the_end_of_the_stream_is_released_by_finish() {
    let (steps, tail, stopped) = run(&["\n\n"], &[b"line", b"\n"]);
    assert_eq!(steps, vec!["line", ""]);
    assert_eq!(tail, "\n");
    assert!(!stopped);
}

#[test]
fn a_stop_at_the_very_start_releases_nothing() {
    let (steps, tail, stopped) = run(&["User:"], &[b"User:", b" hello"]);
    assert_eq!(steps, vec!["", ""]);
    assert_eq!(tail, "");
    assert!(stopped);
}

#[test]
fn the_earliest_of_several_stops_wins() {
    let (steps, _, stopped) = run(&["world", "lo w"], &[b"hello world"]);
    assert_eq!(steps, vec!["hel"]);
    assert!(stopped);
}

#[test]
fn a_stop_made_of_multibyte_characters_split_mid_character() {
    let stop = "¿¡";
    let bytes = format!("sí{stop}no").into_bytes();
    // Split every byte apart: the worst case for both UTF-8 and stop matching.
    let pieces: Vec<&[u8]> = bytes.chunks(1).collect();
    let (steps, tail, stopped) = run(&[stop], &pieces);
    assert_eq!(steps.concat(), "sí");
    assert_eq!(tail, "");
    assert!(stopped);
}

#[test]
fn overlapping_stop_prefixes_hold_the_longest_candidate() {
    // "aab" must be found even though "aa" alone looked like a failed start.
    let (steps, _, stopped) = run(&["aab"], &[b"xa", b"a", b"a", b"b"]);
    assert_eq!(steps.concat(), "xa");
    assert!(stopped);
}

#[test]
fn empty_stop_strings_are_ignored() {
    let (steps, tail, stopped) = run(&[""], &[b"text"]);
    assert_eq!(steps, vec!["text"]);
    assert_eq!(tail, "");
    assert!(!stopped);
}

#[test]
fn released_text_concatenates_to_the_input_when_nothing_stops() {
    let text = "naïve café — ünïcödé ✓ done";
    let bytes = text.as_bytes();
    for chunk in 1..5 {
        let pieces: Vec<&[u8]> = bytes.chunks(chunk).collect();
        let (steps, tail, stopped) = run(&["✗", "xyz"], &pieces);
        assert_eq!(steps.concat() + &tail, text, "chunk {chunk}");
        assert!(!stopped);
    }
}
