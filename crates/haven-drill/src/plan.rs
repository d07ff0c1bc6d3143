//! Recovery plans: several services brought back in dependency order (the database tier,
//! then the API tier, then the web tier), each only after what it depends on passed its
//! health gate. This module reads and orders a plan; `haven plan run` carries it out, in
//! drill sandboxes or for real.
//!
//! ```toml
//! [[service]]
//! name = "db"
//! config = "n1.toml"          # the node config naming the service (relative to the plan)
//! gate = "GET /health 200"    # an HTTP check, as `haven drill --check-http`
//! gate_timeout = "30s"        # default 60s
//! pre = "./before-db.sh"      # optional, sh -c, before the service is brought up
//! post = "./after-db.sh"      # optional, after its gate passed
//! admin = "10.1.0.5:7101"     # failover only: a node of the service's standby site
//! url = "http://10.1.0.5:7001/db"  # failover only: the service at the standby site
//!
//! [[service]]
//! name = "api"
//! depends_on = ["db"]
//! ...
//! ```

use std::collections::BTreeMap;
use std::path::Path;
use std::path::PathBuf;
use std::time::Duration;

use haven_base::checks::HttpCheck;
use haven_base::checks::parse_interval;
use serde::Deserialize;
use toml::Spanned;

/// How long a gate waits for its check to pass unless `gate_timeout` says otherwise.
pub const DEFAULT_GATE_TIMEOUT: Duration = Duration::from_secs(60);
/// Services in one plan.
pub const MAX_STEPS: usize = 64;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid plan {path}: {reason}")]
pub struct BadPlan {
    pub path: String,
    pub reason: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PlanFile {
    service: Vec<StepFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StepFile {
    name: Spanned<String>,
    config: Option<PathBuf>,
    #[serde(default)]
    depends_on: Vec<String>,
    gate: Spanned<String>,
    gate_timeout: Option<Spanned<String>>,
    pre: Option<String>,
    post: Option<String>,
    admin: Option<String>,
    url: Option<String>,
}

/// One service of a plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub name: String,
    /// The node config naming the service (a drill reads archive and app from it).
    pub config: Option<PathBuf>,
    pub depends_on: Vec<String>,
    pub gate: HttpCheck,
    pub gate_timeout: Duration,
    pub pre: Option<String>,
    pub post: Option<String>,
    /// For a failover: a node of the standby site to promote, and the service's base URL
    /// there, where the gate is checked.
    pub admin: Option<String>,
    pub url: Option<String>,
}

/// A plan's services in an order where each comes after what it depends on (and, among
/// those free to go, in the file's order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub steps: Vec<Step>,
}

impl Plan {
    pub fn load(path: &Path) -> Result<Self, BadPlan> {
        let text = std::fs::read_to_string(path).map_err(|e| BadPlan {
            path: path.display().to_string(),
            reason: format!("cannot read it: {e}"),
        })?;
        Self::parse(&text, path)
    }

    /// Configs are read relative to the plan's directory.
    pub fn parse(text: &str, path: &Path) -> Result<Self, BadPlan> {
        let bad = |reason: String| BadPlan {
            path: path.display().to_string(),
            reason,
        };
        let at = |span: std::ops::Range<usize>| line_of(text, span.start);
        let file: PlanFile = toml::from_str(text).map_err(|e| bad(e.to_string().trim().into()))?;
        if file.service.is_empty() || file.service.len() > MAX_STEPS {
            return Err(bad(format!(
                "a plan names 1 to {MAX_STEPS} services ([[service]] tables); this one names {}",
                file.service.len()
            )));
        }
        let base = path.parent().unwrap_or(Path::new("."));
        let mut steps: Vec<Step> = Vec::with_capacity(file.service.len());
        let mut lines = BTreeMap::new();
        for raw in file.service {
            let name = raw.name.get_ref().clone();
            if lines.insert(name.clone(), at(raw.name.span())).is_some() {
                return Err(bad(format!(
                    "service `{name}` (line {}) appears twice",
                    at(raw.name.span())
                )));
            }
            steps.push(step(raw, base, at).map_err(bad)?);
        }
        check_dependencies(&steps, &lines).map_err(bad)?;
        Ok(Self {
            steps: in_order(steps),
        })
    }
}

fn step(
    raw: StepFile,
    base: &Path,
    at: impl Fn(std::ops::Range<usize>) -> usize,
) -> Result<Step, String> {
    let name = raw.name.get_ref().clone();
    let gate = HttpCheck::parse(raw.gate.get_ref())
        .map_err(|e| format!("gate of `{name}` (line {}): {e}", at(raw.gate.span())))?;
    let gate_timeout = match &raw.gate_timeout {
        None => DEFAULT_GATE_TIMEOUT,
        Some(text) => parse_interval(text.get_ref())
            .map_err(|e| format!("gate_timeout of `{name}` (line {}): {e}", at(text.span())))?,
    };
    Ok(Step {
        name,
        config: raw.config.map(|c| base.join(c)),
        depends_on: raw.depends_on,
        gate,
        gate_timeout,
        pre: raw.pre,
        post: raw.post,
        admin: raw.admin,
        url: raw.url,
    })
}

/// Every dependency is a service of the plan, and none depends on itself through others.
fn check_dependencies(steps: &[Step], lines: &BTreeMap<String, usize>) -> Result<(), String> {
    let deps: BTreeMap<&str, &[String]> = (steps.iter())
        .map(|s| (s.name.as_str(), s.depends_on.as_slice()))
        .collect();
    for step in steps {
        if let Some(unknown) = step
            .depends_on
            .iter()
            .find(|d| !deps.contains_key(d.as_str()))
        {
            return Err(format!(
                "service `{}` (line {}) depends on `{unknown}`, which the plan does not name",
                step.name, lines[&step.name]
            ));
        }
    }
    for step in steps {
        if let Some(cycle) = cycle_from(&step.name, &deps) {
            return Err(format!(
                "a cycle of dependencies: {} (service `{}`, line {})",
                cycle.join(" → "),
                step.name,
                lines[&step.name]
            ));
        }
    }
    Ok(())
}

/// The path back to `start` through its dependencies, if there is one.
fn cycle_from(start: &str, deps: &BTreeMap<&str, &[String]>) -> Option<Vec<String>> {
    let mut path = vec![start.to_string()];
    let mut seen = std::collections::BTreeSet::new();
    walk(start, start, deps, &mut path, &mut seen).then_some(path)
}

fn walk(
    start: &str,
    at: &str,
    deps: &BTreeMap<&str, &[String]>,
    path: &mut Vec<String>,
    seen: &mut std::collections::BTreeSet<String>,
) -> bool {
    for next in deps.get(at).copied().unwrap_or_default() {
        path.push(next.clone());
        if next == start {
            return true;
        }
        if seen.insert(next.clone()) && walk(start, next, deps, path, seen) {
            return true;
        }
        path.pop();
    }
    false
}

/// Kahn's order, taking ready services in the file's order (the plan has no cycle).
fn in_order(mut pending: Vec<Step>) -> Vec<Step> {
    let mut ordered: Vec<Step> = Vec::with_capacity(pending.len());
    while !pending.is_empty() {
        let ready = (pending.iter())
            .position(|s| (s.depends_on.iter()).all(|d| ordered.iter().any(|o| &o.name == d)))
            .unwrap_or(0);
        ordered.push(pending.remove(ready));
    }
    ordered
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Plan, String> {
        Plan::parse(text, Path::new("/plans/p.toml")).map_err(|e| e.to_string())
    }

    const THREE: &str = r#"
[[service]]
name = "web"
config = "n1.toml"
depends_on = ["api"]
gate = "GET /count 200"

[[service]]
name = "db"
config = "n1.toml"
gate = "GET /count 200"
gate_timeout = "5s"

[[service]]
name = "api"
config = "/etc/n2.toml"
depends_on = ["db"]
gate = "GET /count 200"
"#;

    #[test]
    fn a_plan_is_ordered_by_its_dependencies() {
        let plan = parse(THREE).unwrap();
        let names: Vec<&str> = plan.steps.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["db", "api", "web"]);
        assert_eq!(plan.steps[0].gate_timeout, Duration::from_secs(5));
        assert_eq!(plan.steps[2].gate_timeout, DEFAULT_GATE_TIMEOUT);
        assert_eq!(plan.steps[0].config, Some(PathBuf::from("/plans/n1.toml")));
        assert_eq!(plan.steps[1].config, Some(PathBuf::from("/etc/n2.toml")));
    }

    #[test]
    fn cycles_unknown_services_and_bad_gates_are_refused_with_their_line() {
        let cyclic = THREE.replace(
            "name = \"db\"\nconfig = \"n1.toml\"\n",
            "name = \"db\"\nconfig = \"n1.toml\"\ndepends_on = [\"web\"]\n",
        );
        assert_eq!(
            parse(&cyclic).unwrap_err(),
            "invalid plan /plans/p.toml: a cycle of dependencies: web → api → db → web (service `web`, line 3)"
        );
        let unknown = THREE.replace("depends_on = [\"db\"]", "depends_on = [\"cache\"]");
        assert_eq!(
            parse(&unknown).unwrap_err(),
            "invalid plan /plans/p.toml: service `api` (line 15) depends on `cache`, which the plan does not name"
        );
        let twice = THREE.replace("name = \"api\"", "name = \"db\"");
        assert_eq!(
            parse(&twice).unwrap_err(),
            "invalid plan /plans/p.toml: service `db` (line 15) appears twice"
        );
        let gate = THREE.replace("gate_timeout = \"5s\"", "gate_timeout = \"5\"");
        assert!(parse(&gate).unwrap_err().starts_with(
            "invalid plan /plans/p.toml: gate_timeout of `db` (line 12): \"5\": no unit"
        ),);
        let check = THREE.replacen("gate = \"GET /count 200\"", "gate = \"GET count 200\"", 1);
        assert!(
            parse(&check).unwrap_err().starts_with("invalid plan /plans/p.toml: gate of `web` (line 6): check \"GET count 200\": the path must start with /"),
        );
        let unknown_key = format!("{THREE}colour = \"red\"\n");
        let e = parse(&unknown_key).unwrap_err();
        assert!(
            e.contains("unknown field `colour`") && e.contains("line 19"),
            "{e}"
        );
    }
}
