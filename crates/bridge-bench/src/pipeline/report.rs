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
    for (name, p) in [("step → relay's send", &result.status_relay_ms), ("send → received", &result.status_delivery_ms)]
    {
        println!("| status events, {name} ms p50 / p99 | {:.0} / {:.0} |", p.p50, p.p99);
    }
    println!("| database transactions per transfer | {:.1} |", result.db_transactions_per_transfer);
    for rows in &result.rows_per_transfer {
        println!(
            "| rows per transfer in {}: inserted / updated (heap-only) / deleted | {:.2} / {:.2} ({:.2}) / {:.2} |",
            rows.table, rows.inserted, rows.updated, rows.hot_updated, rows.deleted
        );
    }
    for process in &result.processes {
        println!(
            "| {}: CPU s (share of run) / peak RSS MiB | {:.1} ({:.0} %) / {:.0} |",
            process.name,
            process.cpu_seconds,
            process.cpu_share_of_run * 100.0,
            process.peak_rss_mib
        );
    }
    let cpu = &result.cpu_ms_per_transfer;
    println!(
        "| CPU ms per transfer: Postgres / pipeline / broker / simulator's books ({:?}) / load generator | {:.2} / {:.2} / {:.2} / {:.2} / {:.2} |",
        result.simulator_books, cpu.postgres, cpu.pipeline, cpu.broker, cpu.simulator_books, cpu.load_generator
    );
    if result.account_services == AccountServices::Http {
        println!("| CPU ms per transfer: the simulator's process (called over HTTP) | {:.2} |", cpu.simulator);
    }
    let idle = &result.idle_cpu_share_of_core;
    println!(
        "| idle, share of a core: Postgres / pipeline / broker / load generator | {:.0} / {:.0} / {:.0} / {:.0} % |",
        idle.postgres * 100.0,
        idle.pipeline * 100.0,
        idle.broker * 100.0,
        idle.load_generator * 100.0
    );
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
