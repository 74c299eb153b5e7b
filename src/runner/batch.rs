//! Group commit of the runs' hot-path statements: every run's log batches, agent loads and
//! outcomes go through one [`Batcher`] per kind and replica, which turns whatever is waiting
//! into one statement. An idle replica pays one round trip per write, as before; a busy one
//! pays one round trip per *group* instead of one per run.
//!
//! Each batcher runs a few executors sharing one queue: an executor takes the first waiting
//! request, everything else waiting (up to a limit), runs one statement, and answers each
//! request. If a grouped statement fails, its requests are retried one by one, so one bad
//! request (say, an output PostgreSQL refuses) fails alone instead of failing its group
//! forever.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::{Mutex, mpsc, oneshot};

use crate::store::StoreError;

type Reply<R> = oneshot::Sender<Result<R, StoreError>>;

/// A queue of requests answered by grouped statements.
pub struct Batcher<Q, R> {
    sender: mpsc::UnboundedSender<(Q, Reply<R>)>,
}

impl<Q, R> Clone for Batcher<Q, R> {
    fn clone(&self) -> Self {
        Batcher {
            sender: self.sender.clone(),
        }
    }
}

impl<Q, R> Batcher<Q, R>
where
    Q: Send + 'static,
    R: Send + 'static,
{
    /// Starts `executors` tasks answering requests in groups of at most `max_group` with
    /// `execute`, which must answer every request of the group, in order. The tasks end
    /// when every handle is dropped.
    pub fn spawn<F, Fut>(executors: usize, max_group: usize, execute: F) -> Batcher<Q, R>
    where
        F: Fn(Vec<Q>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = (Vec<Q>, Result<Vec<R>, StoreError>)> + Send,
    {
        let (sender, receiver) = mpsc::unbounded_channel::<(Q, Reply<R>)>();
        let receiver = Arc::new(Mutex::new(receiver));
        let execute = Arc::new(execute);
        for _ in 0..executors.max(1) {
            let receiver = receiver.clone();
            let execute = execute.clone();
            tokio::spawn(async move {
                loop {
                    let mut group = Vec::new();
                    {
                        let mut receiver = receiver.lock().await;
                        match receiver.recv().await {
                            Some(first) => group.push(first),
                            None => return,
                        }
                        // Let the tasks that are ready now queue theirs too: runs started
                        // together reach the same statement at nearly the same moment.
                        tokio::task::yield_now().await;
                        while group.len() < max_group {
                            match receiver.try_recv() {
                                Ok(next) => group.push(next),
                                Err(_) => break,
                            }
                        }
                    }
                    let (requests, replies): (Vec<Q>, Vec<Reply<R>>) = group.into_iter().unzip();
                    let single = requests.len() == 1;
                    let (requests, answered) = execute(requests).await;
                    match answered {
                        Ok(answers) => {
                            for (reply, answer) in replies.into_iter().zip(answers) {
                                let _ = reply.send(Ok(answer));
                            }
                        }
                        Err(error) if single => {
                            if let Some(reply) = replies.into_iter().next() {
                                let _ = reply.send(Err(error));
                            }
                        }
                        Err(_) => {
                            // One by one: only the requests that fail alone get an error.
                            for (request, reply) in requests.into_iter().zip(replies) {
                                let (_, answered) = execute(vec![request]).await;
                                let _ = reply.send(answered.and_then(|mut answers| {
                                    answers.pop().ok_or_else(|| {
                                        StoreError::Corrupt(
                                            "a grouped statement gave no answer".into(),
                                        )
                                    })
                                }));
                            }
                        }
                    }
                }
            });
        }
        Batcher { sender }
    }

    /// Queues `request` and waits for its answer.
    pub async fn call(&self, request: Q) -> Result<R, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.sender
            .send((request, reply))
            .map_err(|_| StoreError::Corrupt("the statement group writer has stopped".into()))?;
        answer
            .await
            .map_err(|_| StoreError::Corrupt("the statement group writer has stopped".into()))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test(flavor = "multi_thread")]
    async fn concurrent_calls_share_statements_and_a_bad_request_fails_alone() {
        let statements = Arc::new(AtomicUsize::new(0));
        let counter = statements.clone();
        let batcher: Batcher<i32, i32> = Batcher::spawn(1, 1000, move |requests: Vec<i32>| {
            let counter = counter.clone();
            async move {
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                let answer = if requests.contains(&-1) {
                    Err(StoreError::Corrupt("negative".into()))
                } else {
                    Ok(requests.iter().map(|r| r * 2).collect())
                };
                (requests, answer)
            }
        });
        let run = |values: Vec<i32>| {
            let batcher = batcher.clone();
            async move {
                let calls: Vec<_> = values
                    .into_iter()
                    .map(|value| {
                        let batcher = batcher.clone();
                        tokio::spawn(async move { (value, batcher.call(value).await) })
                    })
                    .collect();
                let mut answers = Vec::new();
                for call in calls {
                    answers.push(call.await.unwrap());
                }
                answers
            }
        };
        // 200 calls at once share a handful of statements.
        for (value, answer) in run((0..200).collect()).await {
            assert_eq!(answer.unwrap(), value * 2);
        }
        assert!(statements.load(Ordering::SeqCst) < 50, "{statements:?}");
        // A request the statement refuses fails alone; the rest of its group is answered.
        let answers = run((0..50).map(|i| if i == 7 { -1 } else { i }).collect()).await;
        for (value, answer) in answers {
            if value == -1 {
                assert!(answer.is_err());
            } else {
                assert_eq!(answer.unwrap(), value * 2);
            }
        }
    }
}
