//! Config keys set from the environment, for deployments that template one file and vary
//! a few keys per node (containers, systemd drop-ins): `HAVEN_NODE__CLIENT_ADDR=...`
//! overrides `[node] client_addr`. A variable names a key as the path of its tables,
//! upper-cased and joined with `__`; a segment inside an array of tables is its index
//! from 0 (`HAVEN_PEERS__2__RAFT_ADDR`) or, for `[[service]]`, its name
//! (`HAVEN_SERVICE__ORDERS__APP__URL`, `_` standing for `-`). Only names with a `__` are
//! keys, so `HAVEN_ADMIN_TOKEN` and the like keep their own meaning.

use toml::Table;
use toml::Value;

/// What every override variable starts with.
pub const PREFIX: &str = "HAVEN_";
/// What separates the tables and the key in a variable's name.
pub const SEPARATOR: &str = "__";

/// One `HAVEN_...` variable, read as the key it names and its new value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Override {
    /// The variable's name, for errors.
    pub var: String,
    /// Lower-cased segments: tables, array indexes or service names, then the key.
    path: Vec<String>,
    value: String,
}

impl Override {
    /// The override variables among `vars` (each a config key), in name order so that
    /// errors come out the same on every run.
    pub fn from_vars(vars: impl IntoIterator<Item = (String, String)>) -> Vec<Override> {
        let mut overrides: Vec<Override> = vars
            .into_iter()
            .filter_map(|(var, value)| {
                let rest = var.strip_prefix(PREFIX)?;
                if !rest.contains(SEPARATOR) {
                    return None;
                }
                let path = rest.split(SEPARATOR).map(str::to_lowercase).collect();
                Some(Override { var, path, value })
            })
            .collect();
        overrides.sort_by(|a, b| a.var.cmp(&b.var));
        overrides
    }

    /// The process's own override variables (names or values that are not UTF-8 cannot
    /// name a key, and are left out).
    pub fn from_env() -> Vec<Override> {
        Self::from_vars(
            std::env::vars_os()
                .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?))),
        )
    }

    /// Sets the key in `table`, creating the tables on its path that the file lacks
    /// (never array elements). The reason when the path cannot be followed.
    pub fn apply(&self, table: &mut Table) -> Result<(), String> {
        let (key, tables) = self
            .path
            .split_last()
            .ok_or_else(|| "names no key".to_string())?;
        if key.is_empty() || tables.iter().any(String::is_empty) {
            return Err("has an empty segment (four `_` in a row)".to_string());
        }
        let mut here = table;
        let mut walked = Vec::new();
        let mut segments = tables.iter();
        while let Some(segment) = segments.next() {
            walked.push(segment.as_str());
            let entry = here
                .entry(segment.clone())
                .or_insert_with(|| Value::Table(Table::new()));
            here = match entry {
                Value::Table(inner) => inner,
                Value::Array(elements) => {
                    let which = segments.next().ok_or_else(|| {
                        format!("`{}` is an array of tables: name an element after it (an index from 0, or a service's name)", walked.join("."))
                    })?;
                    walked.push(which.as_str());
                    element(elements, which).map_err(|e| format!("`{}`: {e}", walked.join(".")))?
                }
                _ => return Err(format!("`{}`: is a value, not a table", walked.join("."))),
            };
        }
        let value = parse_value(&self.value, here.get(key.as_str()));
        here.insert(key.clone(), value);
        Ok(())
    }
}

/// One element of an array of tables, by index or by its `name`.
fn element<'a>(elements: &'a mut [Value], segment: &str) -> Result<&'a mut Table, String> {
    let len = elements.len();
    let found = match segment.parse::<usize>() {
        Ok(i) => elements.get_mut(i),
        Err(_) => elements.iter_mut().find(|e| named(e, segment)),
    };
    match found {
        Some(Value::Table(inner)) => Ok(inner),
        Some(_) => Err("is not an array of tables".to_string()),
        None => Err(format!(
            "the file has no element `{segment}` ({len} written; an index from 0, or a service's name)"
        )),
    }
}

/// Whether an array element is the table whose `name` the segment spells (`_` for `-`).
fn named(element: &Value, segment: &str) -> bool {
    let name = element.get("name").and_then(Value::as_str);
    name.is_some_and(|n| n.replace('-', "_").eq_ignore_ascii_case(segment))
}

/// A variable's value as TOML: numbers, booleans, arrays and quoted strings as written;
/// anything else, or anything replacing a string, as a plain string, so addresses and
/// paths need no quotes.
fn parse_value(text: &str, replaced: Option<&Value>) -> Value {
    if let Some(Value::String(_)) = replaced {
        return Value::String(text.to_string());
    }
    let parsed = toml::from_str::<Table>(&format!("v = {text}"))
        .ok()
        .and_then(|mut t| t.remove("v"));
    parsed.unwrap_or_else(|| Value::String(text.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Vec<Override> {
        Override::from_vars(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())))
    }

    fn applied(file: &str, pairs: &[(&str, &str)]) -> Result<Table, String> {
        let mut table: Table = toml::from_str(file).unwrap();
        for o in vars(pairs) {
            o.apply(&mut table).map_err(|e| format!("{}: {e}", o.var))?;
        }
        Ok(table)
    }

    #[test]
    fn only_names_with_a_separator_are_keys() {
        let found = vars(&[
            ("HAVEN_ADMIN_TOKEN", "secret"),
            ("HAVEN_KEEP_TEST_DIRS", "1"),
            ("PATH", "/bin"),
            ("HAVEN_NODE__ID", "2"),
        ]);
        assert_eq!(
            found.iter().map(|o| o.var.as_str()).collect::<Vec<_>>(),
            ["HAVEN_NODE__ID"]
        );
    }

    #[test]
    fn values_keep_their_type_and_strings_need_no_quotes() {
        let file = "[node]\nid = 1\nzone = \"a\"\n";
        let table = applied(
            file,
            &[
                ("HAVEN_NODE__ID", "2"),
                ("HAVEN_NODE__ZONE", "7"),
                ("HAVEN_NODE__CLIENT_ADDR", "127.0.0.1:8001"),
                ("HAVEN_NODE__JOIN", "true"),
                ("HAVEN_APP__COMMAND", r#"["app", "--port", "1"]"#),
            ],
        )
        .unwrap();
        let expected: Table = toml::from_str(
            r#"
            node = { id = 2, zone = "7", client_addr = "127.0.0.1:8001", join = true }
            app = { command = ["app", "--port", "1"] }
            "#,
        )
        .unwrap();
        assert_eq!(table, expected);
    }

    #[test]
    fn array_elements_are_reached_by_index_or_by_service_name() {
        let file = r#"
            [[peers]]
            id = 1
            [[service]]
            name = "order-book"
            [service.app]
            url = "http://a"
        "#;
        let table = applied(
            file,
            &[
                ("HAVEN_PEERS__0__ID", "9"),
                ("HAVEN_SERVICE__ORDER_BOOK__APP__URL", "http://b"),
            ],
        )
        .unwrap();
        assert_eq!(table["peers"][0]["id"].as_integer(), Some(9));
        assert_eq!(table["service"][0]["app"]["url"].as_str(), Some("http://b"));
        assert_eq!(
            applied(file, &[("HAVEN_PEERS__3__ID", "9")]).unwrap_err(),
            "HAVEN_PEERS__3__ID: `peers.3`: the file has no element `3` (1 written; an index from 0, or a service's name)"
        );
        assert_eq!(
            applied(file, &[("HAVEN_PEERS__0__ID__X", "9")]).unwrap_err(),
            "HAVEN_PEERS__0__ID__X: `peers.0.id`: is a value, not a table"
        );
        assert_eq!(
            applied(file, &[("HAVEN_NODE____ID", "9")]).unwrap_err(),
            "HAVEN_NODE____ID: has an empty segment (four `_` in a row)"
        );
    }
}
