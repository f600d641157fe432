//! Gathering queued items into one Raft command: the first item opens a batch, which closes
//! when it is full or after a short linger, so a burst becomes one entry and a lone item
//! waits only the linger (the usage and allocation-state writers share it).

use std::time::Duration;

use tokio::sync::mpsc;

/// `first` and whatever else arrives on `rx` within `linger`, up to `max` items.
pub async fn gather<T>(
    rx: &mut mpsc::Receiver<T>,
    first: T,
    max: usize,
    linger: Duration,
) -> Vec<T> {
    let mut items = vec![first];
    let linger = tokio::time::sleep(linger);
    tokio::pin!(linger);
    while items.len() < max {
        tokio::select! {
            item = rx.recv() => match item {
                Some(item) => items.push(item),
                None => break,
            },
            _ = &mut linger => break,
        }
    }
    items
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_batch_closes_when_full_or_after_the_linger() {
        let (tx, mut rx) = mpsc::channel(16);
        for i in 1..=5 {
            tx.send(i).await.unwrap();
        }
        assert_eq!(
            gather(&mut rx, 0, 3, Duration::from_secs(60)).await,
            vec![0, 1, 2]
        );
        assert_eq!(
            gather(&mut rx, 9, 100, Duration::from_millis(10)).await,
            vec![9, 3, 4, 5]
        );
    }
}
