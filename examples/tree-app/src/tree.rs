//! The pure, in-memory model of the namespace: no I/O, no clock, no randomness.
//!
//! [`Tree`] is what every replica of the tree app holds, and what a
//! linearizability checker replays as its reference model: feeding two trees the
//! same [`Op`]s in the same order gives equal trees and equal [`Outcome`]s.
//!
//! # Semantics (ZooKeeper's, without ephemeral or sequential nodes)
//!
//! - A node is named by an absolute path (see [`check_path`]). The root `/`
//!   always exists, starts with empty data and version `0`, and can be read,
//!   listed and set, but never created or deleted.
//! - [`Tree::create`] makes a node with version `0` under an existing parent.
//! - [`Tree::set`] replaces a node's data and adds one to its version; with
//!   `if_version: Some(v)` it is a compare-and-set that fails unless the node's
//!   version is `v`.
//! - [`Tree::delete`] removes a node that has no children, optionally only at
//!   version `v`.
//! - Every successful create, set and delete adds one to
//!   [`Tree::mutations`]; nothing else changes it.
//!
//! Errors are checked in a fixed order, so that a request that is wrong in two
//! ways always gets the same error: the path's syntax, then the root rules, then
//! the data's size, then the state (for create: node exists, then parent
//! missing; for set and delete: node missing, then version, then overflow or
//! children). A failed operation changes nothing.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// Largest node data, in bytes (1 MiB).
pub const MAX_DATA_LEN: usize = 1 << 20;

/// Largest path, in bytes.
pub const MAX_PATH_LEN: usize = 1024;

/// Largest path component, in bytes.
pub const MAX_NAME_LEN: usize = 255;

/// Why an operation was refused. The messages are the tree app's HTTP error
/// bodies, so they are part of the replicated behaviour: keep them stable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum TreeError {
    /// The path is not a valid node path; the text says why.
    #[error("bad path: {0}")]
    BadPath(String),
    /// `create /`.
    #[error("cannot create /: the root always exists")]
    CreateRoot,
    /// `delete /`.
    #[error("cannot delete /: the root always exists")]
    DeleteRoot,
    /// The node (or, for create, its parent) does not exist.
    #[error("no node: {0}")]
    NoNode(String),
    /// Create of a node that exists.
    #[error("node exists: {0}")]
    NodeExists(String),
    /// Delete of a node that has children.
    #[error("not empty: {0}")]
    NotEmpty(String),
    /// A compare-and-set whose expected version is not the node's.
    #[error("bad version: {path} has version {actual}, expected {expected}")]
    BadVersion {
        path: String,
        actual: u64,
        expected: u64,
    },
    /// Data above [`MAX_DATA_LEN`].
    #[error("data too large: {len} bytes, at most {MAX_DATA_LEN}")]
    DataTooLarge { len: u64 },
    /// A set of a node whose version is already `u64::MAX`.
    #[error("version overflow: {0} cannot be set again")]
    VersionOverflow(String),
}

/// One state-changing request (`Sync` changes nothing but is ordered like one).
///
/// Stored in the tree app's journal: append variants, never reorder them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    Create {
        path: String,
        data: Vec<u8>,
    },
    Set {
        path: String,
        data: Vec<u8>,
        if_version: Option<u64>,
    },
    Delete {
        path: String,
        if_version: Option<u64>,
    },
    Sync,
}

impl Op {
    /// Whether the op changes the tree when it succeeds (everything but `Sync`).
    pub fn changes_state(&self) -> bool {
        !matches!(self, Op::Sync)
    }
}

/// What a successful [`Op`] did.
///
/// Stored in the tree app's journal and snapshot: append variants, never
/// reorder them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Done {
    /// The node was created (with version `0`).
    Created { path: String },
    /// The node's data was replaced; `version` is its new version.
    Set { path: String, version: u64 },
    /// The node was deleted.
    Deleted,
    /// Nothing changed; `mutations` is [`Tree::mutations`] at that point.
    Synced { mutations: u64 },
}

/// The result of applying one [`Op`].
pub type Outcome = Result<Done, TreeError>;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Node {
    data: Vec<u8>,
    version: u64,
    children: BTreeSet<String>,
}

impl Node {
    fn new(data: Vec<u8>) -> Node {
        Node {
            data,
            version: 0,
            children: BTreeSet::new(),
        }
    }
}

/// The namespace. Iteration is always in byte order of paths and names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tree {
    /// Every node by absolute path, the root included.
    nodes: BTreeMap<String, Node>,
    mutations: u64,
}

impl Default for Tree {
    fn default() -> Tree {
        Tree::new()
    }
}

impl Tree {
    /// A tree holding only the root, with empty data and version `0`.
    pub fn new() -> Tree {
        Tree {
            nodes: BTreeMap::from([("/".to_owned(), Node::new(Vec::new()))]),
            mutations: 0,
        }
    }

    /// Number of successful creates, sets and deletes so far.
    pub fn mutations(&self) -> u64 {
        self.mutations
    }

    /// Every node as `(path, data, version)`, in byte order of paths.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[u8], u64)> {
        self.nodes
            .iter()
            .map(|(path, node)| (path.as_str(), node.data.as_slice(), node.version))
    }

    /// The data and version of the node at `path`.
    pub fn get(&self, path: &str) -> Result<(&[u8], u64), TreeError> {
        check_path(path)?;
        let node = self.node(path)?;
        Ok((&node.data, node.version))
    }

    /// The names of the children of the node at `path`, sorted.
    pub fn children(&self, path: &str) -> Result<Vec<&str>, TreeError> {
        check_path(path)?;
        Ok(self
            .node(path)?
            .children
            .iter()
            .map(String::as_str)
            .collect())
    }

    /// Creates the node at `path` with `data` and version `0`.
    pub fn create(&mut self, path: &str, data: Vec<u8>) -> Result<(), TreeError> {
        self.check_create(path, &data)?;
        self.commit(Op::Create {
            path: path.to_owned(),
            data,
        });
        Ok(())
    }

    /// Replaces the data of the node at `path` (only if its version is
    /// `if_version`, when given) and returns its new version.
    pub fn set(
        &mut self,
        path: &str,
        data: Vec<u8>,
        if_version: Option<u64>,
    ) -> Result<u64, TreeError> {
        let version = self.check_set(path, &data, if_version)?;
        self.commit(Op::Set {
            path: path.to_owned(),
            data,
            if_version,
        });
        Ok(version)
    }

    /// Deletes the node at `path`, which must have no children (and version
    /// `if_version`, when given).
    pub fn delete(&mut self, path: &str, if_version: Option<u64>) -> Result<(), TreeError> {
        self.check_delete(path, if_version)?;
        self.commit(Op::Delete {
            path: path.to_owned(),
            if_version,
        });
        Ok(())
    }

    /// Applies `op`: the same as calling the matching method.
    pub fn apply(&mut self, op: Op) -> Outcome {
        let outcome = self.check(&op);
        if outcome.is_ok() {
            self.commit(op);
        }
        outcome
    }

    /// What applying `op` would give, without applying it. The tree app checks
    /// first and commits only once the op is journaled, so a failed journal
    /// write leaves the tree untouched.
    pub fn check(&self, op: &Op) -> Outcome {
        match op {
            Op::Create { path, data } => self
                .check_create(path, data)
                .map(|()| Done::Created { path: path.clone() }),
            Op::Set {
                path,
                data,
                if_version,
            } => self
                .check_set(path, data, *if_version)
                .map(|version| Done::Set {
                    path: path.clone(),
                    version,
                }),
            Op::Delete { path, if_version } => {
                self.check_delete(path, *if_version).map(|()| Done::Deleted)
            }
            Op::Sync => Ok(Done::Synced {
                mutations: self.mutations,
            }),
        }
    }

    /// Applies an `op` that [`Tree::check`] accepted; it cannot fail.
    pub(crate) fn commit(&mut self, op: Op) {
        match op {
            Op::Create { path, data } => {
                if let Some((parent, name)) = self.parent_mut(&path) {
                    parent.children.insert(name.to_owned());
                }
                self.nodes.insert(path, Node::new(data));
            }
            Op::Set { path, data, .. } => {
                if let Some(node) = self.nodes.get_mut(&path) {
                    node.data = data;
                    // Checked: below u64::MAX.
                    node.version += 1;
                }
            }
            Op::Delete { path, .. } => {
                if let Some((parent, name)) = self.parent_mut(&path) {
                    parent.children.remove(name);
                }
                self.nodes.remove(&path);
            }
            Op::Sync => return,
        }
        self.mutations += 1;
    }

    /// The parent node of a non-root `path`, with the path's last component.
    fn parent_mut<'p>(&mut self, path: &'p str) -> Option<(&mut Node, &'p str)> {
        let (parent, name) = split(path)?;
        Some((self.nodes.get_mut(parent)?, name))
    }

    fn node(&self, path: &str) -> Result<&Node, TreeError> {
        self.nodes
            .get(path)
            .ok_or_else(|| TreeError::NoNode(path.to_owned()))
    }

    fn check_create(&self, path: &str, data: &[u8]) -> Result<(), TreeError> {
        check_path(path)?;
        let (parent, _) = split(path).ok_or(TreeError::CreateRoot)?;
        check_data(data)?;
        if self.nodes.contains_key(path) {
            return Err(TreeError::NodeExists(path.to_owned()));
        }
        self.node(parent).map(drop)
    }

    /// Returns the version the node will have after the set.
    fn check_set(
        &self,
        path: &str,
        data: &[u8],
        if_version: Option<u64>,
    ) -> Result<u64, TreeError> {
        check_path(path)?;
        check_data(data)?;
        let node = self.node(path)?;
        check_version(path, node, if_version)?;
        node.version
            .checked_add(1)
            .ok_or_else(|| TreeError::VersionOverflow(path.to_owned()))
    }

    fn check_delete(&self, path: &str, if_version: Option<u64>) -> Result<(), TreeError> {
        check_path(path)?;
        split(path).ok_or(TreeError::DeleteRoot)?;
        let node = self.node(path)?;
        check_version(path, node, if_version)?;
        if node.children.is_empty() {
            Ok(())
        } else {
            Err(TreeError::NotEmpty(path.to_owned()))
        }
    }
}

fn check_version(path: &str, node: &Node, if_version: Option<u64>) -> Result<(), TreeError> {
    match if_version {
        Some(expected) if expected != node.version => Err(TreeError::BadVersion {
            path: path.to_owned(),
            actual: node.version,
            expected,
        }),
        _ => Ok(()),
    }
}

fn check_data(data: &[u8]) -> Result<(), TreeError> {
    if data.len() > MAX_DATA_LEN {
        return Err(TreeError::DataTooLarge {
            len: data.len() as u64,
        });
    }
    Ok(())
}

/// `(parent, name)` of a valid non-root path; `None` for the root.
fn split(path: &str) -> Option<(&str, &str)> {
    let (parent, name) = path.rsplit_once('/')?;
    if name.is_empty() {
        return None;
    }
    Some((if parent.is_empty() { "/" } else { parent }, name))
}

/// Checks that `path` names a node: `/`, or `/` followed by components
/// separated by `/`, each non-empty, not `.` or `..`, at most [`MAX_NAME_LEN`]
/// bytes of printable ASCII (space to `~`, so no `/`), the whole at most
/// [`MAX_PATH_LEN`] bytes.
pub fn check_path(path: &str) -> Result<(), TreeError> {
    let bad = |reason: String| Err(TreeError::BadPath(reason));
    if path.len() > MAX_PATH_LEN {
        return bad(format!("{} bytes long, at most {MAX_PATH_LEN}", path.len()));
    }
    let Some(rest) = path.strip_prefix('/') else {
        return bad(format!("{path:?} does not start with /"));
    };
    if rest.is_empty() {
        return Ok(());
    }
    for name in rest.split('/') {
        if name.is_empty() {
            return bad(format!("empty component in {path:?}"));
        }
        if name == "." || name == ".." {
            return bad(format!("component {name:?} in {path:?}"));
        }
        if name.len() > MAX_NAME_LEN {
            return bad(format!(
                "component of {} bytes, at most {MAX_NAME_LEN}",
                name.len()
            ));
        }
        if let Some(c) = name.chars().find(|c| !(' '..='~').contains(c)) {
            return bad(format!(
                "character {c:?} in {path:?} is not printable ASCII"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bad(reason: &str) -> Result<(), TreeError> {
        Err(TreeError::BadPath(reason.to_owned()))
    }

    /// A tree with `/a` (data `a`) and `/a/b` (data `b`).
    fn ab() -> Tree {
        let mut tree = Tree::new();
        tree.create("/a", b"a".to_vec()).unwrap();
        tree.create("/a/b", b"b".to_vec()).unwrap();
        tree
    }

    #[test]
    fn root_exists_and_cannot_be_created_or_deleted() {
        let mut tree = Tree::new();
        assert_eq!(tree.get("/"), Ok((&b""[..], 0)));
        assert_eq!(tree.children("/"), Ok(vec![]));
        assert_eq!(tree.create("/", vec![]), Err(TreeError::CreateRoot));
        assert_eq!(tree.delete("/", None), Err(TreeError::DeleteRoot));
        assert_eq!(tree.delete("/", Some(0)), Err(TreeError::DeleteRoot));
        assert_eq!(tree.set("/", b"r".to_vec(), Some(0)), Ok(1));
        assert_eq!(tree.get("/"), Ok((&b"r"[..], 1)));
        assert_eq!(
            TreeError::CreateRoot.to_string(),
            "cannot create /: the root always exists"
        );
        assert_eq!(
            TreeError::DeleteRoot.to_string(),
            "cannot delete /: the root always exists"
        );
    }

    #[test]
    fn create_get_and_children() {
        let mut tree = ab();
        tree.create("/a/c", vec![]).unwrap();
        tree.create("/a-", vec![]).unwrap();
        assert_eq!(tree.get("/a/b"), Ok((&b"b"[..], 0)));
        assert_eq!(tree.children("/"), Ok(vec!["a", "a-"]));
        assert_eq!(tree.children("/a"), Ok(vec!["b", "c"]));
        assert_eq!(tree.children("/a/b"), Ok(vec![]));
        assert_eq!(tree.mutations(), 4);
    }

    #[test]
    fn create_errors() {
        let mut tree = ab();
        let before = tree.clone();
        let err = tree.create("/a/b", vec![]).unwrap_err();
        assert_eq!(err.to_string(), "node exists: /a/b");
        let err = tree.create("/x/y", vec![]).unwrap_err();
        assert_eq!(err.to_string(), "no node: /x");
        let err = tree.create("/x", vec![0; MAX_DATA_LEN + 1]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "data too large: 1048577 bytes, at most 1048576"
        );
        assert_eq!(tree, before, "failed creates change nothing");
        tree.create("/x", vec![0; MAX_DATA_LEN]).unwrap();
    }

    #[test]
    fn reads_of_missing_nodes() {
        let tree = ab();
        assert_eq!(tree.get("/a/x").unwrap_err().to_string(), "no node: /a/x");
        assert_eq!(tree.children("/z").unwrap_err().to_string(), "no node: /z");
    }

    #[test]
    fn set_increments_the_version_and_checks_it() {
        let mut tree = ab();
        assert_eq!(tree.set("/a/b", b"1".to_vec(), None), Ok(1));
        assert_eq!(tree.set("/a/b", b"2".to_vec(), Some(1)), Ok(2));
        let before = tree.clone();
        let err = tree.set("/a/b", b"3".to_vec(), Some(1)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "bad version: /a/b has version 2, expected 1"
        );
        let err = tree.set("/a/q", vec![], None).unwrap_err();
        assert_eq!(err.to_string(), "no node: /a/q");
        let err = tree.set("/a", vec![0; MAX_DATA_LEN + 1], None).unwrap_err();
        assert!(matches!(err, TreeError::DataTooLarge { len } if len == MAX_DATA_LEN as u64 + 1));
        assert_eq!(tree, before);
        assert_eq!(tree.get("/a/b"), Ok((&b"2"[..], 2)));
        // An unchanged value still counts as a set.
        assert_eq!(tree.set("/a/b", b"2".to_vec(), Some(2)), Ok(3));
        assert_eq!(tree.mutations(), 5);
    }

    #[test]
    fn set_refuses_to_overflow_the_version() {
        let mut tree = ab();
        if let Some(node) = tree.nodes.get_mut("/a") {
            node.version = u64::MAX;
        }
        let err = tree.set("/a", vec![], None).unwrap_err();
        assert_eq!(err.to_string(), "version overflow: /a cannot be set again");
        assert_eq!(tree.get("/a"), Ok((&b"a"[..], u64::MAX)));
    }

    #[test]
    fn delete_rules() {
        let mut tree = ab();
        tree.set("/a/b", vec![], None).unwrap();
        let err = tree.delete("/a", None).unwrap_err();
        assert_eq!(err.to_string(), "not empty: /a");
        // The version is checked before the children.
        let err = tree.delete("/a", Some(7)).unwrap_err();
        assert_eq!(err.to_string(), "bad version: /a has version 0, expected 7");
        let err = tree.delete("/a/b", Some(0)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "bad version: /a/b has version 1, expected 0"
        );
        let err = tree.delete("/nope", None).unwrap_err();
        assert_eq!(err.to_string(), "no node: /nope");
        tree.delete("/a/b", Some(1)).unwrap();
        assert_eq!(tree.children("/a"), Ok(vec![]));
        tree.delete("/a", None).unwrap();
        assert_eq!(tree, {
            let mut t = Tree::new();
            t.mutations = 5;
            t
        });
        // A deleted node can be created again, at version 0.
        tree.create("/a", b"new".to_vec()).unwrap();
        assert_eq!(tree.get("/a"), Ok((&b"new"[..], 0)));
    }

    #[test]
    fn apply_and_check_match_the_methods() {
        let mut tree = Tree::new();
        let create = Op::Create {
            path: "/k".to_owned(),
            data: b"v".to_vec(),
        };
        assert_eq!(
            tree.check(&create),
            Ok(Done::Created {
                path: "/k".to_owned()
            })
        );
        assert_eq!(tree, Tree::new(), "check changes nothing");
        assert!(tree.apply(create.clone()).is_ok());
        assert_eq!(
            tree.apply(create),
            Err(TreeError::NodeExists("/k".to_owned()))
        );
        let set = Op::Set {
            path: "/k".to_owned(),
            data: vec![],
            if_version: Some(0),
        };
        assert_eq!(
            tree.apply(set),
            Ok(Done::Set {
                path: "/k".to_owned(),
                version: 1
            })
        );
        assert_eq!(tree.apply(Op::Sync), Ok(Done::Synced { mutations: 2 }));
        let delete = Op::Delete {
            path: "/k".to_owned(),
            if_version: None,
        };
        assert_eq!(tree.apply(delete), Ok(Done::Deleted));
        assert_eq!(tree.apply(Op::Sync), Ok(Done::Synced { mutations: 3 }));
        assert!(!Op::Sync.changes_state());
    }

    #[test]
    fn iter_is_in_path_order() {
        let mut tree = ab();
        tree.create("/a-", b"z".to_vec()).unwrap();
        let paths: Vec<_> = tree.iter().map(|(path, _, _)| path).collect();
        assert_eq!(paths, ["/", "/a", "/a-", "/a/b"]);
    }

    #[test]
    fn path_validation_says_why() {
        assert_eq!(check_path("/"), Ok(()));
        assert_eq!(check_path("/a b/~!/x.y/..."), Ok(()));
        assert_eq!(check_path("a/b"), bad("\"a/b\" does not start with /"));
        assert_eq!(check_path(""), bad("\"\" does not start with /"));
        assert_eq!(check_path("/a//b"), bad("empty component in \"/a//b\""));
        assert_eq!(check_path("/a/"), bad("empty component in \"/a/\""));
        assert_eq!(check_path("//"), bad("empty component in \"//\""));
        assert_eq!(check_path("/a/./b"), bad("component \".\" in \"/a/./b\""));
        assert_eq!(check_path("/.."), bad("component \"..\" in \"/..\""));
        assert_eq!(
            check_path("/a\tb"),
            bad("character '\\t' in \"/a\\tb\" is not printable ASCII")
        );
        assert_eq!(
            check_path("/é"),
            bad("character 'é' in \"/é\" is not printable ASCII")
        );
        assert_eq!(
            check_path("/a\u{7f}"),
            bad("character '\\u{7f}' in \"/a\\u{7f}\" is not printable ASCII")
        );
        let name = "n".repeat(MAX_NAME_LEN);
        assert_eq!(check_path(&format!("/{name}")), Ok(()));
        assert_eq!(
            check_path(&format!("/{name}n")),
            bad("component of 256 bytes, at most 255")
        );
        let long = format!("/{name}").repeat(4);
        assert_eq!(long.len(), MAX_PATH_LEN);
        assert_eq!(check_path(&long), Ok(()));
        assert_eq!(
            check_path(&format!("{long}/")),
            bad("1025 bytes long, at most 1024")
        );
        // Every operation validates the path first.
        let mut tree = Tree::new();
        let err = TreeError::BadPath("empty component in \"/a/\"".to_owned());
        assert_eq!(tree.get("/a/").map(drop), Err(err.clone()));
        assert_eq!(tree.children("/a/").map(drop), Err(err.clone()));
        assert_eq!(tree.create("/a/", vec![]), Err(err.clone()));
        assert_eq!(tree.set("/a/", vec![], None).map(drop), Err(err.clone()));
        assert_eq!(tree.delete("/a/", None), Err(err.clone()));
        assert_eq!(err.to_string(), "bad path: empty component in \"/a/\"");
    }

    #[test]
    fn split_finds_parent_and_name() {
        assert_eq!(split("/"), None);
        assert_eq!(split("/a"), Some(("/", "a")));
        assert_eq!(split("/a/b/c"), Some(("/a/b", "c")));
    }
}
