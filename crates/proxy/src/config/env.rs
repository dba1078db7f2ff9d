//! `${VAR}` / `${VAR:-default}` expansion of the raw config text, done before TOML parsing
//! so that RunPod-style environment injection works for every value, numbers included.

use std::fmt;

/// Why a config text could not be expanded. Carries the line so the operator can find it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvError {
    pub line: usize,
    pub reason: String,
}

impl fmt::Display for EnvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.reason)
    }
}

impl std::error::Error for EnvError {}

/// Every expansion problem of a config text, so one run names all missing variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvErrors(pub Vec<EnvError>);

impl fmt::Display for EnvErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for EnvErrors {}

/// Expands `${VAR}` (error when unset) and `${VAR:-default}` (default when unset or empty).
/// `$${` yields a literal `${`. Text after a `#` that is outside a quoted string is a TOML
/// comment and is copied untouched, so comments may mention variables freely.
/// Every problem is reported, not just the first.
pub fn expand(text: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<String, EnvErrors> {
    let mut out = String::with_capacity(text.len());
    let mut errors = Vec::new();
    for (idx, line) in text.split_inclusive('\n').enumerate() {
        expand_line(line, idx + 1, &lookup, &mut out, &mut errors);
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(EnvErrors(errors))
    }
}

/// Expands with the process environment.
pub fn expand_env(text: &str) -> Result<String, EnvErrors> {
    expand(text, |name| std::env::var(name).ok())
}

fn expand_line(
    line: &str,
    line_no: usize,
    lookup: &impl Fn(&str) -> Option<String>,
    out: &mut String,
    errors: &mut Vec<EnvError>,
) {
    let mut quote: Option<char> = None;
    let mut rest = line;
    while let Some(c) = rest.chars().next() {
        match c {
            '#' if quote.is_none() => {
                out.push_str(rest);
                return;
            }
            '"' | '\'' => {
                quote = match quote {
                    None => Some(c),
                    Some(q) if q == c => None,
                    other => other,
                };
                out.push(c);
                rest = &rest[1..];
            }
            '\\' if quote == Some('"') && rest.len() > 1 => {
                // keep escapes (e.g. \") intact so quote tracking stays right
                let n = 1 + rest[1..].chars().next().map_or(0, char::len_utf8);
                out.push_str(&rest[..n]);
                rest = &rest[n..];
            }
            '$' if rest.starts_with("$${") => {
                out.push_str("${");
                rest = &rest[3..];
            }
            '$' if rest.starts_with("${") => {
                let Some(end) = rest.find('}') else {
                    errors.push(EnvError {
                        line: line_no,
                        reason: "unterminated ${...}".into(),
                    });
                    out.push_str(rest);
                    return;
                };
                let inner = &rest[2..end];
                match resolve(inner, line_no, lookup) {
                    Ok(v) => out.push_str(&v),
                    Err(e) => errors.push(e),
                }
                rest = &rest[end + 1..];
            }
            _ => {
                out.push(c);
                rest = &rest[c.len_utf8()..];
            }
        }
    }
}

fn resolve(
    inner: &str,
    line_no: usize,
    lookup: &impl Fn(&str) -> Option<String>,
) -> Result<String, EnvError> {
    let (name, default) = match inner.split_once(":-") {
        Some((n, d)) => (n, Some(d)),
        None => (inner, None),
    };
    let valid = !name.is_empty()
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !name.starts_with(|c: char| c.is_ascii_digit());
    if !valid {
        return Err(EnvError {
            line: line_no,
            reason: format!("invalid variable name in ${{{inner}}}"),
        });
    }
    match (lookup(name), default) {
        (Some(v), Some(d)) if v.is_empty() => Ok(d.to_string()),
        (Some(v), _) => Ok(v),
        (None, Some(d)) => Ok(d.to_string()),
        (None, None) => Err(EnvError {
            line: line_no,
            reason: format!(
                "environment variable {name} is not set (write ${{{name}:-default}} to give a default)"
            ),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "SET" => Some("value".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn plain_and_default_forms() {
        assert_eq!(expand("a = \"${SET}\"", env).unwrap(), "a = \"value\"");
        assert_eq!(expand("a = \"${NOPE:-x:y}\"", env).unwrap(), "a = \"x:y\"");
        assert_eq!(expand("a = \"${EMPTY:-d}\"", env).unwrap(), "a = \"d\"");
        assert_eq!(expand("a = \"${SET:-d}\"", env).unwrap(), "a = \"value\"");
        assert_eq!(
            expand("port = ${NOPE:-8080}\n", env).unwrap(),
            "port = 8080\n"
        );
    }

    #[test]
    fn unset_without_default_names_variable_and_line() {
        let err = expand("a = 1\nb = \"${NOPE}\"", env).unwrap_err();
        assert_eq!(err.0.len(), 1);
        assert_eq!(err.0[0].line, 2);
        assert!(err.0[0].reason.contains("NOPE"), "{err}");
    }

    #[test]
    fn every_unset_variable_is_named_in_one_run() {
        let err = expand(
            "a = \"${ONE}\"\nb = \"${SET}\"\nc = \"${TWO}-${THREE}\"\n",
            env,
        )
        .unwrap_err();
        let lines: Vec<usize> = err.0.iter().map(|e| e.line).collect();
        assert_eq!(lines, [1, 3, 3]);
        let text = err.to_string();
        for name in ["ONE", "TWO", "THREE"] {
            assert!(text.contains(name), "{text}");
        }
    }

    #[test]
    fn comments_escape_and_bad_syntax() {
        assert_eq!(
            expand("a = 1 # see ${NOPE}\n", env).unwrap(),
            "a = 1 # see ${NOPE}\n"
        );
        assert_eq!(expand("a = \"#${SET}\"", env).unwrap(), "a = \"#value\"");
        assert_eq!(expand("a = \"$${X}\"", env).unwrap(), "a = \"${X}\"");
        assert!(expand("a = \"${SET\"", env).is_err());
        assert!(expand("a = \"${1X}\"", env).is_err());
        assert!(expand("a = \"${}\"", env).is_err());
    }
}
