//! Reading a node's `/metrics` page: one parser for the benchmarks, the demo and the
//! tests, so none of them depends on how the exporter orders labels.

/// The sum of every series of family `name` whose labels include each of `labels`, or
/// `None` when no series matches. `sum(page, "haven_app_up", &[("service", "orders")])`.
pub fn sum(page: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    page.lines()
        .filter_map(|line| series(line, name))
        .filter(|(found, _)| labels.iter().all(|wanted| found.contains(wanted)))
        .map(|(_, value)| value)
        .reduce(|a, b| a + b)
}

/// `name{k="v",...} value` → its labels and value, if the line is a series of `name`.
fn series<'a>(line: &'a str, name: &str) -> Option<(Vec<(&'a str, &'a str)>, f64)> {
    let rest = line.strip_prefix(name)?;
    let (labels, value) = match rest.strip_prefix('{') {
        Some(inside) => {
            let (labels, value) = inside.split_once('}')?;
            (parse_labels(labels)?, value)
        }
        None if rest.starts_with(' ') => (Vec::new(), rest),
        None => return None,
    };
    Some((labels, value.trim().parse().ok()?))
}

/// `k="v",k2="v2"` (values without escaped quotes, as Haven's labels are).
fn parse_labels(text: &str) -> Option<Vec<(&str, &str)>> {
    text.split(',')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=')?;
            Some((key, value.strip_prefix('"')?.strip_suffix('"')?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: &str = "# HELP haven_requests_total x\n\
        haven_requests_total{mode=\"write\",service=\"orders\"} 3\n\
        haven_requests_total{mode=\"local\",service=\"orders\"} 4\n\
        haven_requests_total{mode=\"write\",service=\"stock\"} 5\n\
        haven_requests_total_x 9\n\
        haven_peer_up 1\n";

    #[test]
    fn series_are_summed_over_the_labels_not_named() {
        assert_eq!(sum(PAGE, "haven_requests_total", &[]), Some(12.0));
        let orders = [("service", "orders")];
        assert_eq!(sum(PAGE, "haven_requests_total", &orders), Some(7.0));
        let one = [("service", "stock"), ("mode", "write")];
        assert_eq!(sum(PAGE, "haven_requests_total", &one), Some(5.0));
        assert_eq!(sum(PAGE, "haven_requests_total", &[("service", "x")]), None);
        assert_eq!(sum(PAGE, "haven_peer_up", &[]), Some(1.0));
        assert_eq!(sum(PAGE, "haven_peer", &[]), None);
    }
}
