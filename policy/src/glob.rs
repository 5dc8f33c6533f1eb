//! Globs, compiled to anchored regular expressions when a policy loads.

use regex::Regex;

/// A compiled glob.
#[derive(Debug, Clone)]
pub struct Glob {
    regex: Regex,
}

/// How a glob treats separators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GlobKind {
    /// `*` matches anything (names, namespaces).
    Plain,
    /// `*` matches within one `.`-separated part (`public.*`, `*.ssn`).
    Dotted,
    /// `*` matches one path segment, `**` any number (`/subscriptions/*/**`). Case-
    /// insensitive, because the APIs it guards (Azure Resource Manager) are.
    Path,
}

impl Glob {
    /// Compiles `pattern`; `?` matches one character, `*` and `**` as [`GlobKind`] says.
    pub fn new(pattern: &str, kind: GlobKind) -> Result<Self, regex::Error> {
        let mut re = String::from(if kind == GlobKind::Path { "(?i)^" } else { "^" });
        let (star, question) = match kind {
            GlobKind::Plain => (".*", "."),
            GlobKind::Dotted => ("[^.]*", "[^.]"),
            GlobKind::Path => ("[^/]*", "[^/]"),
        };
        let mut chars = pattern.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '*' if chars.peek() == Some(&'*') => {
                    chars.next();
                    // `/**` at the end also matches the bare prefix.
                    if kind == GlobKind::Path && re.ends_with('/') && chars.peek().is_none() {
                        re.pop();
                        re.push_str("(/.*)?");
                    } else {
                        re.push_str(".*");
                    }
                }
                '*' => re.push_str(star),
                '?' => re.push_str(question),
                c => re.push_str(&regex::escape(&c.to_string())),
            }
        }
        re.push('$');
        Ok(Self {
            regex: Regex::new(&re)?,
        })
    }

    /// Whether `text` matches.
    pub fn is_match(&self, text: &str) -> bool {
        self.regex.is_match(text)
    }
}

/// True when `globs` is empty (no constraint) or any of them matches.
pub fn any_match(globs: &[Glob], text: &str) -> bool {
    globs.is_empty() || globs.iter().any(|g| g.is_match(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(pattern: &str, kind: GlobKind, text: &str) -> bool {
        Glob::new(pattern, kind).expect("valid glob").is_match(text)
    }

    #[test]
    fn path_globs() {
        assert!(m(
            "/subscriptions/*/**",
            GlobKind::Path,
            "/subscriptions/abc/resourceGroups/rg"
        ));
        assert!(m(
            "/subscriptions/*/**",
            GlobKind::Path,
            "/subscriptions/abc"
        ));
        assert!(m(
            "/subscriptions/*/**",
            GlobKind::Path,
            "/SUBSCRIPTIONS/abc/x"
        ));
        assert!(!m("/subscriptions/*/**", GlobKind::Path, "/subscriptions"));
        assert!(!m("/subscriptions/*", GlobKind::Path, "/subscriptions/a/b"));
        assert!(m("/a/*/c", GlobKind::Path, "/a/b/c"));
        assert!(!m("/a/*/c", GlobKind::Path, "/a/b/x/c"));
        assert!(m("/a/**/c", GlobKind::Path, "/a/b/x/c"));
        assert!(
            !m("/a.b", GlobKind::Path, "/aXb"),
            "regex metacharacters are literal"
        );
    }

    #[test]
    fn dotted_and_plain_globs() {
        assert!(m("public.*", GlobKind::Dotted, "public.orders"));
        assert!(!m("public.*", GlobKind::Dotted, "private.orders"));
        assert!(m("*.ssn", GlobKind::Dotted, "customers.ssn"));
        assert!(!m("*.ssn", GlobKind::Dotted, "customers.ssn_hash"));
        assert!(m("prod-*", GlobKind::Plain, "prod-eu.west"));
        assert!(m("web-?", GlobKind::Plain, "web-0"));
        assert!(!m("prod", GlobKind::Plain, "production"));
    }
}
