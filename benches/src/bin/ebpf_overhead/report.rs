//! The ebpf-overhead report: added cost per packet per configuration, against the empty hook
//! and against one `TCP_INFO` read, with the figures the project's checks read.

use std::time::Duration;

use lull_benches::{BenchReport, Table, median, spread};
use serde_json::{Map, Value, json};

use super::{CONFIGS, Samples, Window};

/// How the run went, beside its samples.
pub struct Facts {
    pub rounds: usize,
    pub window: Duration,
    pub cpu: usize,
    /// Window pairs during which the programs in effect for our cgroups changed (another
    /// process attached or detached something on an ancestor).
    pub disturbed: usize,
    /// CPU ns of one `getsockopt(TCP_INFO)`, per round.
    pub tcp_info_ns: Vec<f64>,
}

/// One configuration's medians over rounds.
struct Summary {
    added_ns: f64,
    added_spread: String,
    lost_pct: f64,
    detached_ns: f64,
}

fn summarize(pairs: &[(Window, Window)]) -> Summary {
    let added: Vec<f64> = pairs
        .iter()
        .map(|(off, on)| on.cpu_ns_per_packet() - off.cpu_ns_per_packet())
        .collect();
    let lost: Vec<f64> = pairs
        .iter()
        .map(|(off, on)| (1.0 - on.round_trips_per_sec() / off.round_trips_per_sec()) * 100.0)
        .collect();
    let detached: Vec<f64> = pairs
        .iter()
        .map(|(off, _)| off.cpu_ns_per_packet())
        .collect();
    Summary {
        added_ns: median(&added),
        added_spread: quartiles(&added),
        lost_pct: median(&lost),
        detached_ns: median(&detached),
    }
}

/// The middle half of `values`, "q1–q3": how far rounds spread around the median.
fn quartiles(values: &[f64]) -> String {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    if v.is_empty() {
        return "—".into();
    }
    spread(&[at(0.25), at(0.75)], 0)
}

pub fn build(mut report: BenchReport, samples: &Samples, facts: &Facts) -> BenchReport {
    let summaries: Vec<Summary> = samples.iter().map(|s| summarize(s)).collect();
    let by_key = |key: &str| {
        let k = CONFIGS
            .iter()
            .position(|c| c.key == key)
            .expect("a known key");
        &summaries[k]
    };
    let floor = by_key("empty_hook").added_ns;
    let tcp_info_ns = median(&facts.tcp_info_ns);

    let mut table = Table::new(
        "1-byte loopback ping-pong: CPU ns added per packet, attached against detached",
        &[
            "configuration",
            "added ns per packet (median)",
            "middle half of rounds",
            "x empty hook",
            "round trips lost",
            "detached ns per packet",
        ],
    );
    for (config, s) in CONFIGS.iter().zip(&summaries) {
        table.row(vec![
            config.label.into(),
            format!("{:+.0}", s.added_ns),
            s.added_spread.clone(),
            format!("{:.2}", s.added_ns / floor),
            format!("{:.2}%", s.lost_pct),
            format!("{:.0}", s.detached_ns),
        ]);
    }
    report.tables.push(table);
    let mut table = Table::new(
        "what the kernel half replaces",
        &["measure", "CPU ns", "note"],
    );
    let registered = by_key("registered").added_ns;
    table.row(vec![
        "one getsockopt(TCP_INFO)".into(),
        format!("{tcp_info_ns:.0}"),
        format!("median of {} rounds of 20,000 calls", facts.rounds),
    ]);
    table.row(vec![
        "stamping a probe cycle (4 packets, registered)".into(),
        format!("{:.0}", registered * 4.0),
        format!("{:.2} x one TCP_INFO read", registered * 4.0 / tcp_info_ns),
    ]);
    report.tables.push(table);

    let other = by_key("other_cgroup").added_ns;
    report.goal(
        "other_cgroup: a socket outside the attached cgroup pays nothing",
        "<= 5 ns",
        format!("{other:+.1} ns"),
        other <= 5.0,
    );
    report.goal(
        "registered <= 1.5 x empty_hook",
        "<= 1.5x",
        format!(
            "{:.2}x ({registered:.0} ns vs {floor:.0} ns)",
            registered / floor
        ),
        registered <= 1.5 * floor,
    );
    report.goal(
        "registered x 4 packets <= one TCP_INFO read",
        &format!("<= {tcp_info_ns:.0} ns"),
        format!("{:.0} ns", registered * 4.0),
        registered * 4.0 <= tcp_info_ns,
    );
    let lost = by_key("registered").lost_pct;
    report.goal(
        "round trips lost, registered",
        "<= 3%",
        format!("{lost:.2}%"),
        lost <= 3.0,
    );

    let four: Map<String, Value> = ["empty_hook", "unregistered", "registered", "other_cgroup"]
        .iter()
        .map(|k| (k.to_string(), json!(by_key(k).added_ns)))
        .collect();
    let lost: Map<String, Value> = ["empty_hook", "unregistered", "registered", "other_cgroup"]
        .iter()
        .map(|k| (k.to_string(), json!(by_key(k).lost_pct)))
        .collect();
    let ladder: Map<String, Value> = ["step_lookup", "step_parse", "step_stamp"]
        .iter()
        .map(|k| (k.to_string(), json!(by_key(k).added_ns)))
        .collect();
    report.figures = json!({
        "per_packet_ns": four,
        "round_trips_lost_pct": lost,
        "tcp_info_ns": tcp_info_ns,
        "ladder_per_packet_ns": ladder,
    });

    let notes = &mut report.notes;
    notes.push(format!(
        "Method: one thread plays both ends of each pair (write, read, answer, read), pinned to \
         CPU {cpu}, so its CPU clock holds the whole path, softirq delivery and the programs \
         included, and no wakeup adds noise. Every configuration is the difference between a \
         {window} ms window with its program attached to the `in` cgroup and one without, on \
         the same connection pair, in alternating order, for {rounds} rounds; configurations \
         take turns within a round. Per packet is CPU time over both sockets' tcpi_segs_out. \
         The medians are of per-round differences.",
        cpu = facts.cpu,
        window = facts.window.as_millis(),
        rounds = facts.rounds,
    ));
    notes.push(
        "lull runs nothing on egress: each packet of a pair in the attached cgroup meets one \
         ingress program (on the receiving socket), and the empty hook is measured at that \
         same point. `sock_ops` callbacks are per connection (establishment, state changes), \
         never per packet, so ping-pong does not see them."
            .into(),
    );
    notes.push(
        "The ladder attaches programs that each do one more step of lull's per-packet work on \
         every packet: the socket-storage lookup (all an unwatched socket in the cgroup pays), \
         the header read in place, and the clock read plus row store (what the first version \
         did on every packet, in both directions). lull's own program does the lookup and a \
         jiffies compare, and the rest only once per jiffy per direction."
            .into(),
    );
    notes.push(format!(
        "{} of {} window pairs saw the programs in effect for the benchmark's cgroups change \
         (another process attaching to an ancestor, such as the root); they are kept.",
        facts.disturbed,
        facts.rounds * CONFIGS.len(),
    ));
    report
}
