//! Checks and intervals written in config files and on command lines, parsed where the
//! config is, so a bad one is refused with its key and line before anything runs: the
//! HTTP checks of a drill (`haven_drill` runs them) and intervals like `"24h"`.

use std::time::Duration;

use serde::Deserialize;
use serde::Serialize;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "check {text:?}: {reason}; write it as \"METHOD /path STATUS\", optionally followed by text the body must contain or by json:FIELD=VALUE (e.g. \"GET /health 200\", \"GET /count 200 json:count=42\")"
)]
pub struct BadCheck {
    pub text: String,
    pub reason: String,
}

/// `GET /path STATUS [expectation]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpCheck {
    pub method: String,
    pub path: String,
    pub status: u16,
    pub expect: Option<Expect>,
}

/// What the body must hold besides the status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Expect {
    /// The body contains this text.
    Contains(String),
    /// The body is JSON whose field at this dotted path equals this value (compared as
    /// JSON when it parses as JSON, else as a string).
    JsonField { path: String, value: String },
}

impl HttpCheck {
    pub fn parse(text: &str) -> Result<Self, BadCheck> {
        let bad = |reason: &str| BadCheck {
            text: text.to_string(),
            reason: reason.to_string(),
        };
        let mut parts = text.trim().splitn(4, ' ');
        let method = parts
            .next()
            .filter(|m| !m.is_empty())
            .ok_or_else(|| bad("empty"))?;
        if !method.chars().all(|c| c.is_ascii_uppercase()) {
            return Err(bad("the method must be upper case, like GET"));
        }
        let path = parts.next().ok_or_else(|| bad("no path"))?;
        if !path.starts_with('/') {
            return Err(bad("the path must start with /"));
        }
        let status = parts.next().ok_or_else(|| bad("no status"))?;
        let status: u16 = status
            .parse()
            .ok()
            .filter(|s| (100..600).contains(s))
            .ok_or_else(|| bad("the status must be a number from 100 to 599"))?;
        let expect = match parts.next().map(str::trim).filter(|e| !e.is_empty()) {
            None => None,
            Some(rest) => Some(match rest.strip_prefix("json:") {
                Some(field) => {
                    let (path, value) = field
                        .split_once('=')
                        .ok_or_else(|| bad("json: needs FIELD=VALUE"))?;
                    Expect::JsonField {
                        path: path.to_string(),
                        value: value.to_string(),
                    }
                }
                None => Expect::Contains(rest.to_string()),
            }),
        };
        Ok(Self {
            method: method.to_string(),
            path: path.to_string(),
            status,
            expect,
        })
    }

    pub fn describe(&self) -> String {
        let expect = match &self.expect {
            None => String::new(),
            Some(Expect::Contains(text)) => format!(" containing {text:?}"),
            Some(Expect::JsonField { path, value }) => format!(" with {path} = {value}"),
        };
        format!("{} {} → {}{expect}", self.method, self.path, self.status)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "{text:?}: {reason}; write a number and a unit: s, m, h or d (e.g. \"30m\", \"24h\", \"7d\")"
)]
pub struct BadInterval {
    pub text: String,
    pub reason: String,
}

/// `"90s"`, `"30m"`, `"24h"`, `"7d"`.
pub fn parse_interval(text: &str) -> Result<Duration, BadInterval> {
    let bad = |reason: &str| BadInterval {
        text: text.to_string(),
        reason: reason.to_string(),
    };
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| bad("no unit"))?;
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().map_err(|_| bad("no number"))?;
    let seconds = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        _ => return Err(bad("unknown unit")),
    };
    number
        .checked_mul(seconds)
        .map(Duration::from_secs)
        .ok_or_else(|| bad("too long"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_parse_with_and_without_an_expectation() {
        let plain = HttpCheck::parse("GET /health 200").unwrap();
        assert_eq!(
            (plain.path.as_str(), plain.status, plain.expect),
            ("/health", 200, None)
        );
        let text = HttpCheck::parse("GET /count 200 lines: 42").unwrap();
        assert_eq!(text.expect, Some(Expect::Contains("lines: 42".into())));
        let json = HttpCheck::parse("GET /stats 200 json:items.0.n=3").unwrap();
        assert_eq!(
            json.expect,
            Some(Expect::JsonField {
                path: "items.0.n".into(),
                value: "3".into()
            })
        );
    }

    #[test]
    fn a_malformed_check_says_what_is_wrong_and_how_to_write_it() {
        let cases = [
            ("", "empty"),
            ("get /x 200", "the method must be upper case, like GET"),
            ("GET x 200", "the path must start with /"),
            ("GET /x", "no status"),
            ("GET /x 20", "the status must be a number from 100 to 599"),
            ("GET /x 200 json:count", "json: needs FIELD=VALUE"),
        ];
        for (text, reason) in cases {
            let e = HttpCheck::parse(text).unwrap_err();
            assert_eq!(e.reason, reason, "{text:?}");
            assert!(
                e.to_string()
                    .contains("write it as \"METHOD /path STATUS\"")
            );
        }
    }

    #[test]
    fn intervals_parse_with_their_unit_and_bad_ones_say_why() {
        assert_eq!(parse_interval("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_interval("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_interval("7d"), Ok(Duration::from_secs(604_800)));
        assert_eq!(parse_interval("24").unwrap_err().reason, "no unit");
        assert_eq!(parse_interval("h").unwrap_err().reason, "no number");
        assert_eq!(parse_interval("2w").unwrap_err().reason, "unknown unit");
        assert!(
            parse_interval("2w")
                .unwrap_err()
                .to_string()
                .ends_with("(e.g. \"30m\", \"24h\", \"7d\")")
        );
    }
}
