// Typed calls for the Workflows pages: workflows (DAGs of events), their runs and webhook
// secrets. The shapes follow the OpenAPI document (Workflow, WorkflowInput, WorkflowRun).

import { type Labels, request } from "./api";

export type EdgeKind = "success" | "failure" | "always" | "condition";
export type NodeState = "pending" | "running" | "completed" | "failed" | "skipped";
export type WorkflowRunStatus = "running" | "completed" | "failed" | "cancelled";

export interface WorkflowNode {
  id: string;
  event_id: string;
  join?: "all" | "any";
  /** Overrides the event's targets (the builder's node inspector edits it); absent: the event's. */
  targets?: { agents?: string[]; labels?: Labels; servers?: string[] };
}

export interface WorkflowEdge {
  from: string;
  to: string;
  on?: EdgeKind;
  /** Only with on: condition (default true). */
  condition?: boolean;
}

export interface WorkflowTrigger {
  manual: boolean;
  schedule: { cron: string; timezone?: string } | null;
  webhook: boolean;
}

export interface Workflow {
  id: string;
  owner_id: string;
  name: string;
  nodes: WorkflowNode[];
  edges: WorkflowEdge[];
  trigger: WorkflowTrigger;
  webhook_url: string | null;
  /** Only in the answer that created or rotated it. */
  webhook_secret?: string;
  next_run_at: string | null;
  created_at: string;
  updated_at: string;
}

export interface WorkflowInput {
  name?: string;
  nodes?: WorkflowNode[];
  edges?: WorkflowEdge[];
  trigger?: Partial<WorkflowTrigger>;
}

export interface WorkflowRunNode {
  id: string;
  event_id: string;
  state: NodeState;
  run_id: string | null;
  input: unknown;
  result: unknown;
  condition: boolean | null;
  reason: string | null;
  started_at: string | null;
  finished_at: string | null;
}

export interface WorkflowRun {
  id: string;
  workflow_id: string;
  status: WorkflowRunStatus;
  trigger: "manual" | "schedule" | "webhook";
  slot_at: string | null;
  input: unknown;
  created_by: string | null;
  created_at: string;
  finished_at: string | null;
  nodes: WorkflowRunNode[];
}

const id = encodeURIComponent;

export const listWorkflows = (): Promise<Workflow[]> => request("GET", "/workflows");
export const fetchWorkflow = (workflowId: string): Promise<Workflow> => request("GET", `/workflows/${id(workflowId)}`);
export const createWorkflow = (body: WorkflowInput): Promise<Workflow> => request("POST", "/workflows", body);
export const updateWorkflow = (workflowId: string, body: WorkflowInput): Promise<Workflow> =>
  request("PATCH", `/workflows/${id(workflowId)}`, body);
export const deleteWorkflow = (workflowId: string): Promise<null> => request("DELETE", `/workflows/${id(workflowId)}`);
export const rotateWebhookSecret = (workflowId: string): Promise<{ webhook_secret: string; webhook_url: string }> =>
  request("POST", `/workflows/${id(workflowId)}/webhook-secret`);
export const listWorkflowRuns = (workflowId: string, limit = 20): Promise<WorkflowRun[]> =>
  request("GET", `/workflows/${id(workflowId)}/runs?limit=${limit}`);
export const startWorkflowRun = (workflowId: string, input: unknown): Promise<WorkflowRun> =>
  request("POST", `/workflows/${id(workflowId)}/runs`, input === undefined ? {} : { input });
export const fetchWorkflowRun = (runId: string): Promise<WorkflowRun> => request("GET", `/workflow-runs/${id(runId)}`);
export const cancelWorkflowRun = (runId: string): Promise<WorkflowRun> => request("POST", `/workflow-runs/${id(runId)}/cancel`);
