//! Decides how a request is served: ordered through the log, or read from the local replica
//! with some consistency. First matching rule wins; without a match, GET/HEAD/OPTIONS are
//! linearizable reads and every other method is a write.

use http::Method;

use haven_base::config::RouteMode;
use haven_base::config::RouteRule;

#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    rules: Vec<RouteRule>,
}

impl RouteTable {
    pub fn new(rules: Vec<RouteRule>) -> Self {
        Self { rules }
    }

    pub fn classify(&self, method: &Method, path: &str) -> RouteMode {
        let matched = self.rules.iter().find(|rule| {
            let method_ok =
                rule.methods.is_empty() || rule.methods.iter().any(|m| m == method.as_str());
            method_ok && path.starts_with(&rule.path_prefix)
        });
        match matched {
            Some(rule) => rule.mode,
            None if is_safe_method(method) => RouteMode::Linearizable,
            None => RouteMode::Write,
        }
    }
}

fn is_safe_method(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(methods: &[&str], prefix: &str, mode: RouteMode) -> RouteRule {
        RouteRule {
            methods: methods.iter().map(|m| m.to_string()).collect(),
            path_prefix: prefix.to_string(),
            mode,
        }
    }

    #[test]
    fn defaults_split_safe_methods_from_writes() {
        let table = RouteTable::default();
        assert_eq!(table.classify(&Method::GET, "/x"), RouteMode::Linearizable);
        assert_eq!(table.classify(&Method::HEAD, "/x"), RouteMode::Linearizable);
        assert_eq!(
            table.classify(&Method::OPTIONS, "/x"),
            RouteMode::Linearizable
        );
        assert_eq!(table.classify(&Method::POST, "/x"), RouteMode::Write);
        assert_eq!(table.classify(&Method::DELETE, "/x"), RouteMode::Write);
        assert_eq!(table.classify(&Method::PATCH, "/x"), RouteMode::Write);
    }

    #[test]
    fn first_matching_rule_wins() {
        let table = RouteTable::new(vec![
            rule(&["GET"], "/count", RouteMode::Local),
            rule(&["GET"], "/", RouteMode::Ordered),
            rule(&[], "/search", RouteMode::Local),
        ]);
        assert_eq!(table.classify(&Method::GET, "/count"), RouteMode::Local);
        assert_eq!(table.classify(&Method::GET, "/line/3"), RouteMode::Ordered);
        assert_eq!(table.classify(&Method::POST, "/search"), RouteMode::Local);
        assert_eq!(table.classify(&Method::POST, "/append"), RouteMode::Write);
    }
}
