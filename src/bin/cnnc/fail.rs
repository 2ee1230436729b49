//! The binary's one error type: a message for stderr and the exit status it implies —
//! 2 for a command line that cannot work (usage), 1 for a file or value that is wrong (input).

use std::fmt;

/// Exit status of a usage error (clap uses the same).
pub const USAGE: i32 = 2;
/// Exit status of an input error.
pub const INPUT: i32 = 1;

/// A failed command: printed as `error: {message}` and mapped to an exit status.
#[derive(Debug)]
pub struct Fail {
    /// Exit status.
    pub code: i32,
    /// The message (may span several lines).
    pub message: String,
}

impl Fail {
    /// An input error after diagnostics were already printed (`message` closes them).
    pub fn reported(message: impl Into<String>) -> Fail {
        input(message)
    }
}

/// A usage error (exit status 2).
pub fn usage(message: impl Into<String>) -> Fail {
    Fail { code: USAGE, message: message.into() }
}

/// An input error (exit status 1).
pub fn input(message: impl Into<String>) -> Fail {
    Fail { code: INPUT, message: message.into() }
}

impl fmt::Display for Fail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// Runtime errors (weights that do not fit, inputs of the wrong shape, …) are input errors.
/// Long key lists (weights for another net) are cut to a readable length.
impl From<cnnc::runtime::Error> for Fail {
    fn from(e: cnnc::runtime::Error) -> Fail {
        input(shorten(&e.to_string(), 12))
    }
}

impl From<cnnc::runtime::WeightsError> for Fail {
    fn from(e: cnnc::runtime::WeightsError) -> Fail {
        input(shorten(&e.to_string(), 12))
    }
}

/// Keeps the first `max` lines of a message and says how many more there were.
pub fn shorten(text: &str, max: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    if lines.len() <= max + 1 {
        return text.to_string();
    }
    let mut s = lines[..max].join("\n");
    s += &format!("\n  … and {} more", lines.len() - max);
    s
}
