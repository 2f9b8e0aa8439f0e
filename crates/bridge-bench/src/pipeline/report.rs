//! The result printed as a table and drawn as an SVG plot.

use super::*;

pub(super) fn print_summary(result: &BenchResult) {
    println!("| measure | value |");
    println!("| --- | ---: |");
    let offered =
        if result.offered_rate == 0 { "as fast as possible".to_owned() } else { format!("{}/s", result.offered_rate) };
    println!("| offered load | {offered} (achieved {:.0}/s) |", result.offered_per_sec);
    println!("| transfers | {} in {:.1} s |", result.transfers, result.elapsed_secs);
    println!("| completed transfers/s | {:.0} |", result.completed_per_sec);
    let e = &result.end_to_end_ms;
    println!("| end-to-end ms p50 / p95 / p99 / max | {:.0} / {:.0} / {:.0} / {:.0} |", e.p50, e.p95, e.p99, e.max);
    for (name, p) in &result.stage_ms {
        println!("| {name} ms p50 / p99 | {:.0} / {:.0} |", p.p50, p.p99);
    }
    println!("| database transactions per transfer | {:.1} |", result.db_transactions_per_transfer);
    for process in &result.processes {
        println!(
            "| {}: CPU s (share of run) / peak RSS MiB | {:.1} ({:.0} %) / {:.0} |",
            process.name,
            process.cpu_seconds,
            process.cpu_share_of_run * 100.0,
            process.peak_rss_mib
        );
    }
    let mut lags: Vec<_> = result.lag_max.iter().collect();
    lags.sort();
    for (group, lag) in lags {
        println!("| max consumer lag, {group} | {lag} |");
    }
    if let (Some(ceiling), Some(ratio)) = (result.pgbench_ceiling_tps, result.ratio_to_ceiling) {
        println!("| pgbench ceiling (stage transaction) tps | {ceiling:.0} |");
        println!("| completed transfers/s ÷ ceiling | {ratio:.3} |");
    }
    println!("| invariants | {} |", if result.invariants_ok { "hold" } else { "VIOLATED" });
}

pub(super) fn plot(result: &BenchResult) -> String {
    use crate::plot::{svg, Panel, Series};
    let throughput = result.samples.iter().map(|s| (s.second, s.completed_per_sec)).collect();
    let p50 = result.samples.iter().map(|s| (s.second, s.latency_p50_ms)).collect();
    let p99 = result.samples.iter().map(|s| (s.second, s.latency_p99_ms)).collect();
    let colours = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728"];
    let lag = StageName::ALL
        .iter()
        .zip(colours)
        .map(|(stage, colour)| Series {
            name: stage.as_str(),
            colour,
            points: result
                .samples
                .iter()
                .map(|s| (s.second, s.lag.get(stage.as_str()).copied().unwrap_or(0) as f64))
                .collect(),
        })
        .collect();
    let offered = if result.offered_rate == 0 { "max".to_owned() } else { format!("{}/s", result.offered_rate) };
    svg(
        &format!(
            "bridge bench pipeline: {} transfers, offered {offered}, {} process(es) per stage, {:.0} completed/s",
            result.transfers, result.processes_per_stage, result.completed_per_sec
        ),
        &[
            Panel {
                title: "completed transfers per second",
                unit: "1/s",
                series: vec![Series { name: "completed", colour: "#1f77b4", points: throughput }],
            },
            Panel {
                title: "end-to-end latency of transfers finishing in each second",
                unit: "ms",
                series: vec![
                    Series { name: "p50", colour: "#2ca02c", points: p50 },
                    Series { name: "p99", colour: "#d62728", points: p99 },
                ],
            },
            Panel { title: "consumer lag per stage", unit: "messages", series: lag },
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let p = Percentiles::of((1..=100).map(f64::from).collect());
        assert_eq!((p.p50, p.p95, p.p99, p.max, p.count), (50.0, 95.0, 99.0, 100.0, 100));
        let one = Percentiles::of(vec![7.0]);
        assert_eq!((one.p50, one.p99, one.max), (7.0, 7.0, 7.0));
        assert_eq!(Percentiles::of(Vec::new()).count, 0);
    }

    #[test]
    fn reads_cpu_time_of_a_process() {
        let (cpu, rss) = proc_usage(std::process::id()).expect("this process is in /proc");
        assert!(cpu >= 0.0 && rss > 0.0);
    }

    /// The time of a child that has ended and been waited for stays in the
    /// count with `reaped_children`, and only then.
    #[test]
    fn counts_the_time_of_children_that_have_ended() {
        let stat = Path::new("/proc/self/stat");
        let (own, all) = (proc_cpu(stat, false).unwrap(), proc_cpu(stat, true).unwrap());
        // About a second of CPU in a child shell.
        let status = Command::new("sh")
            .args(["-c", "i=0; while [ $i -lt 1000000 ]; do i=$((i+1)); done"])
            .status()
            .expect("sh runs");
        assert!(status.success());
        let (own_after, all_after) = (proc_cpu(stat, false).unwrap(), proc_cpu(stat, true).unwrap());
        let children = (all_after - own_after) - (all - own);
        assert!(children >= 0.2, "children's time grew by {children} s");
        assert!(own_after - own < 0.2, "this process's own time grew by {} s", own_after - own);
    }
}
