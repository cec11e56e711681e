// Typed calls for the console's Settings and Console pages (see openapi.json): users, API tokens,
// tools, variables, enrollment tokens and terminal sessions. Everything goes through `request`
// (session cookie, CSRF token, the API's error messages).

import { type Labels, request } from "./api";

const id = encodeURIComponent;

export type Role = "admin" | "user" | "viewer";

export interface UserRecord {
  id: string;
  username: string;
  role: Role;
  created_at: string | null;
}

export interface ApiToken {
  id: string;
  name: string;
  created_at: string | null;
  last_used_at: string | null;
}

export type ToolKind = "slack" | "discord" | "webhook" | "email";

export interface Tool {
  id: string;
  owner_id: string;
  name: string;
  kind: ToolKind;
  /** Where it sends (a URL's host, or an SMTP host:port); never a credential. */
  target_host: string | null;
  created_at: string | null;
  updated_at: string | null;
}

/** Write-only: sent, never read back. */
export type ToolConfig =
  | { url: string; headers?: Record<string, string>; secret?: string }
  | {
      host: string;
      port?: number;
      security?: "starttls" | "tls" | "none";
      username?: string;
      password?: string;
      from: string;
      to: string[];
    };

export interface Variable {
  name: string;
  value: unknown;
  updated_at: string | null;
  updated_by_job: string | null;
}

export interface EnrollmentTokenRecord {
  id: string;
  labels: Labels;
  uses_left: number;
  expires_at: string | null;
  created_by: string | null;
  created_at: string | null;
}

export interface TerminalSession {
  id: string;
  agent_id: string;
  agent_name: string | null;
  user_id: string;
  username: string | null;
  opened_at: string | null;
  closed_at: string | null;
  live: boolean;
  exit_code: number | null;
  has_recording: boolean;
}

export const listUsers = (): Promise<UserRecord[]> => request("GET", "/users");
export const createUser = (body: { username: string; password: string; role: Role }): Promise<UserRecord> =>
  request("POST", "/users", body);
export const updateUser = (userId: string, body: { role?: Role; password?: string }): Promise<UserRecord> =>
  request("PATCH", `/users/${id(userId)}`, body);
export const deleteUser = (userId: string): Promise<null> => request("DELETE", `/users/${id(userId)}`);

export const listTokens = (): Promise<ApiToken[]> => request("GET", "/tokens");
export const createToken = (name: string): Promise<ApiToken & { token: string }> => request("POST", "/tokens", { name });
export const revokeToken = (tokenId: string): Promise<null> => request("DELETE", `/tokens/${id(tokenId)}`);

export const listTools = (): Promise<Tool[]> => request("GET", "/tools");
export const createTool = (body: { name: string; kind: ToolKind; config: ToolConfig }): Promise<Tool> =>
  request("POST", "/tools", body);
export const updateTool = (toolId: string, body: { name?: string; config?: ToolConfig }): Promise<Tool> =>
  request("PATCH", `/tools/${id(toolId)}`, body);
export const deleteTool = (toolId: string): Promise<null> => request("DELETE", `/tools/${id(toolId)}`);
export const testTool = (toolId: string): Promise<{ id: string; status: string }> =>
  request("POST", `/tools/${id(toolId)}/test`, {});

export const listVariables = (): Promise<Variable[]> => request("GET", "/variables");
export const putVariable = (name: string, value: unknown): Promise<Variable> =>
  request("PUT", `/variables/${id(name)}`, { value });
export const deleteVariable = (name: string): Promise<null> => request("DELETE", `/variables/${id(name)}`);

export const listEnrollmentTokens = (): Promise<EnrollmentTokenRecord[]> => request("GET", "/enrollment-tokens");
export const revokeEnrollmentToken = (tokenId: string): Promise<null> =>
  request("DELETE", `/enrollment-tokens/${id(tokenId)}`);

export const listTerminalSessions = (): Promise<TerminalSession[]> => request("GET", "/terminal-sessions");
export const recordingUrl = (sessionId: string): string => `/api/v1/terminal-sessions/${id(sessionId)}/recording`;
