//! Requests of one kind made together, in one write operation (claims, results).
//!
//! When a fan-out wakes a thousand agents at once, each one claims and later reports its
//! result. One write operation per request costs a savepoint and several statements, each a
//! round trip to the writing connection, all in the single writer's sequence. Here a request
//! joins the batch of its kind that is waiting for the writer: the first request of a batch
//! submits one operation, later ones only join it, and the operation takes every request
//! waiting when the writer runs it and answers them all in one go (`claim_batch`,
//! `result_batch` say how each kind does its work together).
//!
//! Answers are given only after the group commit that holds the batch: a batch's requests are
//! committed, or fail, together. A failure answers every request of the batch with the error.

use std::future::Future;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use super::{StoreError, StoreResult, WriteConnection};

type Reply<O> = oneshot::Sender<StoreResult<O>>;

struct Waiting<I, O> {
    requests: Vec<(I, Reply<O>)>,
    /// A submitted operation has not taken the waiting requests yet.
    submitted: bool,
}

/// The requests of one kind waiting for the writer; shared by every clone of a store.
pub(crate) struct Batches<I, O> {
    waiting: Arc<Mutex<Waiting<I, O>>>,
}

impl<I, O> Default for Batches<I, O> {
    fn default() -> Self {
        Batches {
            waiting: Arc::new(Mutex::new(Waiting {
                requests: Vec::new(),
                submitted: false,
            })),
        }
    }
}

impl<I, O> Clone for Batches<I, O> {
    fn clone(&self) -> Self {
        Batches {
            waiting: self.waiting.clone(),
        }
    }
}

impl<I, O> std::fmt::Debug for Batches<I, O> {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("Batches")
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl<I: Send + 'static, O: Send + 'static> Batches<I, O> {
    /// Takes every waiting request: the operation that runs now answers them.
    fn take(&self) -> Vec<(I, Reply<O>)> {
        let mut waiting = lock(&self.waiting);
        waiting.submitted = false;
        std::mem::take(&mut waiting.requests)
    }
}

impl super::Store {
    /// Makes `input` through the batch waiting in `batches`. If no operation is submitted for
    /// it yet, one is, which runs `run` on every request waiting when the writer gets to it
    /// (inside the group commit, like any write operation); `run` answers them in order, one
    /// answer per input. Otherwise `run` is dropped and the request joins that batch.
    pub(super) async fn batched<I, O, F, Fut>(
        &self,
        batches: &Batches<I, O>,
        input: I,
        run: F,
    ) -> StoreResult<O>
    where
        I: Send + 'static,
        O: Send + 'static,
        F: FnOnce(WriteConnection, Vec<I>) -> Fut + Send + 'static,
        Fut: Future<Output = (WriteConnection, StoreResult<Vec<O>>)> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let submit = {
            let mut waiting = lock(&batches.waiting);
            waiting.requests.push((input, reply));
            !std::mem::replace(&mut waiting.submitted, true)
        };
        if submit {
            // Its own task: every request of the batch must be answered even if this caller
            // stops waiting (its agent disconnected). It ends with the write.
            tokio::spawn(self.clone().submit_batch(batches.clone(), run));
        }
        answer
            .await
            .map_err(|_| StoreError::Unavailable(sqlx::Error::PoolClosed))?
    }

    /// Submits the operation that takes the waiting requests, waits for its commit and answers
    /// each request it took.
    async fn submit_batch<I, O, F, Fut>(self, batches: Batches<I, O>, run: F)
    where
        I: Send + 'static,
        O: Send + 'static,
        F: FnOnce(WriteConnection, Vec<I>) -> Fut + Send + 'static,
        Fut: Future<Output = (WriteConnection, StoreResult<Vec<O>>)> + Send + 'static,
    {
        let taken: Arc<Mutex<Vec<Reply<O>>>> = Arc::default();
        let taken_by_operation = taken.clone();
        let from = batches.clone();
        let result = self
            .write(move |connection| async move {
                let (inputs, replies): (Vec<I>, Vec<Reply<O>>) = from.take().into_iter().unzip();
                *lock(&taken_by_operation) = replies;
                run(connection, inputs).await
            })
            .await;
        let mut replies = std::mem::take(&mut *lock(&taken));
        if result.is_err() && replies.is_empty() {
            // The operation never ran (the writer could not begin, or is gone): the requests
            // are still waiting, and no other operation was submitted for them.
            replies = batches.take().into_iter().map(|(_, reply)| reply).collect();
        }
        match result {
            Ok(answers) if answers.len() == replies.len() => {
                for (reply, answer) in replies.into_iter().zip(answers) {
                    let _ = reply.send(Ok(answer));
                }
            }
            Ok(answers) => {
                let error = StoreError::Corrupt(format!(
                    "a batch of {} requests got {} answers",
                    replies.len(),
                    answers.len()
                ));
                for reply in replies {
                    let _ = reply.send(Err(error.duplicate()));
                }
            }
            Err(error) => {
                for reply in replies {
                    let _ = reply.send(Err(error.duplicate()));
                }
            }
        }
    }
}
