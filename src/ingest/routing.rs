//! Filtering and routing rules, evaluated in order before storage. Pure code.
//!
//! `ROUTING_RULES` is a JSON array; the first rule whose `event_type` and `service` globs
//! match decides, and an event no rule matches is stored:
//!
//! ```json
//! [
//!   {"name": "drop-views", "event_type": "user.profile_viewed", "action": "skip"},
//!   {"name": "searches", "event_type": "user.search_*", "service": "user-service",
//!    "action": "forward", "topic": "user-searches", "store": true}
//! ]
//! ```
//!
//! `skip` neither stores nor dead-letters (the event is counted per rule); `forward` copies the
//! original record to `topic`, in addition to storing it (`"store": true`, the default) or
//! instead of it (`"store": false`). Globs know `*` (any run of characters) and `?` (one).

use serde::Deserialize;

/// What a rule does with a matching event.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Action {
    Store,
    Skip,
    Forward { topic: String, store: bool },
}

fn any() -> String {
    "*".into()
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: String,
    #[serde(default = "any")]
    event_type: String,
    #[serde(default = "any")]
    service: String,
    action: String,
    #[serde(default)]
    topic: Option<String>,
    #[serde(default)]
    store: Option<bool>,
}

/// One validated rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Label in `analytics_routing_rule_hits_total{rule=…}`.
    pub name: String,
    event_type: String,
    service: String,
    action: Action,
}

/// The outcome for one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision<'a> {
    /// Write the event to `analytics.events`.
    pub store: bool,
    /// Copy the original record to this topic.
    pub forward: Option<&'a str>,
    /// The rule that decided (`None`: no rule matched, stored by default).
    pub rule: Option<&'a str>,
}

/// An ordered rule list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rules {
    rules: Vec<Rule>,
}

impl Rules {
    /// Parses and checks a JSON rule list; the error says which rule is wrong and why.
    pub fn parse(json: &str) -> Result<Self, String> {
        let raw: Vec<RawRule> =
            serde_json::from_str(json).map_err(|e| format!("not a valid rule list: {e}"))?;
        let mut rules = Vec::with_capacity(raw.len());
        for (i, r) in raw.into_iter().enumerate() {
            let which = format!("rule {} ({:?})", i + 1, r.name);
            if r.name.is_empty()
                || !r.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(format!("{which}: name must be letters, digits, '-' or '_'"));
            }
            if rules.iter().any(|x: &Rule| x.name == r.name) {
                return Err(format!("{which}: duplicate name"));
            }
            if r.event_type.is_empty() || r.service.is_empty() {
                return Err(format!("{which}: event_type and service patterns must not be empty"));
            }
            let action = match (r.action.as_str(), r.topic, r.store) {
                ("store", None, None) => Action::Store,
                ("skip", None, None) => Action::Skip,
                ("forward", Some(topic), store) if !topic.trim().is_empty() => {
                    Action::Forward { topic, store: store.unwrap_or(true) }
                }
                ("forward", _, _) => return Err(format!("{which}: forward needs a topic")),
                ("store" | "skip", _, _) => {
                    return Err(format!("{which}: topic and store apply to forward only"));
                }
                (other, _, _) => {
                    return Err(format!(
                        "{which}: unknown action {other:?} (store, skip or forward)"
                    ));
                }
            };
            rules.push(Rule { name: r.name, event_type: r.event_type, service: r.service, action });
        }
        Ok(Self { rules })
    }

    /// True when there are no rules (every event is stored).
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Rule names, for pre-registering metric series.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.rules.iter().map(|r| r.name.as_str())
    }

    /// Topics that rules forward to.
    pub fn forward_topics(&self) -> impl Iterator<Item = &str> {
        self.rules.iter().filter_map(|r| match &r.action {
            Action::Forward { topic, .. } => Some(topic.as_str()),
            _ => None,
        })
    }

    /// Decides what happens to an event.
    pub fn decide(&self, event_type: &str, service: &str) -> Decision<'_> {
        for rule in &self.rules {
            if glob(&rule.event_type, event_type) && glob(&rule.service, service) {
                let rule_name = Some(rule.name.as_str());
                return match &rule.action {
                    Action::Store => Decision { store: true, forward: None, rule: rule_name },
                    Action::Skip => Decision { store: false, forward: None, rule: rule_name },
                    Action::Forward { topic, store } => {
                        Decision { store: *store, forward: Some(topic), rule: rule_name }
                    }
                };
            }
        }
        Decision { store: true, forward: None, rule: None }
    }
}

/// Glob match with `*` and `?`, linear time (backtracks only to the last `*`).
pub fn glob(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob("*", ""));
        assert!(glob("user.*", "user.login"));
        assert!(!glob("user.*", "admin.login"));
        assert!(glob("user.?ogin", "user.login"));
        assert!(glob("*.log*", "user.logout"));
        assert!(glob("a*b*c", "axxbyyc"));
        assert!(!glob("a*b*c", "axxbyy"));
        assert!(glob("user.login", "user.login"));
        assert!(!glob("user.login", "user.login2"));
    }

    #[test]
    fn first_match_decides_and_default_stores() {
        let rules = Rules::parse(
            r#"[
            {"name":"views","event_type":"user.profile_viewed","action":"skip"},
            {"name":"search","event_type":"user.search_*","service":"user-service","action":"forward","topic":"searches"},
            {"name":"only-fwd","event_type":"user.*","service":"billing","action":"forward","topic":"b","store":false},
            {"name":"rest","event_type":"user.*","action":"store"}
        ]"#,
        )
        .unwrap();
        assert_eq!(
            rules.decide("user.profile_viewed", "user-service"),
            Decision { store: false, forward: None, rule: Some("views") }
        );
        assert_eq!(
            rules.decide("user.search_performed", "user-service"),
            Decision { store: true, forward: Some("searches"), rule: Some("search") }
        );
        assert_eq!(
            rules.decide("user.search_performed", "other"),
            Decision { store: true, forward: None, rule: Some("rest") }
        );
        assert_eq!(
            rules.decide("user.paid", "billing"),
            Decision { store: false, forward: Some("b"), rule: Some("only-fwd") }
        );
        assert_eq!(
            rules.decide("order.created", "shop"),
            Decision { store: true, forward: None, rule: None }
        );
        assert_eq!(rules.forward_topics().collect::<Vec<_>>(), vec!["searches", "b"]);
    }

    #[test]
    fn invalid_rules_are_explained() {
        for (json, want) in [
            ("{", "not a valid rule list"),
            (r#"[{"name":"a","action":"teleport"}]"#, "unknown action"),
            (r#"[{"name":"a","action":"skip","topic":"t"}]"#, "forward only"),
            (r#"[{"name":"a","action":"forward","topic":" "}]"#, "forward needs a topic"),
            (r#"[{"name":"a b","action":"skip"}]"#, "name must be"),
            (r#"[{"name":"a","action":"skip"},{"name":"a","action":"store"}]"#, "duplicate name"),
            (r#"[{"name":"a","action":"skip","colour":"red"}]"#, "not a valid rule list"),
        ] {
            let err = Rules::parse(json).unwrap_err();
            assert!(err.contains(want), "{json}: {err}");
        }
        assert!(Rules::parse("[]").unwrap().is_empty());
    }
}
