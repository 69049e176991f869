//! Log features: counts by severity, configured patterns, and never-seen message templates.

use std::collections::{BTreeMap, HashSet, VecDeque};

use foresight_events::{LogStats, Severity};
use regex::RegexSet;
use serde::{Deserialize, Serialize};

/// Tokens of a message looked at for its template; the rest of a long message does not make it
/// a different one, and the work per record stays bounded.
const TEMPLATE_TOKENS: usize = 32;

/// The template of a log message: its whitespace-separated tokens with the variable ones masked.
/// A token is variable when it holds a digit (numbers, ids, addresses, durations, hex hashes
/// mostly do); in `key=value` tokens only the value is masked. So `took 35ms for user=7f3a` and
/// `took 120ms for user=99` share the template `took <*> for user=<*>`. It is Drain's first step,
/// without its similarity clustering: simple, deterministic and cheap.
pub(crate) fn template(body: &str) -> String {
    let mut out = String::with_capacity(body.len().min(256));
    for (i, token) in body.split_whitespace().take(TEMPLATE_TOKENS).enumerate() {
        if i > 0 {
            out.push(' ');
        }
        let (key, value) = match token.split_once('=') {
            Some((k, v)) if !k.is_empty() => (Some(k), v),
            _ => (None, token),
        };
        if let Some(k) = key {
            out.push_str(k);
            out.push('=');
        }
        if value.bytes().any(|b| b.is_ascii_digit()) {
            out.push_str("<*>");
        } else {
            out.push_str(value);
        }
    }
    out
}

/// A stable 64-bit id of a template (stable across processes and versions, as it is checkpointed).
fn template_id(template: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(template.as_bytes())
}

/// The templates one entity has logged, most recent `capacity` of them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct TemplateMemory {
    /// In order of first sight; the oldest is forgotten when full.
    order: VecDeque<u64>,
    #[serde(skip)]
    seen: HashSet<u64>,
}

impl TemplateMemory {
    /// Notes a message's template; true if it was never seen (or long forgotten).
    fn observe(&mut self, body: &str, capacity: usize) -> bool {
        let id = template_id(&template(body));
        if self.seen.contains(&id) {
            return false;
        }
        if self.order.len() >= capacity
            && let Some(old) = self.order.pop_front()
        {
            self.seen.remove(&old);
        }
        self.order.push_back(id);
        self.seen.insert(id);
        true
    }

    /// Rebuilds the lookup set after deserialisation.
    pub(crate) fn restored(mut self) -> Self {
        self.seen = self.order.iter().copied().collect();
        self
    }

    pub(crate) fn heap_bytes(&self) -> usize {
        self.order.capacity() * 8 + self.seen.capacity() * 9
    }
}

/// Configured log patterns.
#[derive(Debug, Clone)]
pub(crate) struct Patterns {
    names: Vec<String>,
    set: RegexSet,
}

impl Patterns {
    pub(crate) fn new(patterns: &BTreeMap<String, String>) -> Result<Self, (String, regex::Error)> {
        for (name, pattern) in patterns {
            regex::Regex::new(pattern).map_err(|e| (name.clone(), e))?;
        }
        let set = RegexSet::new(patterns.values()).map_err(|e| (String::new(), e))?;
        Ok(Self {
            names: patterns.keys().cloned().collect(),
            set,
        })
    }
}

/// One entity's log records within one pane.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct LogPane {
    count: u64,
    by_severity: BTreeMap<Severity, u64>,
    /// Matches per pattern, by the pattern's index.
    patterns: Vec<u64>,
    new_templates: u64,
}

impl LogPane {
    pub(crate) fn add(
        &mut self,
        severity: Severity,
        body: &str,
        patterns: &Patterns,
        templates: &mut TemplateMemory,
        template_capacity: usize,
    ) {
        self.count += 1;
        *self.by_severity.entry(severity).or_default() += 1;
        if !patterns.names.is_empty() {
            for i in patterns.set.matches(body).iter() {
                if self.patterns.len() <= i {
                    self.patterns.resize(i + 1, 0);
                }
                self.patterns[i] += 1;
            }
        }
        if templates.observe(body, template_capacity) {
            self.new_templates += 1;
        }
    }
}

/// Merges the log panes of one window into its statistics.
pub(crate) fn window_logs<'a>(
    panes: impl IntoIterator<Item = &'a LogPane>,
    patterns: &Patterns,
) -> Option<LogStats> {
    let mut stats: Option<LogStats> = None;
    for pane in panes {
        let s = stats.get_or_insert_with(LogStats::default);
        s.count += pane.count;
        for (severity, n) in &pane.by_severity {
            *s.by_severity.entry(*severity).or_default() += n;
        }
        for (i, n) in pane.patterns.iter().enumerate() {
            if *n > 0 {
                *s.patterns.entry(patterns.names[i].clone()).or_default() += n;
            }
        }
        s.new_templates += pane.new_templates;
    }
    if let Some(s) = &mut stats
        && s.count > 0
    {
        let errors: u64 = s.by_severity.range(Severity::Error..).map(|(_, n)| n).sum();
        s.error_rate = errors as f64 / s.count as f64;
        s.new_template_share = s.new_templates as f64 / s.count as f64;
    }
    stats
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_mask_variable_tokens() {
        assert_eq!(
            template("took 35ms for user=7f3a on 10.0.0.7"),
            "took <*> for user=<*> on <*>"
        );
        assert_eq!(
            template("took 120ms  for user=99 on 10.1.2.3"),
            template("took 35ms for user=7f3a on 10.0.0.7")
        );
        assert_ne!(template("disk full"), template("disk ok"));
        assert_eq!(template("a=b =5"), "a=b <*>");
    }

    #[test]
    fn new_templates_are_counted_once_and_memory_is_bounded() {
        let patterns = Patterns::new(&BTreeMap::from([
            ("oom".to_owned(), "(?i)out of memory".to_owned()),
            ("timeout".to_owned(), "timed? ?out".to_owned()),
        ]))
        .unwrap();
        let mut memory = TemplateMemory::default();
        let mut pane = LogPane::default();
        for (severity, body) in [
            (Severity::Info, "request 1 took 5ms"),
            (Severity::Info, "request 2 took 7ms"),
            (Severity::Error, "Out of memory: killed process 4242"),
            (Severity::Fatal, "upstream timed out after 30s"),
        ] {
            pane.add(severity, body, &patterns, &mut memory, 2);
        }
        let stats = window_logs([&pane], &patterns).unwrap();
        assert_eq!(stats.count, 4);
        assert_eq!(stats.new_templates, 3);
        assert_eq!(stats.error_rate, 0.5);
        assert_eq!(stats.new_template_share, 0.75);
        assert_eq!(stats.patterns["oom"], 1);
        assert_eq!(stats.patterns["timeout"], 1);
        // Capacity 2: the first template was forgotten, so it is new again.
        assert_eq!(memory.order.len(), 2);
        let mut again = LogPane::default();
        again.add(
            Severity::Info,
            "request 9 took 1ms",
            &patterns,
            &mut memory,
            2,
        );
        assert_eq!(again.new_templates, 1);
        // A restored memory behaves as the original.
        let restored = memory.clone().restored();
        assert_eq!(restored.seen, memory.seen);
    }

    #[test]
    fn bad_patterns_are_named() {
        let err =
            Patterns::new(&BTreeMap::from([("broken".to_owned(), "(".to_owned())])).unwrap_err();
        assert_eq!(err.0, "broken");
    }
}
