//! `GET /changes`: the change notices of [`crate::changes`] over server-sent events, for the
//! console's lists. First a `ready` event (the subscription exists: nothing after it is
//! missed), then a `change` event `{"kind", "id"}` per notice the caller may see, and a
//! `resync` event when notices were dropped (the stream fell behind by more than
//! [`crate::changes::BUFFER`], or too much changed at once): the client re-reads everything it
//! shows. Keep-alive comments every 15 s.
//!
//! Visibility follows the list endpoints: agents are announced to everyone (`GET /agents`),
//! owned objects (jobs, runs, events, servers, workflows, workflow runs) to their owner and
//! admins only; a notice whose owner cannot be found (the object is gone) to admins only. A
//! notice never names another user's object.
//!
//! The stream holds one broadcast receiver and no task: it ends when the client goes away (the
//! response body is dropped) or the control plane shuts down.

use std::convert::Infallible;

use axum::Router;
use axum::extract::State;
use axum::response::Response;
use axum::response::sse::Event as SseEvent;
use axum::routing::get;
use futures_util::stream::{self, Stream};
use serde_json::json;
use tokio::sync::broadcast::{Receiver, error::RecvError};
use tokio_util::sync::CancellationToken;

use super::auth::CurrentUser;
use super::error::ApiResult;
use super::jobs::sse_response;
use crate::AppState;
use crate::changes::{Audience, Notice};

pub fn router() -> Router<AppState> {
    Router::new().route("/changes", get(changes))
}

async fn changes(State(state): State<AppState>, user: CurrentUser) -> ApiResult<Response> {
    let stream = Subscriber {
        receiver: state.changes.subscribe(),
        user,
        shutdown: state.shutdown.clone(),
        started: false,
    };
    Ok(sse_response(notices(stream)))
}

struct Subscriber {
    receiver: Receiver<Notice>,
    user: CurrentUser,
    shutdown: CancellationToken,
    /// The `ready` event was sent.
    started: bool,
}

impl Subscriber {
    fn may_see(&self, audience: &Audience) -> bool {
        match audience {
            Audience::Everyone => true,
            Audience::Owner(owner) => self.user.may_access(owner),
            Audience::Admins => self.user.is_admin(),
        }
    }
}

fn resync() -> SseEvent {
    SseEvent::default().event("resync").data("{}")
}

fn notices(subscriber: Subscriber) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    stream::unfold(subscriber, |mut subscriber| async move {
        if !subscriber.started {
            subscriber.started = true;
            let ready = SseEvent::default().event("ready").data("{}");
            return Some((Ok(ready), subscriber));
        }
        loop {
            let received = tokio::select! {
                _ = subscriber.shutdown.cancelled() => return None,
                received = subscriber.receiver.recv() => received,
            };
            let event = match received {
                Ok(Notice::Change { kind, id, audience }) => {
                    if !subscriber.may_see(&audience) {
                        continue;
                    }
                    SseEvent::default()
                        .event("change")
                        .data(json!({"kind": kind.as_str(), "id": &*id}).to_string())
                }
                Ok(Notice::Resync) | Err(RecvError::Lagged(_)) => resync(),
                // The sender lives as long as the state.
                Err(RecvError::Closed) => return None,
            };
            return Some((Ok(event), subscriber));
        }
    })
}
