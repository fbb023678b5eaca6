use super::*;

fn book(per_address: usize, unauthenticated: usize, in_all: usize) -> Arc<ConnectionBook> {
    let limits = HttpLimits {
        connections_per_address_max: per_address,
        unauthenticated_connections_max: unauthenticated,
        connections_max: in_all,
        ..HttpLimits::default()
    };
    Arc::new(ConnectionBook::new(limits, Arc::new(Metrics::default())))
}

#[test]
fn one_address_is_bounded_and_others_are_not() {
    let book = book(2, 100, 100);
    let here: IpAddr = "10.0.0.1".parse().expect("ip");
    let there: IpAddr = "10.0.0.2".parse().expect("ip");
    let first = book.admit(here).expect("first");
    let _second = book.admit(here).expect("second");
    assert_eq!(
        book.admit(here).map(|_| ()),
        Err(Refusal::TooManyFromAddress)
    );
    let _elsewhere = book.admit(there).expect("another address");
    drop(first);
    let _again = book.admit(here).expect("a connection closed");
    assert_eq!(
        book.metrics
            .http
            .connections_refused
            .load(Ordering::Relaxed),
        1
    );
}

#[test]
fn authenticated_connections_leave_the_unauthenticated_bound() {
    let book = book(100, 2, 100);
    let address: IpAddr = "10.0.0.1".parse().expect("ip");
    let first = book.admit(address).expect("first");
    let second = book.admit(address).expect("second");
    assert_eq!(
        book.admit(address).map(|_| ()),
        Err(Refusal::TooManyUnauthenticated)
    );
    first.authenticated();
    first.authenticated();
    let third = book.admit(address).expect("one connection authenticated");
    assert_eq!(
        book.admit(address).map(|_| ()),
        Err(Refusal::TooManyUnauthenticated)
    );
    drop(second);
    drop(third);
    drop(first);
    let counts = book.lock();
    assert_eq!((counts.open, counts.unauthenticated), (0, 0));
    assert!(counts.per_address.is_empty());
}

#[test]
fn connections_in_all_are_bounded() {
    let book = book(100, 100, 1);
    let _only = book.admit("10.0.0.1".parse().expect("ip")).expect("first");
    assert_eq!(
        book.admit("10.0.0.2".parse().expect("ip")).map(|_| ()),
        Err(Refusal::TooManyInAll)
    );
}

#[tokio::test]
async fn a_write_blocked_past_the_stall_timeout_fails() {
    use tokio::io::AsyncWriteExt;
    // A pipe whose reader never reads: writes block once it is full.
    let (writer, _reader) = tokio::io::duplex(64);
    let mut guarded = StallGuardedIo::new(writer, Duration::from_millis(200));
    let started = Instant::now();
    let error = guarded
        .write_all(&[0_u8; 1024])
        .await
        .expect_err("the write must fail");
    assert_eq!(error.kind(), io::ErrorKind::TimedOut);
    assert!(started.elapsed() >= Duration::from_millis(200));
}

#[tokio::test]
async fn a_reader_that_keeps_reading_is_never_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (writer, mut reader) = tokio::io::duplex(64);
    let mut guarded = StallGuardedIo::new(writer, Duration::from_millis(200));
    let reading = tokio::spawn(async move {
        let mut buffer = [0_u8; 16];
        let mut total = 0;
        // 64 reads of 16 bytes, 40 ms apart: slow, but never stalled.
        while total < 1024 {
            tokio::time::sleep(Duration::from_millis(40)).await;
            total += reader.read(&mut buffer).await.expect("read");
        }
    });
    guarded
        .write_all(&[0_u8; 1024])
        .await
        .expect("slow but steady");
    reading.await.expect("reader");
}
