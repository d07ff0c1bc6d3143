//! Which failures a service's placement survives, from its voters' `zone` and `site`
//! labels (`[node]` for this node, `[[peers]]` for the others): any one node, any one
//! zone, a whole site. A Raft group keeps taking writes while a quorum of its voters is
//! up, so a failure is survived when the voters outside it are still a quorum; a site
//! loss the group cannot survive in place is recoverable when the service has an
//! off-site archive (a standby site is promoted from it).
//!
//! The availability figure is an estimate, from published cloud VM SLAs
//! ([`SLA_SINGLE`], [`SLA_SET`], [`SLA_ZONES`]), with its assumptions stated beside it.

use serde::Deserialize;
use serde::Serialize;

use haven_contract::NodeId;

/// Published monthly uptime of one VM (single instance).
pub const SLA_SINGLE: f64 = 0.999;
/// Of VMs spread over the fault domains of an availability set (one zone).
pub const SLA_SET: f64 = 0.9995;
/// Of VMs spread over availability zones.
pub const SLA_ZONES: f64 = 0.9999;
/// Minutes in a 30-day month, the SLAs' period.
const MINUTES_A_MONTH: f64 = 30.0 * 24.0 * 60.0;

/// What the estimate takes for granted.
const ASSUMPTIONS: [&str; 4] = [
    "published cloud VM SLAs: a single instance 99.9%, an availability set 99.95%, instances across availability zones 99.99%",
    "each node runs on a VM of its own; voters that share a zone are spread over its fault domains",
    "Haven and the app add no downtime of their own (a leader change takes under a second)",
    "the loss of a whole site is not in the figure",
];

/// One voter and where it is; `None`: not written in the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Voter {
    pub id: NodeId,
    pub zone: Option<String>,
    pub site: Option<String>,
}

/// The report in `/status` and `haven status`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Survivability {
    pub voters: usize,
    /// Voters that must be up for writes.
    pub quorum: usize,
    /// Any one node, any one zone, a whole site: in that order.
    pub failures: Vec<Failure>,
    pub warnings: Vec<String>,
    pub availability: Availability,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Failure {
    /// `any one node`, `any one zone`, `a whole site`.
    pub failure: String,
    pub outcome: Outcome,
    pub why: String,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// Writes go on.
    Survives,
    /// Writes stop; the off-site archive rebuilds the service at another site.
    Recoverable,
    /// Writes stop, or the data is lost.
    DoesNotSurvive,
    /// A voter's label is not written, so the report cannot tell.
    Unknown,
}

impl Outcome {
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Survives => "survives",
            Outcome::Recoverable => "recoverable",
            Outcome::DoesNotSurvive => "does not survive",
            Outcome::Unknown => "unknown",
        }
    }
}

/// An estimate, labelled as one, with what it assumes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Availability {
    /// E.g. `99.99%`.
    pub estimate: String,
    /// E.g. `about 4.3 minutes a month`.
    pub downtime: String,
    /// Which SLA the figure comes from, and why that one.
    pub basis: String,
    pub assumptions: Vec<String>,
}

/// Where every node the config names is: this node's `[node]` labels, and those its
/// `[[peers]]` entries give.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Placement {
    labels: std::collections::BTreeMap<NodeId, (Option<String>, Option<String>)>,
}

impl Placement {
    pub fn of(config: &haven_base::config::Config) -> Placement {
        let mut labels: std::collections::BTreeMap<_, _> = (config.peers.iter())
            .map(|p| (p.id, (p.zone.clone(), p.site.clone())))
            .collect();
        let node = &config.node;
        labels.insert(node.id, (Some(node.zone.clone()), Some(node.site.clone())));
        Placement { labels }
    }

    /// The voters with `ids`, each with its labels (none for a node the config does not
    /// name, such as a member added at run time).
    pub fn voters(&self, ids: &[NodeId]) -> Vec<Voter> {
        (ids.iter())
            .map(|id| {
                let (zone, site) = self.labels.get(id).cloned().unwrap_or_default();
                Voter {
                    id: *id,
                    zone,
                    site,
                }
            })
            .collect()
    }
}

/// The report for `voters`; `off_site`: the service has an off-site archive (or follows
/// one as a standby). None without voters (a standby runs no group).
pub fn assess(voters: &[Voter], off_site: bool) -> Option<Survivability> {
    if voters.is_empty() {
        return None;
    }
    let n = voters.len();
    let quorum = n / 2 + 1;
    let one_node = one_node(n, quorum);
    let zones = Groups::of(voters, |v| v.zone.as_deref());
    let sites = Groups::of(voters, |v| v.site.as_deref());
    let one_zone = one_zone(&zones, n, quorum);
    let site = whole_site(&sites, n, quorum, off_site);
    let availability = estimate(n, &one_node, &one_zone);
    Some(Survivability {
        voters: n,
        quorum,
        warnings: warnings(&zones, &sites, n, quorum, off_site),
        failures: vec![one_node, one_zone, site],
        availability,
    })
}

/// Voters by label: the largest group, how many groups, and who has no label.
struct Groups {
    largest: Option<(String, usize)>,
    count: usize,
    unlabelled: Vec<NodeId>,
}

impl Groups {
    fn of(voters: &[Voter], label: impl Fn(&Voter) -> Option<&str>) -> Groups {
        let mut sizes = std::collections::BTreeMap::<&str, usize>::new();
        let mut unlabelled = Vec::new();
        for voter in voters {
            match label(voter).filter(|l| !l.is_empty()) {
                Some(l) => *sizes.entry(l).or_default() += 1,
                None => unlabelled.push(voter.id),
            }
        }
        // Ties go to the first label in order, so the report is the same on every node.
        let largest = (sizes.iter())
            .rev()
            .max_by_key(|(_, size)| **size)
            .map(|(l, size)| (l.to_string(), *size));
        Groups {
            largest,
            count: sizes.len(),
            unlabelled,
        }
    }

    /// Why the report cannot tell, when some voter has no label.
    fn unknown(&self, what: &str) -> Option<String> {
        if self.unlabelled.is_empty() {
            return None;
        }
        let ids: Vec<String> = self.unlabelled.iter().map(|id| id.to_string()).collect();
        Some(format!(
            "the {what} of node {} is not known (write `{what}` in [node] and in [[peers]])",
            ids.join(", ")
        ))
    }
}

fn failure(failure: &str, outcome: Outcome, why: String) -> Failure {
    Failure {
        failure: failure.to_string(),
        outcome,
        why,
    }
}

fn one_node(n: usize, quorum: usize) -> Failure {
    match n > quorum {
        true => failure(
            "any one node",
            Outcome::Survives,
            format!("{n} voters, {quorum} needed: any {} can fail", n - quorum),
        ),
        false => failure(
            "any one node",
            Outcome::DoesNotSurvive,
            format!("{n} voters, {quorum} needed: losing any one stops writes"),
        ),
    }
}

fn one_zone(zones: &Groups, n: usize, quorum: usize) -> Failure {
    let name = "any one zone";
    if let Some(why) = zones.unknown("zone") {
        return failure(name, Outcome::Unknown, why);
    }
    let Some((zone, size)) = &zones.largest else {
        return failure(name, Outcome::Unknown, "no voter has a zone".to_string());
    };
    let spread = format!("{n} voters in {} zones", zones.count);
    match n - size >= quorum {
        true => failure(
            name,
            Outcome::Survives,
            format!("{spread}, at most {size} in one; {quorum} needed"),
        ),
        false => failure(
            name,
            Outcome::DoesNotSurvive,
            format!("{spread}: zone `{zone}` holds {size}; {quorum} needed"),
        ),
    }
}

fn whole_site(sites: &Groups, n: usize, quorum: usize, off_site: bool) -> Failure {
    let name = "a whole site";
    let archive = "the off-site archive rebuilds the service at another site (promote a standby; it loses the archive's lag unless ack = \"quorum+archive\")";
    let in_place = match (sites.unknown("site"), &sites.largest) {
        (Some(why), _) => Err(why),
        (None, Some((site, size))) if n - size < quorum => {
            Err(format!("site `{site}` holds {size} of {n} voters"))
        }
        (None, Some((_, size))) => Ok(format!(
            "{n} voters in {} sites, at most {size} in one; {quorum} needed",
            sites.count
        )),
        (None, None) => Err("no voter has a site".to_string()),
    };
    match (in_place, off_site) {
        (Ok(why), _) => failure(name, Outcome::Survives, why),
        (Err(why), true) => failure(name, Outcome::Recoverable, format!("{why}; {archive}")),
        (Err(why), false) if sites.unlabelled.is_empty() => failure(
            name,
            Outcome::DoesNotSurvive,
            format!("{why}, and the service has no off-site archive: the data is lost"),
        ),
        (Err(why), false) => failure(
            name,
            Outcome::Unknown,
            format!("{why}; the service has no off-site archive"),
        ),
    }
}

fn warnings(
    zones: &Groups,
    sites: &Groups,
    n: usize,
    quorum: usize,
    off_site: bool,
) -> Vec<String> {
    let mut warnings = Vec::new();
    if let Some((zone, size)) = &zones.largest
        && zones.unlabelled.is_empty()
        && *size >= quorum
    {
        warnings.push(format!(
            "zone `{zone}` holds {size} of {n} voters, a quorum: losing that zone stops writes (spread the voters over 3 zones)"
        ));
    }
    if let Some((site, size)) = &sites.largest
        && sites.unlabelled.is_empty()
        && *size == n
        && !off_site
    {
        warnings.push(format!(
            "every voter is at site `{site}` and the service has no off-site archive or standby: losing the site loses the data"
        ));
    }
    warnings
}

fn estimate(n: usize, one_node: &Failure, one_zone: &Failure) -> Availability {
    let (p, basis) = match (one_node.outcome, one_zone.outcome) {
        (Outcome::Survives, Outcome::Survives) => (
            SLA_ZONES,
            "the voters are spread over zones so that any one can fail: instances across zones"
                .to_string(),
        ),
        (Outcome::Survives, _) => (
            SLA_SET,
            "any one node can fail but not any one zone: an availability set".to_string(),
        ),
        _ => (
            SLA_SINGLE.powi(n as i32),
            format!("every one of the {n} voters is needed: {n} single instances in series"),
        ),
    };
    Availability {
        estimate: format!("{}%", trimmed(p * 100.0)),
        downtime: downtime((1.0 - p) * MINUTES_A_MONTH),
        basis,
        assumptions: ASSUMPTIONS.iter().map(|a| a.to_string()).collect(),
    }
}

/// `99.99`, `99.7003`: four decimals at most, no trailing zeros.
fn trimmed(percent: f64) -> String {
    let text = format!("{percent:.4}");
    text.trim_end_matches('0').trim_end_matches('.').to_string()
}

fn downtime(minutes: f64) -> String {
    match minutes < 60.0 {
        true => format!("about {minutes:.1} minutes a month"),
        false => format!("about {:.1} hours a month", minutes / 60.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn voters(placement: &[(&str, &str)]) -> Vec<Voter> {
        let label = |l: &str| (!l.is_empty()).then(|| l.to_string());
        (placement.iter().enumerate())
            .map(|(i, (zone, site))| Voter {
                id: i as u64 + 1,
                zone: label(zone),
                site: label(site),
            })
            .collect()
    }

    fn outcomes(report: &Survivability) -> Vec<(&str, Outcome)> {
        (report.failures.iter())
            .map(|f| (f.failure.as_str(), f.outcome))
            .collect()
    }

    #[test]
    fn three_zones_survive_a_zone_and_are_estimated_as_zones() {
        let report = assess(&voters(&[("a", "x"), ("b", "x"), ("c", "x")]), true).unwrap();
        assert_eq!((report.voters, report.quorum), (3, 2));
        assert_eq!(
            outcomes(&report),
            [
                ("any one node", Outcome::Survives),
                ("any one zone", Outcome::Survives),
                ("a whole site", Outcome::Recoverable),
            ]
        );
        assert_eq!(
            report.failures[1].why,
            "3 voters in 3 zones, at most 1 in one; 2 needed"
        );
        assert_eq!(report.warnings, Vec::<String>::new());
        assert_eq!(report.availability.estimate, "99.99%");
        assert_eq!(report.availability.downtime, "about 4.3 minutes a month");
        assert_eq!(report.availability.assumptions.len(), 4);
    }

    #[test]
    fn one_zone_warns_and_one_site_without_an_archive_loses_the_data() {
        let report = assess(&voters(&[("a", "x"), ("a", "x"), ("a", "x")]), false).unwrap();
        assert_eq!(
            outcomes(&report),
            [
                ("any one node", Outcome::Survives),
                ("any one zone", Outcome::DoesNotSurvive),
                ("a whole site", Outcome::DoesNotSurvive),
            ]
        );
        assert_eq!(
            report.warnings,
            [
                "zone `a` holds 3 of 3 voters, a quorum: losing that zone stops writes (spread the voters over 3 zones)",
                "every voter is at site `x` and the service has no off-site archive or standby: losing the site loses the data",
            ]
        );
        assert_eq!(report.availability.estimate, "99.95%");
        assert_eq!(report.availability.downtime, "about 21.6 minutes a month");
    }

    #[test]
    fn two_zones_hold_a_quorum_in_one_and_two_sites_survive_a_site() {
        let placement = [("a", "x"), ("a", "y"), ("b", "y"), ("b", "z"), ("c", "z")];
        let report = assess(&voters(&placement), false).unwrap();
        assert_eq!(
            outcomes(&report),
            [
                ("any one node", Outcome::Survives),
                ("any one zone", Outcome::Survives),
                ("a whole site", Outcome::Survives),
            ]
        );
        let placement = [("a", "x"), ("a", "x"), ("b", "y")];
        let report = assess(&voters(&placement), true).unwrap();
        assert_eq!(
            report.failures[1].why,
            "3 voters in 2 zones: zone `a` holds 2; 2 needed"
        );
        assert_eq!(
            report.failures[2].why,
            "site `x` holds 2 of 3 voters; the off-site archive rebuilds the service at another site (promote a standby; it loses the archive's lag unless ack = \"quorum+archive\")"
        );
        assert_eq!(report.warnings.len(), 1, "{:?}", report.warnings);
    }

    #[test]
    fn missing_labels_are_unknown_and_small_groups_are_instances_in_series() {
        let report = assess(&voters(&[("a", ""), ("", "")]), false).unwrap();
        assert_eq!(
            outcomes(&report),
            [
                ("any one node", Outcome::DoesNotSurvive),
                ("any one zone", Outcome::Unknown),
                ("a whole site", Outcome::Unknown),
            ]
        );
        assert_eq!(
            report.failures[1].why,
            "the zone of node 2 is not known (write `zone` in [node] and in [[peers]])"
        );
        assert_eq!(report.availability.estimate, "99.8001%");
        let single = assess(&voters(&[("a", "x")]), true).unwrap();
        assert_eq!(single.availability.estimate, "99.9%");
        assert_eq!(single.availability.downtime, "about 43.2 minutes a month");
        assert_eq!(assess(&[], true), None);
    }
}
