//! Users, API tokens and console sessions. Secrets are stored as hashes only: argon2id for
//! passwords (computed by the caller), SHA-256 for high-entropy random tokens.

use sqlx::Row;

use super::{Store, StoreError, StoreResult, new_id, now_ms, write_op};

/// What a user may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Everything, including other users' objects and the fleet.
    Admin,
    /// Their own events, runs and jobs.
    User,
    /// Read only.
    Viewer,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::User => "user",
            Role::Viewer => "viewer",
        }
    }

    pub fn parse(text: &str) -> Option<Role> {
        match text {
            "admin" => Some(Role::Admin),
            "user" => Some(Role::User),
            "viewer" => Some(Role::Viewer),
            _ => None,
        }
    }
}

/// A user as the rest of the control plane sees it (never with the password hash).
#[derive(Debug, Clone)]
pub struct User {
    pub id: String,
    pub username: String,
    pub role: Role,
}

/// A console session found by its cookie.
#[derive(Debug, Clone)]
pub struct Session {
    pub user: User,
    pub csrf_token: String,
}

fn user_from_row(row: &sqlx::any::AnyRow) -> StoreResult<User> {
    let role: String = row.try_get("role")?;
    Ok(User {
        id: row.try_get("id")?,
        username: row.try_get("username")?,
        role: Role::parse(&role).ok_or_else(|| StoreError::Corrupt(format!("role {role:?}")))?,
    })
}

impl Store {
    /// Creates a user; `password_hash` is an argon2id PHC string.
    pub async fn create_user(
        &self,
        username: &str,
        password_hash: &str,
        role: Role,
    ) -> StoreResult<User> {
        let id = new_id();
        let user = User {
            id: id.clone(),
            username: username.to_string(),
            role,
        };
        let (username, password_hash) = (username.to_string(), password_hash.to_string());
        write_op!(self, |conn| async {
            sqlx::query("INSERT INTO users (id, username, password_hash, role, created_at) VALUES ($1, $2, $3, $4, $5)")
                .bind(id)
                .bind(username)
                .bind(password_hash)
                .bind(role.as_str())
                .bind(now_ms())
                .execute(&mut *conn)
                .await?;
            Ok(())
        })
        .await?;
        Ok(user)
    }

    /// Whether any user exists (first start creates `admin`).
    pub async fn has_users(&self) -> StoreResult<bool> {
        let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM users")
            .fetch_one(&self.reader)
            .await?;
        Ok(count > 0)
    }

    /// A user and their password hash, for login.
    pub async fn user_with_password(&self, username: &str) -> StoreResult<Option<(User, String)>> {
        let row =
            sqlx::query("SELECT id, username, role, password_hash FROM users WHERE username = $1")
                .bind(username)
                .fetch_optional(&self.reader)
                .await?;
        match row {
            Some(row) => Ok(Some((user_from_row(&row)?, row.try_get("password_hash")?))),
            None => Ok(None),
        }
    }

    /// Stores an API token by its SHA-256 for `user_id`.
    pub async fn create_api_token(
        &self,
        user_id: &str,
        token_sha256: &str,
        name: &str,
    ) -> StoreResult<String> {
        let id = new_id();
        let (token_id, user_id, token_sha256, name) = (
            id.clone(),
            user_id.to_string(),
            token_sha256.to_string(),
            name.to_string(),
        );
        write_op!(self, |conn| async {
            sqlx::query("INSERT INTO api_tokens (id, user_id, token_sha256, name, created_at) VALUES ($1, $2, $3, $4, $5)")
                .bind(token_id)
                .bind(user_id)
                .bind(token_sha256)
                .bind(name)
                .bind(now_ms())
                .execute(&mut *conn)
                .await?;
            Ok(())
        })
        .await?;
        Ok(id)
    }

    /// The user owning a live API token.
    pub async fn user_by_api_token(&self, token_sha256: &str) -> StoreResult<Option<User>> {
        let row = sqlx::query(
            "SELECT u.id, u.username, u.role FROM api_tokens t JOIN users u ON u.id = t.user_id
             WHERE t.token_sha256 = $1 AND t.revoked_at IS NULL",
        )
        .bind(token_sha256)
        .fetch_optional(&self.reader)
        .await?;
        row.as_ref().map(user_from_row).transpose()
    }

    /// Starts a console session.
    pub async fn create_session(
        &self,
        user_id: &str,
        token_sha256: &str,
        csrf_token: &str,
        ttl_ms: i64,
    ) -> StoreResult<()> {
        let (user_id, token_sha256, csrf_token) = (
            user_id.to_string(),
            token_sha256.to_string(),
            csrf_token.to_string(),
        );
        write_op!(self, |conn| async {
            let now = now_ms();
            sqlx::query(
                "INSERT INTO sessions (id, user_id, token_sha256, csrf_token, created_at, expires_at) VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(new_id())
            .bind(user_id)
            .bind(token_sha256)
            .bind(csrf_token)
            .bind(now)
            .bind(now + ttl_ms)
            .execute(&mut *conn)
            .await?;
            Ok(())
        })
        .await
    }

    /// A live console session by the SHA-256 of its cookie.
    pub async fn session(&self, token_sha256: &str) -> StoreResult<Option<Session>> {
        let row = sqlx::query(
            "SELECT u.id, u.username, u.role, s.csrf_token FROM sessions s JOIN users u ON u.id = s.user_id
             WHERE s.token_sha256 = $1 AND s.expires_at > $2",
        )
        .bind(token_sha256)
        .bind(now_ms())
        .fetch_optional(&self.reader)
        .await?;
        match row {
            Some(row) => Ok(Some(Session {
                user: user_from_row(&row)?,
                csrf_token: row.try_get("csrf_token")?,
            })),
            None => Ok(None),
        }
    }

    /// Ends a console session.
    pub async fn delete_session(&self, token_sha256: &str) -> StoreResult<()> {
        let token_sha256 = token_sha256.to_string();
        write_op!(self, |conn| async {
            sqlx::query("DELETE FROM sessions WHERE token_sha256 = $1")
                .bind(token_sha256)
                .execute(&mut *conn)
                .await?;
            Ok(())
        })
        .await
    }
}

/// A user as an admin's list shows them.
#[derive(Debug, Clone)]
pub struct UserRecord {
    pub user: User,
    pub created_at: i64,
}

/// An API token as its owner's list shows it: never the token, which only its hash remembers.
#[derive(Debug, Clone)]
pub struct ApiTokenRecord {
    pub id: String,
    pub name: String,
    pub created_at: i64,
    pub last_used_at: Option<i64>,
}

/// Why a role change or a deletion was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserChange {
    Done,
    /// The user does not exist.
    NotFound,
    /// It would leave no admin.
    LastAdmin,
    /// The user still owns objects that are not deleted with them (events).
    StillOwns,
}

/// How long a token's `last_used_at` may lag behind: authentication writes at most this often.
const LAST_USED_RESOLUTION_MS: i64 = 60_000;

impl Store {
    /// Every user, by username.
    pub async fn users(&self) -> StoreResult<Vec<UserRecord>> {
        let rows =
            sqlx::query("SELECT id, username, role, created_at FROM users ORDER BY username")
                .fetch_all(&self.reader)
                .await?;
        rows.iter()
            .map(|row| {
                Ok(UserRecord {
                    user: user_from_row(row)?,
                    created_at: row.try_get("created_at")?,
                })
            })
            .collect()
    }

    /// One user by id.
    pub async fn user(&self, id: &str) -> StoreResult<UserRecord> {
        let row = sqlx::query("SELECT id, username, role, created_at FROM users WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.reader)
            .await?
            .ok_or(StoreError::NotFound)?;
        Ok(UserRecord {
            user: user_from_row(&row)?,
            created_at: row.try_get("created_at")?,
        })
    }

    /// Changes a user's role; demoting the last admin is refused.
    pub async fn set_user_role(&self, id: &str, role: Role) -> StoreResult<UserChange> {
        let id = id.to_string();
        write_op!(self, |conn| async {
            let exists: Option<String> = sqlx::query_scalar("SELECT id FROM users WHERE id = $1")
                .bind(&id)
                .fetch_optional(&mut *conn)
                .await?;
            if exists.is_none() {
                return Ok(UserChange::NotFound);
            }
            // The last-admin condition is part of the statement (and writes are serialized), so
            // two concurrent demotions cannot both pass it. Promotions always pass.
            let changed = sqlx::query(
                "UPDATE users SET role = $1 WHERE id = $2 AND ($1 = 'admin' OR role != 'admin'
                 OR (SELECT COUNT(*) FROM users WHERE role = 'admin') > 1)",
            )
            .bind(role.as_str())
            .bind(&id)
            .execute(&mut *conn)
            .await?
            .rows_affected();
            Ok(if changed == 1 {
                UserChange::Done
            } else {
                UserChange::LastAdmin
            })
        })
        .await
    }

    /// Replaces a user's password hash and ends their console sessions (they log in again).
    pub async fn set_user_password(&self, id: &str, password_hash: &str) -> StoreResult<()> {
        let (id, password_hash) = (id.to_string(), password_hash.to_string());
        write_op!(self, |conn| async {
            // One write operation is one savepoint: both statements or neither.
            let changed = sqlx::query("UPDATE users SET password_hash = $1 WHERE id = $2")
                .bind(password_hash)
                .bind(&id)
                .execute(&mut *conn)
                .await?
                .rows_affected();
            if changed == 0 {
                return Err(StoreError::NotFound);
            }
            sqlx::query("DELETE FROM sessions WHERE user_id = $1")
                .bind(&id)
                .execute(&mut *conn)
                .await?;
            Ok(())
        })
        .await
    }

    /// Deletes a user (their sessions, tokens, tools, variables and servers go with them);
    /// deleting the last admin is refused. A user who still owns events cannot be deleted: the
    /// foreign key refuses it ([`UserChange::StillOwns`]).
    pub async fn delete_user(&self, id: &str) -> StoreResult<UserChange> {
        let id = id.to_string();
        write_op!(self, |conn| async {
            let exists: Option<String> = sqlx::query_scalar("SELECT id FROM users WHERE id = $1")
                .bind(&id)
                .fetch_optional(&mut *conn)
                .await?;
            if exists.is_none() {
                return Ok(UserChange::NotFound);
            }
            // A savepoint of its own: on PostgreSQL a failed statement spoils the transaction
            // until it is rolled back, and the refusal is an answer here, not a failure.
            sqlx::query("SAVEPOINT delete_user")
                .execute(&mut *conn)
                .await?;
            let deleted = sqlx::query(
                "DELETE FROM users WHERE id = $1 AND (role != 'admin'
                 OR (SELECT COUNT(*) FROM users WHERE role = 'admin') > 1)",
            )
            .bind(&id)
            .execute(&mut *conn)
            .await;
            let end = if deleted.is_ok() {
                "RELEASE delete_user"
            } else {
                "ROLLBACK TO delete_user; RELEASE delete_user"
            };
            sqlx::raw_sql(end).execute(&mut *conn).await?;
            let changed = match deleted {
                Ok(done) => done.rows_affected(),
                Err(sqlx::Error::Database(error)) if error.is_foreign_key_violation() => {
                    return Ok(UserChange::StillOwns);
                }
                Err(error) => return Err(error.into()),
            };
            Ok(if changed == 1 {
                UserChange::Done
            } else {
                UserChange::LastAdmin
            })
        })
        .await
    }

    /// A user's live (not revoked) API tokens, newest first.
    pub async fn api_tokens(&self, user_id: &str) -> StoreResult<Vec<ApiTokenRecord>> {
        let rows = sqlx::query(
            "SELECT id, name, created_at, last_used_at FROM api_tokens
             WHERE user_id = $1 AND revoked_at IS NULL ORDER BY created_at DESC, id",
        )
        .bind(user_id)
        .fetch_all(&self.reader)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(ApiTokenRecord {
                    id: row.try_get("id")?,
                    name: row.try_get("name")?,
                    created_at: row.try_get("created_at")?,
                    last_used_at: row.try_get("last_used_at")?,
                })
            })
            .collect()
    }

    /// One of `user_id`'s live API tokens.
    pub async fn api_token(&self, user_id: &str, id: &str) -> StoreResult<ApiTokenRecord> {
        self.api_tokens(user_id)
            .await?
            .into_iter()
            .find(|token| token.id == id)
            .ok_or(StoreError::NotFound)
    }

    /// Revokes one of `user_id`'s live tokens; another user's token is `NotFound`.
    pub async fn revoke_api_token(&self, user_id: &str, id: &str) -> StoreResult<()> {
        let (user_id, id) = (user_id.to_string(), id.to_string());
        write_op!(self, |conn| async {
            let changed = sqlx::query(
                "UPDATE api_tokens SET revoked_at = $1 WHERE id = $2 AND user_id = $3 AND revoked_at IS NULL",
            )
            .bind(now_ms())
            .bind(id)
            .bind(user_id)
            .execute(&mut *conn)
            .await?
            .rows_affected();
            if changed == 1 {
                Ok(())
            } else {
                Err(StoreError::NotFound)
            }
        })
        .await
    }

    /// Records that a token was just used, at most once a minute per token (a read decides
    /// whether to write, so most authenticated requests do not write).
    pub async fn touch_api_token(&self, token_sha256: &str) -> StoreResult<()> {
        let now = now_ms();
        let last: Option<Option<i64>> =
            sqlx::query_scalar("SELECT last_used_at FROM api_tokens WHERE token_sha256 = $1")
                .bind(token_sha256)
                .fetch_optional(&self.reader)
                .await?;
        match last {
            Some(Some(last)) if now - last < LAST_USED_RESOLUTION_MS => return Ok(()),
            None => return Ok(()),
            _ => {}
        }
        let token_sha256 = token_sha256.to_string();
        write_op!(self, |conn| async {
            sqlx::query(
                "UPDATE api_tokens SET last_used_at = $1 WHERE token_sha256 = $2
                 AND (last_used_at IS NULL OR last_used_at < $3)",
            )
            .bind(now)
            .bind(token_sha256)
            .bind(now - LAST_USED_RESOLUTION_MS)
            .execute(&mut *conn)
            .await?;
            Ok(())
        })
        .await
    }
}
