//! The load generator against a real broker, small: every confirmed message is consumed
//! once, and the report's figures are filled in. The benchmark itself (bench/, against
//! RabbitMQ) is not part of the test suite.

mod support;

use clap::Parser;
use support::run;

#[test]
fn warren_perf_loses_nothing_against_a_real_broker() {
    let b = support::broker();
    let opts = warren_perf::Options::parse_from([
        "warren-perf",
        "--uri",
        b.url(),
        "--producers",
        "2",
        "--consumers",
        "2",
        "--count",
        "1500",
        "--confirm",
        "32",
        "--multi-ack",
        "10",
        "--duration",
        "60",
        "--queue",
        &support::unique("perf"),
    ]);
    let report = run(async { warren_perf::run(&opts).await.expect("run") });
    assert_eq!(report.published, 3000, "{}", report.text());
    assert_eq!(report.confirmed, 3000, "{}", report.text());
    assert_eq!(report.lost, 0, "{}", report.text());
    assert_eq!(report.consumed, 3000, "{}", report.text());
    assert!(report.confirm_latency_us.p50 > 0 && report.end_to_end_latency_us.max > 0);
    assert!(report.publish_rate > 0.0 && report.consume_rate > 0.0);
}

/// The backlog scenarios fill a queue in one run and drain it in another: the filling run
/// has nothing to check for loss, the draining one counts what it expects.
#[test]
fn a_backlog_filled_by_one_run_is_drained_by_the_next() {
    let b = support::broker();
    let queue = support::unique("perf-backlog");
    let args = |extra: &[&str]| {
        let mut all = vec!["warren-perf", "--uri", b.url(), "--queue", &queue];
        all.extend_from_slice(&["--duration", "60", "--confirm", "32"]);
        all.extend_from_slice(extra);
        warren_perf::Options::parse_from(all)
    };
    let fill = args(&["--producers", "2", "--consumers", "0", "--count", "500"]);
    let report = run(async { warren_perf::run(&fill).await.expect("fill") });
    assert_eq!(
        (report.confirmed, report.lost),
        (1000, 0),
        "{}",
        report.text()
    );
    let drain = args(&["--producers", "0", "--consumers", "1", "--expect", "1000"]);
    let report = run(async { warren_perf::run(&drain).await.expect("drain") });
    assert_eq!(report.consumed, 1000, "{}", report.text());
    assert_eq!(report.duplicates, 0, "{}", report.text());
}

/// Under a rate limit the producer spends most of its time waiting for the next send; a
/// confirm arriving meanwhile must be timed when it arrives, not when the confirm window
/// next fills (which at 200 msg/s and a window of 64 would add about 315 ms to every one).
#[test]
fn confirms_are_timed_when_they_arrive_under_a_rate_limit() {
    let b = support::broker();
    let opts = warren_perf::Options::parse_from([
        "warren-perf",
        "--uri",
        b.url(),
        "--count",
        "300",
        "--rate",
        "200",
        "--confirm",
        "64",
        "--duration",
        "60",
        "--queue",
        &support::unique("perf-rate"),
    ]);
    let report = run(async { warren_perf::run(&opts).await.expect("run") });
    assert_eq!(
        (report.confirmed, report.lost),
        (300, 0),
        "{}",
        report.text()
    );
    // Half the artefact, so only a broker taking 150 ms to confirm a lone message fails.
    assert!(
        report.confirm_latency_us.p50 < 150_000,
        "confirm p50 {} us: {}",
        report.confirm_latency_us.p50,
        report.text()
    );
}
