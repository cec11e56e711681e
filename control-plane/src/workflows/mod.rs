//! Workflows: a DAG of events. This module holds the model (nodes, edges, triggers), its
//! validation (unknown nodes, duplicates, cycles named, an entry node) and the pure rules that
//! decide which nodes start or are skipped; `engine.rs` applies them to the durable state.
//!
//! The rules, as the API documents them:
//!
//! - An **entry node** (no incoming edge) starts with the workflow run's input.
//! - When a node ends it is `completed` (every job of its run completed) or `failed` (any job
//!   failed or was cancelled, or its run could not be created). Its outgoing edges are then
//!   decided: `success` is taken when it completed, `failure` when it failed, `always` in both
//!   cases, `condition` when it completed and every job set the condition (`set_condition`)
//!   to the edge's `condition` value (default `true`). A skipped node takes no edge.
//! - A node with incoming edges and `join: all` (the default) waits until every incoming edge
//!   is decided; it starts if at least one was taken, else it is skipped. Edges not taken
//!   are left out of its input. With `join: any` it starts as soon as one incoming edge is
//!   taken (the first in the definition's order when several are taken at once); the later
//!   ones are ignored. It is skipped when every incoming edge is decided and none was taken.
//! - **Data**: a node's `result` is the `output` helper's JSON of its single job, or, when its
//!   run has several jobs, an object keyed by the agent's (or server's) name. A node with one
//!   incoming edge, or `join: any`, gets the upstream node's result as its `input`; a node
//!   with `join: all` and several incoming edges gets an object keyed by upstream node id,
//!   one entry per taken edge.
//! - The workflow run ends when no node is pending or running: `failed` if any node failed
//!   (even when a `failure` edge handled it), else `completed`. A cancelled run starts no
//!   node; its pending nodes are skipped and its running nodes' runs cancelled.

pub mod engine;

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::store::events::Targets;

/// Most nodes in one workflow.
pub const MAX_NODES: usize = 100;

/// Most edges in one workflow.
pub const MAX_EDGES: usize = 1000;

/// How a node with several incoming edges waits for them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Join {
    #[default]
    All,
    Any,
}

/// When an edge is taken.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EdgeOn {
    #[default]
    Success,
    Failure,
    Always,
    Condition,
}

/// A node's override of its event's targets.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeTargets {
    #[serde(default)]
    pub agents: Vec<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub servers: Vec<String>,
    /// One job run by any agent matching these labels (see `store::events::Targets::pool`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<BTreeMap<String, String>>,
}

impl From<&NodeTargets> for Targets {
    fn from(targets: &NodeTargets) -> Targets {
        Targets {
            agents: targets.agents.clone(),
            labels: targets.labels.clone(),
            servers: targets.servers.clone(),
            pool: targets.pool.clone(),
        }
    }
}

/// One step of a workflow: an event, run when the node starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Node {
    pub id: String,
    pub event_id: String,
    #[serde(default)]
    pub join: Join,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub targets: Option<NodeTargets>,
}

/// A dependency: `to` may start once `from` ended the way `on` says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Edge {
    pub from: String,
    pub to: String,
    #[serde(default)]
    pub on: EdgeOn,
    /// The condition value a `condition` edge matches (default `true`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub condition: Option<bool>,
}

impl Edge {
    /// The value a `condition` edge matches.
    pub fn wanted_condition(&self) -> bool {
        self.condition.unwrap_or(true)
    }
}

/// The graph of a workflow, as stored (JSON) and as the API shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Definition {
    pub nodes: Vec<Node>,
    pub edges: Vec<Edge>,
}

/// A validation error: the request field it concerns and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

fn field_error(field: impl Into<String>, message: impl Into<String>) -> FieldError {
    FieldError {
        field: field.into(),
        message: message.into(),
    }
}

/// Whether `id` is a valid node id: 1-64 letters, digits, `_` or `-`.
fn valid_node_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
}

impl Definition {
    /// Checks the graph's shape (not whether the events exist): node ids valid and unique,
    /// edges between known nodes, no duplicate edge, a `condition` value only on condition
    /// edges, at least one entry node and no cycle (the error names one).
    pub fn validate(&self) -> Result<(), FieldError> {
        if self.nodes.is_empty() {
            return Err(field_error("nodes", "a workflow needs at least one node"));
        }
        if self.nodes.len() > MAX_NODES {
            return Err(field_error("nodes", format!("at most {MAX_NODES} nodes")));
        }
        if self.edges.len() > MAX_EDGES {
            return Err(field_error("edges", format!("at most {MAX_EDGES} edges")));
        }
        let mut ids = BTreeSet::new();
        for (index, node) in self.nodes.iter().enumerate() {
            if !valid_node_id(&node.id) {
                return Err(field_error(
                    format!("nodes[{index}].id"),
                    "must be 1-64 letters, digits, '_' or '-'",
                ));
            }
            if !ids.insert(node.id.as_str()) {
                return Err(field_error(
                    format!("nodes[{index}].id"),
                    format!("duplicate node id {:?}", node.id),
                ));
            }
            if let Some(targets) = &node.targets {
                if targets.agents.len() > 10_000 || targets.servers.len() > 10_000 {
                    return Err(field_error(
                        format!("nodes[{index}].targets"),
                        "lists too many agents or servers",
                    ));
                }
                if let Err(crate::http::error::ApiError::Unprocessable { message, .. }) =
                    crate::http::labels_field("labels", &targets.labels)
                {
                    return Err(field_error(
                        format!("nodes[{index}].targets.labels"),
                        message,
                    ));
                }
                if let Err(crate::http::error::ApiError::Unprocessable { field, message }) =
                    crate::http::pool::check(&format!("nodes[{index}].targets"), &targets.into())
                {
                    return Err(field_error(field, message));
                }
            }
        }
        let mut seen_edges = BTreeSet::new();
        for (index, edge) in self.edges.iter().enumerate() {
            for (end, id) in [("from", &edge.from), ("to", &edge.to)] {
                if !ids.contains(id.as_str()) {
                    return Err(field_error(
                        format!("edges[{index}].{end}"),
                        format!("unknown node {id:?}"),
                    ));
                }
            }
            if edge.condition.is_some() && edge.on != EdgeOn::Condition {
                return Err(field_error(
                    format!("edges[{index}].condition"),
                    "is only allowed on an edge with on: condition",
                ));
            }
            let key = (
                edge.from.as_str(),
                edge.to.as_str(),
                edge.on as u8,
                edge.condition.map(|value| value as u8 + 1).unwrap_or(0),
            );
            if !seen_edges.insert(key) {
                return Err(field_error(
                    format!("edges[{index}]"),
                    format!("duplicate edge {} → {}", edge.from, edge.to),
                ));
            }
        }
        if self.entry_nodes().is_empty() {
            return Err(field_error(
                "edges",
                "no entry node: every node has an incoming edge",
            ));
        }
        if let Some(cycle) = self.find_cycle() {
            return Err(field_error(
                "edges",
                format!("cycles are not allowed: {}", cycle.join(" → ")),
            ));
        }
        Ok(())
    }

    /// The nodes without an incoming edge, in definition order.
    pub fn entry_nodes(&self) -> Vec<&Node> {
        self.nodes
            .iter()
            .filter(|node| !self.edges.iter().any(|edge| edge.to == node.id))
            .collect()
    }

    /// One cycle as the node ids along it (the first repeated at the end), if there is one.
    pub fn find_cycle(&self) -> Option<Vec<String>> {
        #[derive(Clone, Copy, PartialEq)]
        enum Mark {
            New,
            OnPath,
            Done,
        }
        let mut marks: BTreeMap<&str, Mark> = self
            .nodes
            .iter()
            .map(|node| (node.id.as_str(), Mark::New))
            .collect();
        for start in &self.nodes {
            if marks[start.id.as_str()] != Mark::New {
                continue;
            }
            // Iterative depth-first search: (node, index of the next outgoing edge to try).
            let mut path: Vec<(&str, usize)> = vec![(start.id.as_str(), 0)];
            marks.insert(start.id.as_str(), Mark::OnPath);
            while let Some((node, next)) = path.last_mut() {
                let node: &str = node;
                let outgoing = self
                    .edges
                    .iter()
                    .enumerate()
                    .skip(*next)
                    .find(|(_, edge)| edge.from == node);
                match outgoing {
                    Some((index, edge)) => {
                        *next = index + 1;
                        match marks.get(edge.to.as_str()).copied() {
                            Some(Mark::New) => {
                                marks.insert(edge.to.as_str(), Mark::OnPath);
                                path.push((edge.to.as_str(), 0));
                            }
                            Some(Mark::OnPath) => {
                                let from =
                                    path.iter().position(|(id, _)| *id == edge.to).unwrap_or(0);
                                let mut cycle: Vec<String> =
                                    path[from..].iter().map(|(id, _)| id.to_string()).collect();
                                cycle.push(edge.to.clone());
                                return Some(cycle);
                            }
                            _ => {}
                        }
                    }
                    None => {
                        marks.insert(node, Mark::Done);
                        path.pop();
                    }
                }
            }
        }
        None
    }

    /// The node with this id.
    pub fn node(&self, id: &str) -> Option<&Node> {
        self.nodes.iter().find(|node| node.id == id)
    }

    /// The edges into `id`, in definition order.
    fn incoming(&self, id: &str) -> Vec<&Edge> {
        self.edges.iter().filter(|edge| edge.to == id).collect()
    }
}

/// Where a node of a workflow run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeState {
    Pending,
    Running,
    Completed,
    Failed,
    Skipped,
}

impl NodeState {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Pending => "pending",
            NodeState::Running => "running",
            NodeState::Completed => "completed",
            NodeState::Failed => "failed",
            NodeState::Skipped => "skipped",
        }
    }

    pub fn parse(text: &str) -> Option<NodeState> {
        Some(match text {
            "pending" => NodeState::Pending,
            "running" => NodeState::Running,
            "completed" => NodeState::Completed,
            "failed" => NodeState::Failed,
            "skipped" => NodeState::Skipped,
            _ => return None,
        })
    }

    /// Whether the node has ended (its outgoing edges are decided).
    pub fn is_final(self) -> bool {
        matches!(
            self,
            NodeState::Completed | NodeState::Failed | NodeState::Skipped
        )
    }
}

/// What the rules need to know of a node of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeView {
    pub state: NodeState,
    /// The node's result (see the module documentation), once it ended.
    pub result: Value,
    /// `Some(v)` when every job of the node's run set the condition `v`.
    pub condition: Option<bool>,
}

impl NodeView {
    pub fn pending() -> NodeView {
        NodeView {
            state: NodeState::Pending,
            result: Value::Null,
            condition: None,
        }
    }
}

/// Whether an edge is decided yet, and taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EdgeStatus {
    Undecided,
    Taken,
    NotTaken,
}

fn edge_status(edge: &Edge, from: &NodeView) -> EdgeStatus {
    let taken = match (from.state, edge.on) {
        (NodeState::Pending | NodeState::Running, _) => return EdgeStatus::Undecided,
        (NodeState::Skipped, _) => false,
        (NodeState::Completed, EdgeOn::Success | EdgeOn::Always) => true,
        (NodeState::Completed, EdgeOn::Condition) => {
            from.condition == Some(edge.wanted_condition())
        }
        (NodeState::Completed, EdgeOn::Failure) => false,
        (NodeState::Failed, EdgeOn::Failure | EdgeOn::Always) => true,
        (NodeState::Failed, EdgeOn::Success | EdgeOn::Condition) => false,
    };
    if taken {
        EdgeStatus::Taken
    } else {
        EdgeStatus::NotTaken
    }
}

/// What to do with a pending node.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Start the node with this input.
    Start { node: String, input: Value },
    /// The node can no longer start.
    Skip { node: String },
}

/// The decisions for the pending nodes of a run given every node's view (`views` has one
/// entry per node of `definition`; a missing one counts as pending). Entry nodes start with
/// `input`. Apply them and call again: a skip can decide further nodes.
pub fn decide(
    definition: &Definition,
    views: &BTreeMap<String, NodeView>,
    input: &Value,
) -> Vec<Decision> {
    let pending = NodeView::pending();
    let view = |id: &str| views.get(id).unwrap_or(&pending);
    let mut decisions = Vec::new();
    for node in &definition.nodes {
        if view(&node.id).state != NodeState::Pending {
            continue;
        }
        let incoming = definition.incoming(&node.id);
        if incoming.is_empty() {
            decisions.push(Decision::Start {
                node: node.id.clone(),
                input: input.clone(),
            });
            continue;
        }
        let statuses: Vec<(&Edge, EdgeStatus)> = incoming
            .iter()
            .map(|edge| (*edge, edge_status(edge, view(&edge.from))))
            .collect();
        let taken: Vec<&Edge> = statuses
            .iter()
            .filter(|(_, status)| *status == EdgeStatus::Taken)
            .map(|(edge, _)| *edge)
            .collect();
        let all_decided = statuses
            .iter()
            .all(|(_, status)| *status != EdgeStatus::Undecided);
        let single_source = incoming
            .iter()
            .map(|edge| edge.from.as_str())
            .collect::<BTreeSet<_>>()
            .len()
            == 1;
        let start = match node.join {
            Join::Any => taken.first().map(|edge| view(&edge.from).result.clone()),
            Join::All if !all_decided => continue,
            Join::All if taken.is_empty() => None,
            Join::All if single_source => Some(view(&taken[0].from).result.clone()),
            Join::All => Some(Value::Object(
                taken
                    .iter()
                    .map(|edge| (edge.from.clone(), view(&edge.from).result.clone()))
                    .collect(),
            )),
        };
        match start {
            Some(input) => decisions.push(Decision::Start {
                node: node.id.clone(),
                input,
            }),
            None if all_decided => decisions.push(Decision::Skip {
                node: node.id.clone(),
            }),
            None => {}
        }
    }
    decisions
}

/// The status a run ends with once no node is pending or running: `failed` if any node
/// failed, else `completed`. `None` while a node is pending or running.
pub fn final_status(views: &BTreeMap<String, NodeView>) -> Option<&'static str> {
    if views.values().any(|view| !view.state.is_final()) {
        return None;
    }
    Some(
        if views.values().any(|view| view.state == NodeState::Failed) {
            "failed"
        } else {
            "completed"
        },
    )
}

#[cfg(test)]
mod tests;
